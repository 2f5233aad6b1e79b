"""Derivative rehearsal in stage 1: surrogates of f0 fitted, references kept away, alternatives made alike."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_f0_and_secret
from dist_awenc.config import PretrainConfig, WatermarkConfig, load_config
from dist_awenc.data import build_dataset, make_splits
from dist_awenc.encoders.io import build_encoder, load_encoder
from dist_awenc.errors import ConfigError
from dist_awenc.watermark.perturbation import Rehearsal, rehearsal_terms
from dist_awenc.watermark.rehearsal import (REFERENCE_SEED, build_references, check_rehearsal, fingerprint,
                                            reference_specs)

SURROGATES = ["distill:1", "prune_global:0.5"]


def _enc(seed: int):
    torch.manual_seed(seed)
    return build_encoder("tiny", {"width": 4, "norm": "group"}, [0.5] * 3, [0.5] * 3, 8).eval()


def test_terms_are_the_surrogates_generation_loss_and_the_references_pull_to_the_key():
    s, r = _enc(1), _enc(2)
    x, keys = torch.rand(2, 5, 3, 8, 8), torch.rand(2, 3, 8, 8)
    marked = (x + 0.05).clamp(0, 1)
    sur, ref = rehearsal_terms(Rehearsal([s], [r], reference_weight=2.0), x, marked, keys, alpha=1.0)
    cos = torch.nn.functional.cosine_similarity
    for k in range(2):
        f_m, f_x, f_k = s(marked[k]), s(x[k]), s(keys[k : k + 1])
        want = (cos(f_m, f_x, dim=1) - cos(f_m, f_k, dim=1)).mean()
        torch.testing.assert_close(sur[k], want)
        torch.testing.assert_close(ref[k], 2.0 * cos(r(marked[k]), r(keys[k : k + 1]), dim=1).mean())


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="registered attack"):
        check_rehearsal(["not_an_attack:1"], 0, 1.0)
    with pytest.raises(ConfigError, match="attack:strength"):
        check_rehearsal(["distill"], 0, 1.0)
    with pytest.raises(ConfigError, match="references >= 0"):
        check_rehearsal([], -1, 1.0)
    with pytest.raises(ConfigError, match=r"rehearsal.reference_archs: 'tiny:wide' is not name or name:width"):
        check_rehearsal([], 1, 1.0, ["tiny:wide"])
    with pytest.raises(ConfigError, match=r"rehearsal.reference_archs: 'no_such_net'.*unknown encoder"):
        check_rehearsal([], 1, 1.0, ["no_such_net"])
    with pytest.raises(ConfigError, match=r"references in 1..99 .*not 0"):
        check_rehearsal([], 0, 1.0, ["tiny_resnet:16"])


def test_references_of_other_architectures_have_their_own_seeds_after_f0s():
    specs = reference_specs(2, ["tiny_resnet:16", "tiny"])
    assert specs == [("reference_0", 7000, None), ("reference_1", 7001, None),
                     ("reference_tiny_resnet16_0", 7100, "tiny_resnet:16"), ("reference_tiny_resnet16_1", 7101, "tiny_resnet:16"),
                     ("reference_tiny_0", 7200, "tiny"), ("reference_tiny_1", 7201, "tiny")]
    assert reference_specs(3) == [(f"reference_{r}", REFERENCE_SEED + r, None) for r in range(3)]  # as before the option


@pytest.fixture(scope="module")
def rehearsed(tmp_path_factory):
    return tiny_f0_and_secret(tmp_path_factory.mktemp("rehearsal"), "generation.steps=4", "generation.batch_size=16",
                              "plan.alternatives=2", f"rehearsal.surrogates=[{','.join(SURROGATES)}]",
                              "rehearsal.references=1")


def test_watermark_records_the_rehearsal_and_makes_the_alternatives_with_it(rehearsed):
    from dist_awenc.watermark.generate import generate_delta
    from dist_awenc.watermark.secret import load_alternatives, load_secret

    root, f0_path, secret_path = rehearsed
    secret = load_secret(secret_path)
    rec = secret.meta["rehearsal"]
    assert rec["surrogates"] == SURROGATES and rec["reference_seeds"] == [REFERENCE_SEED] and "reference_archs" not in rec
    surrogate_files = sorted((root / "wm" / "rehearsal" / "surrogates").glob("*/encoder.safetensors"))
    reference = root / "wm" / "rehearsal" / "references" / "reference_0" / "encoder.safetensors"
    members = [load_encoder(p)[0] for p in (*surrogate_files, reference)]
    assert len(surrogate_files) == 2 and rec["encoders_sha256"] == [fingerprint(e) for e in members]
    # the reference is pre-trained exactly like f0, with another seed
    f0_cfg = load_config(PretrainConfig, Path(f0_path).parent / "config.yaml")
    ref_cfg = load_config(PretrainConfig, reference.parent / "config.yaml")
    assert ref_cfg.run.seed == REFERENCE_SEED and ref_cfg.train.max_steps == f0_cfg.train.max_steps
    assert json.loads((root / "wm" / "generation.json").read_text())["rehearsal"] == rec
    # the owner's secret and each alternative are what the same rehearsed procedure gives with their seeds
    enc, _ = load_encoder(f0_path)
    ds = build_dataset("digits", image_size=8, seed=0)
    pool, _ = ds.get_batch(make_splits(len(ds), 0)["pretrain"])
    rh = Rehearsal(members[:2], members[2:], 1.0)
    kw = dict(steps=4, batch_size=16, progress=False, rehearsal=rh)
    torch.testing.assert_close(secret.delta, generate_delta(enc, pool, secret.key, seed=secret.meta["seed"], **kw)[0], atol=1e-6, rtol=0)
    alt = load_alternatives(Path(secret_path).with_name("alternatives.safetensors"))
    again, _ = generate_delta(enc, pool, alt.keys[0], seed=alt.seeds[0], **kw)
    torch.testing.assert_close(alt.deltas[0], again, atol=1e-6, rtol=0)
    plain, _ = generate_delta(enc, pool, alt.keys[0], seed=alt.seeds[0], steps=4, batch_size=16, progress=False)
    assert not torch.equal(plain, alt.deltas[0])


def test_a_reference_of_another_architecture_is_pretrained_like_f0_otherwise(tmp_path, rehearsed):
    _, f0_path, _ = rehearsed
    refs = build_references(f0_path, 1, tmp_path, ["tiny_resnet:4"])
    assert len(refs) == 2
    f0_cfg = load_config(PretrainConfig, Path(f0_path).parent / "config.yaml")
    same = load_config(PretrainConfig, tmp_path / "reference_0" / "config.yaml")
    other = load_config(PretrainConfig, tmp_path / "reference_tiny_resnet4_0" / "config.yaml")
    assert (same.encoder, same.run.seed) == (f0_cfg.encoder, REFERENCE_SEED)
    assert (other.encoder.arch, other.encoder.width, other.run.seed) == ("tiny_resnet", 4, REFERENCE_SEED + 100)
    assert (other.encoder.norm, other.ssl, other.train.max_steps) == (f0_cfg.encoder.norm, f0_cfg.ssl, f0_cfg.train.max_steps)
    assert load_encoder(tmp_path / "reference_tiny_resnet4_0" / "encoder.safetensors")[1]["arch"] == "tiny_resnet"


def test_a_query_side_surrogate_is_refused(tmp_path, rehearsed):
    from dist_awenc.watermark.generate import watermark

    _, f0, _ = rehearsed
    cfg = load_config(WatermarkConfig, None, [f"run.out_dir={tmp_path}", "run.name=wm", f"encoder={f0}",
                                              "data.image_size=8", "rehearsal.surrogates=[query_jpeg:50]"])
    with pytest.raises(ConfigError, match="query-side"):
        watermark(cfg)
