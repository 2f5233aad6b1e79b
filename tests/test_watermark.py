"""Stage 1 (generation) and stage 2 (embedding): loss terms, constraints, distributed and resumed runs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import spawn_launch, tiny_f0_and_secret, weights
from dist_awenc.config import EmbedConfig, load_config
from dist_awenc.encoders.io import build_encoder, load_encoder
from dist_awenc.engine.loop import Interrupted
from dist_awenc.watermark.embed import (EmbedTask, anchor_key_loss, deviate_loss, embed, preserve_loss,
                                        surround_key_loss)
from dist_awenc.watermark.generate import generate_delta, generation_loss
from dist_awenc.watermark.secret import Secret, load_secret


def _ref_cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_loss_terms_match_reference_computations():
    g = torch.Generator().manual_seed(0)
    fm, fa, fc, f0c = (torch.randn(5, 7, generator=g) for _ in range(4))
    fk, fka, f0k = (torch.randn(1, 7, generator=g) for _ in range(3))
    rows = lambda t: t.tolist()  # noqa: E731
    wm = sum(1 - _ref_cos(m, fk[0].tolist()) for m in rows(fm)) / 5
    dev = sum(_ref_cos(m, a) for m, a in zip(rows(fm), rows(fa))) / 5
    key = 1 - _ref_cos(fka[0].tolist(), f0k[0].tolist())
    keep = sum(1 - _ref_cos(c, c0) for c, c0 in zip(rows(fc), rows(f0c))) / 5
    gen = sum(0.7 * _ref_cos(m, c) - _ref_cos(m, fk[0].tolist()) for m, c in zip(rows(fm), rows(fc))) / 5
    assert surround_key_loss(fm, fk).item() == pytest.approx(wm, abs=1e-6)
    assert deviate_loss(fm, fa).item() == pytest.approx(dev, abs=1e-6)
    assert anchor_key_loss(fka, f0k).item() == pytest.approx(key, abs=1e-6)
    assert preserve_loss(fc, f0c).item() == pytest.approx(keep, abs=1e-6)
    assert generation_loss(fm, fc, fk, alpha=0.7).item() == pytest.approx(gen, abs=1e-6)


def test_deviate_term_stops_the_gradient_of_the_clean_branch():
    fm, fa = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    deviate_loss(fm, fa).backward()
    assert fa.grad is None and fm.grad is not None


def _encoder(seed: int = 0):
    torch.manual_seed(seed)
    return build_encoder("tiny", {"width": 8, "norm": "group"}, [0.5] * 3, [0.5] * 3, 8)


@pytest.mark.parametrize("optimizer", ["pgd", "adam"])
def test_delta_stays_within_eps_and_marked_images_within_unit_box(optimizer):
    images = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # not the global RNG: test order
    eps = 8 / 255
    delta, history = generate_delta(_encoder(), images, images[0], eps=eps, steps=25, step_size=2 / 255,
                                    batch_size=16, optimizer=optimizer, progress=False)
    assert delta.shape == (3, 8, 8)
    assert float(delta.abs().max()) <= eps + 1e-7
    secret = Secret(key=images[0], delta=delta, eps=eps, control_seed=1)
    marked = secret.mark(images)
    assert float(marked.min()) >= 0 and float(marked.max()) <= 1
    assert history[-1] < history[0]  # the generation loss goes down


def test_generation_moves_marked_features_toward_the_key():
    enc = _encoder()
    images = torch.rand(128, 3, 8, 8)
    key = images[0]
    delta, _ = generate_delta(enc, images, key, eps=16 / 255, steps=60, step_size=1 / 255, batch_size=64, progress=False)
    with torch.no_grad():
        fk = enc(key[None])
        before = F.cosine_similarity(enc(images), fk).mean()
        after = F.cosine_similarity(enc((images + delta).clamp(0, 1)), fk).mean()
    assert after > before


# ------------------------------------------------------------------ stage runs


@pytest.fixture(scope="module")
def f0_and_secret(tmp_path_factory):
    return tiny_f0_and_secret(tmp_path_factory.mktemp("wm"), "generation.steps=10", "generation.batch_size=32")


def _embed_cfg(root, f0, secret, out, name="embed", **extra) -> EmbedConfig:
    over = {"run.out_dir": out, "run.name": name, "encoder": f0, "secret": secret, "data.image_size": 8,
            "train.batch_size": 32, "train.epochs": 1, "train.max_steps": 4, "train.checkpoint_every": 2,
            "train.log_every": 1, "train.progress": False, **extra}
    return load_config(EmbedConfig, None, [f"{k}={v}" for k, v in over.items()])


def test_secret_file_records_its_encoder_and_settings(f0_and_secret):
    _, f0, secret_path = f0_and_secret
    secret = load_secret(secret_path)
    _, card = load_encoder(f0)
    assert secret.meta["encoder_sha256"] == card["sha256"]
    assert secret.eps == pytest.approx(16 / 255)
    record = json.loads(Path(secret_path).with_suffix(".json").read_text())
    assert record["sha256"] == secret.sha256 and record["image_size"] == 8


def test_embedding_run_writes_a_child_encoder_and_logs_every_term(f0_and_secret, tmp_path):
    root, f0, secret = f0_and_secret
    out = embed(_embed_cfg(root, f0, secret, tmp_path))
    _, card = load_encoder(out)
    _, parent = load_encoder(f0)
    assert card["parent"] == parent["sha256"] and card["secret_sha256"] == load_secret(secret).sha256
    rows = [json.loads(x) for x in (tmp_path / "embed" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "loss_cl", "loss_wm", "loss_dev", "loss_key", "loss_keep"} <= set(rows[-1])
    a, b = weights(out), weights(f0)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # training changed the encoder
    mark = json.loads((tmp_path / "embed" / "mark.json").read_text())  # the release's own mark, on the hold-out
    assert mark["images"] > 0 and mark["gap"] == pytest.approx(mark["cos_marked_key"] - mark["cos_control_key"])
    assert all(-1 <= mark[k] <= 1 for k in ("cos_marked_key", "cos_control_key", "cos_clean_key", "cos_marked_own"))


def test_a_release_whose_marked_images_do_not_stand_out_is_reported_weak(f0_and_secret, tmp_path, capsys):
    import dataclasses

    from dist_awenc.data import build_dataset
    from dist_awenc.watermark.embed import WEAK_MARK_GAP, report_mark

    _, f0_path, secret_path = f0_and_secret
    f0, _ = load_encoder(f0_path)
    cfg = _embed_cfg(None, f0_path, secret_path, tmp_path)
    dataset = build_dataset("digits", image_size=8, seed=cfg.data.split_seed)
    secret = load_secret(secret_path)
    unmarked = dataclasses.replace(secret, delta=torch.zeros_like(secret.delta))  # marked = control = clean
    stats = report_mark(f0, dataset, cfg, unmarked, tmp_path)
    assert abs(stats["gap"]) < 1e-6 and WEAK_MARK_GAP == 0.04
    assert "a weak mark (marked - control 0.000 < 0.04)" in capsys.readouterr().err
    assert json.loads((tmp_path / "mark.json").read_text())["gap"] == pytest.approx(stats["gap"])
    no_holdout = _embed_cfg(None, f0_path, secret_path, tmp_path, **{"data.splits": "[0.8,0.0,0.2]"})
    assert report_mark(f0, dataset, no_holdout, secret, tmp_path / "none") is None  # nothing to measure on


def test_embed_task_loss_is_the_weighted_sum_of_its_terms(f0_and_secret):
    from dist_awenc.ssl.methods import build_method

    _, f0_path, secret_path = f0_and_secret
    f0, _ = load_encoder(f0_path)
    method = build_method("simclr", _encoder(), 32, proj_hidden_dim=16, proj_dim=8)
    task = EmbedTask(method, f0, load_secret(secret_path), lambda_cl=0.3, lambda_wm=2.0, lambda_dev=0.5,
                     lambda_key=1.5, lambda_keep=0.7)
    x = torch.rand(6, 3, 8, 8)
    out = task({"views": [x, x.flip(-1)], "aug": x, "clean": x, "key_aug": x[:1]})
    expect = (0.3 * out["loss_cl"] + 2.0 * out["loss_wm"] + 0.5 * out["loss_dev"] + 1.5 * out["loss_key"]
              + 0.7 * out["loss_keep"])
    assert out["loss"].item() == pytest.approx(expect.item(), rel=1e-6)


def test_loss_scales_average_the_wm_dev_and_keep_terms_over_the_resized_inputs(f0_and_secret):
    """With loss.scales=[2] the wm, dev and keep terms are the mean of the terms at 8 px and on every image (marked,
    augmented, clean, key) resized to 16 px; cl and key are the input size's alone."""
    from dist_awenc.ssl.methods import build_method
    from dist_awenc.verify.resize import resize_images

    _, f0_path, secret_path = f0_and_secret
    f0, _ = load_encoder(f0_path)
    secret = load_secret(secret_path)
    torch.manual_seed(0)
    method = build_method("simclr", _encoder(), 32, proj_hidden_dim=16, proj_dim=8)
    plain = EmbedTask(method, f0, secret)
    scaled = EmbedTask(method, f0, secret, scales=[2])
    x = torch.rand(6, 3, 8, 8)
    inputs = {"views": [x, x.flip(-1)], "aug": x, "clean": x, "key_aug": x[:1]}
    sizes = []
    hook = method.backbone.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[-1]))
    a, b = plain(inputs), scaled(inputs)
    hook.remove()
    assert 16 in sizes
    f = method.backbone
    up = lambda t: resize_images(t, 16)  # noqa: E731
    marked = (x + secret.delta).clamp(0, 1)
    with torch.no_grad():
        f_m, f_a, f_c, f_k = f(up(marked)), f(up(x)), f(up(x)), f(up(secret.key[None]))
        at16 = {"wm": surround_key_loss(f_m, f_k), "dev": deviate_loss(f_m, f_a), "keep": preserve_loss(f_c, f0(up(x)))}
    for k in ("wm", "dev", "keep"):
        assert b[f"loss_{k}"].item() == pytest.approx((a[f"loss_{k}"].item() + at16[k].item()) / 2, rel=1e-5), k
    for k in ("cl", "key"):
        assert b[f"loss_{k}"].item() == pytest.approx(a[f"loss_{k}"].item(), rel=1e-6), k
    b["loss"].backward()
    assert all(p.grad is not None for p in f.parameters() if p.requires_grad)


@pytest.mark.parametrize("scales", ["[1]", "[0]", "[-2]", "[2,2]"])
def test_bad_loss_scales_are_one_line_errors(scales):
    from dist_awenc.errors import ConfigError

    with pytest.raises(ConfigError, match=r"loss.scales: need distinct input-size factors > 0 other than 1"):
        load_config(EmbedConfig, None, [f"loss.scales={scales}"])


def test_batchnorm_statistics_stay_frozen_while_embedding(f0_and_secret):
    from dist_awenc.ssl.methods import build_method

    _, _, secret_path = f0_and_secret
    torch.manual_seed(0)
    enc = build_encoder("tiny", {"width": 8, "norm": "batch"}, [0.5] * 3, [0.5] * 3, 8)
    task = EmbedTask(build_method("simclr", enc, 32, proj_hidden_dim=16, proj_dim=8), enc, load_secret(secret_path))
    task.train()
    bn = next(m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    x = torch.rand(6, 3, 8, 8)
    task({"views": [x, x], "aug": x, "clean": x, "key_aug": x[:1]})["loss"].backward()
    assert torch.equal(before, task.method.backbone.backbone.features[1].running_mean)


@pytest.mark.numerics
def test_interrupted_embedding_resumes_bit_for_bit(f0_and_secret, tmp_path):
    root, f0, secret = f0_and_secret
    full = embed(_embed_cfg(root, f0, secret, tmp_path, "full"))
    with pytest.raises(Interrupted):
        embed(_embed_cfg(root, f0, secret, tmp_path, "cut"), interrupt_at=2)
    resumed = embed(_embed_cfg(root, f0, secret, tmp_path, "cut"))
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _two_process_embed(root: str, f0: str, secret: str, extra: dict) -> None:
    embed(_embed_cfg(root, f0, secret, root, "two", **extra))


@pytest.mark.parametrize("extra", [{}, {"robust.transforms": "[jpeg,resize,crop,noise,blur]", "robust.p_identity": 0.1}],
                         ids=["plain", "transforms"])
@pytest.mark.numerics
def test_embedding_on_two_processes_equals_one_process(f0_and_secret, tmp_path, extra):
    """Joint loss (gathered NT-Xent + watermark terms) on 2 gloo ranks == 1 process on the same global batch;
    with transforms, each rank transforms its slice of the global batch's draws (seeded by run seed and step)."""
    root, f0, secret = f0_and_secret
    one = embed(_embed_cfg(root, f0, secret, tmp_path, "one", **extra))
    spawn_launch(_two_process_embed, (str(tmp_path), str(f0), str(secret), extra), tmp_path)
    a, b = weights(one), weights(tmp_path / "two" / "encoder.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    one_rows = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two_rows = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for r1, r2 in zip(one_rows, two_rows):
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-4)


def test_the_same_secret_always_has_the_same_hash(tmp_path):
    from dist_awenc.watermark.secret import save_secret

    make = lambda: Secret(key=torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1)),  # noqa: E731
                          delta=(8 / 255) * torch.sign(torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(2))),
                          eps=8 / 255, control_seed=3, meta={"b": 1, "a": "x", "encoder_sha256": "0" * 64})
    hashes = {save_secret(make(), tmp_path / f"s{i}") for i in range(8)}
    assert len(hashes) == 1
    assert load_secret(tmp_path / "s0.safetensors").meta == {"b": 1, "a": "x", "encoder_sha256": "0" * 64}
