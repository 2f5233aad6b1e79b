"""Stage 2's specificity term (dist_awenc/watermark/specific.py): the draw, that the term is the permutation test's
statistic held at f0's (or, with ``suppress``, below it) and trains f only, and an embedding that uses it, resumes
bit for bit and refuses a plan without alternatives."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_f0_and_secret, weights
from dist_awenc.config import EmbedConfig, load_config
from dist_awenc.encoders.io import build_encoder
from dist_awenc.errors import ConfigError
from dist_awenc.verify.permutation import whitebox_statistics
from dist_awenc.watermark.embed import embed
from dist_awenc.watermark.secret import AlternativeSecrets
from dist_awenc.watermark.specific import Specificity, draw_alternatives


def _encoder(seed: int):
    torch.manual_seed(seed)
    return build_encoder("tiny", {"width": 8, "norm": "group"}, [0.5] * 3, [0.5] * 3, 8)


def _alternatives(j: int = 6) -> AlternativeSecrets:
    g = torch.Generator().manual_seed(0)
    return AlternativeSecrets(keys=torch.rand(j, 3, 8, 8, generator=g),
                              deltas=(torch.rand(j, 3, 8, 8, generator=g) - 0.5) * 0.2,
                              seeds=list(range(j)), control_seeds=list(range(100, 100 + j)))


def test_the_draw_depends_on_seed_and_step_only_and_picks_distinct_alternatives():
    a = draw_alternatives(0, 5, 999, 4)
    assert torch.equal(a, draw_alternatives(0, 5, 999, 4)) and len(set(a.tolist())) == 4
    assert not torch.equal(a, draw_alternatives(0, 6, 999, 4)) or not torch.equal(a, draw_alternatives(1, 5, 999, 4))
    assert sorted(draw_alternatives(0, 0, 3, 8).tolist()) == [0, 1, 2]  # capped at J by Specificity, distinct anyway


def test_the_term_is_the_permutation_statistic_of_f_over_f0s_and_trains_f_only():
    alt, f0, f = _alternatives(), _encoder(0), _encoder(1)
    x = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    spec = Specificity(alt, secrets=3, images=32)
    picked = torch.tensor([0, 2, 5])
    out = spec.term(f, f0, x, picked)
    stat = lambda e: whitebox_statistics(e, alt.keys[picked], alt.deltas[picked], alt.controls()[picked], x)  # noqa: E731
    excess = torch.as_tensor(stat(f) - stat(f0))
    assert out["specific_excess"].item() == pytest.approx(excess.mean().item(), abs=1e-5)
    assert out["specific"].item() == pytest.approx(torch.relu(excess).mean().item(), abs=1e-5)
    f0.requires_grad_(False)
    if out["specific"].item() > 0:
        out["specific"].backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in f.parameters())
    same = spec.term(f0, f0, x, picked)  # f = f0: nothing to hold
    assert same["specific"].item() == pytest.approx(0.0, abs=1e-6)


def test_suppress_lowers_the_target_to_a_share_of_f0s_response():
    """suppress s: the target is (1 - s) T_f0; s = 1 holds f's response at its controls' (T = 0), so f0 itself, with
    a positive response to an alternative, now pays for it."""
    alt, f0, f = _alternatives(), _encoder(0), _encoder(1)
    x = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    picked = torch.tensor([0, 2, 5])
    stat = lambda e: torch.as_tensor(  # noqa: E731
        whitebox_statistics(e, alt.keys[picked], alt.deltas[picked], alt.controls()[picked], x))
    for s in (0.0, 0.5, 1.0):
        out = Specificity(alt, secrets=3, images=32, suppress=s).term(f, f0, x, picked)
        excess = stat(f) - (1 - s) * stat(f0)
        assert out["specific_excess"].item() == pytest.approx(excess.mean().item(), abs=1e-5)
        assert out["specific"].item() == pytest.approx(torch.relu(excess).mean().item(), abs=1e-5)
    held_at_controls = Specificity(alt, secrets=3, images=32, suppress=1.0).term(f0, f0, x, picked)
    assert held_at_controls["specific"].item() == pytest.approx(torch.relu(stat(f0)).mean().item(), abs=1e-5)
    assert held_at_controls["specific"].item() > 0  # f0 responds to some alternative: s = 1 asks f for less


@pytest.mark.parametrize("override, message", [("specific.weight=-1", "specific: need weight >= 0"),
                                               ("specific.secrets=0", "secrets >= 1"),
                                               ("specific.suppress=1.5", r"specific.suppress: need a share in \[0, 1\]"),
                                               ("specific.suppress=-0.1", r"specific.suppress: need a share in \[0, 1\]")])
def test_bad_specific_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(EmbedConfig, None, [override])
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def f0_and_secrets(tmp_path_factory):
    root = tmp_path_factory.mktemp("specific")
    _, f0, with_alt = tiny_f0_and_secret(root, "generation.steps=5", "generation.batch_size=16", "plan.alternatives=3")
    return f0, with_alt


def _cfg(f0, secret, out, name, *extra) -> EmbedConfig:
    over = {"run.out_dir": out, "run.name": name, "encoder": f0, "secret": secret, "data.image_size": 8,
            "train.batch_size": 32, "train.epochs": 1, "train.max_steps": 4, "train.checkpoint_every": 2,
            "train.log_every": 1, "train.progress": False, "specific.weight": 3.0, "specific.secrets": 2,
            "specific.images": 8}
    return load_config(EmbedConfig, None, [f"{k}={v}" for k, v in over.items()] + list(extra))


@pytest.mark.numerics
def test_embedding_holds_alternatives_logs_the_term_and_resumes_bit_for_bit(f0_and_secrets, tmp_path):
    from dist_awenc.engine.loop import Interrupted

    f0, secret = f0_and_secrets
    full = embed(_cfg(f0, secret, tmp_path, "full"))
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_specific", "specific_excess"} <= set(rows[-1])
    assert rows[-1]["loss"] == pytest.approx(sum(rows[-1][f"loss_{k}"] * w for k, w in
                                                 [("cl", 1), ("wm", 1), ("dev", 0.5), ("key", 1), ("keep", 1),
                                                  ("specific", 3.0)]), rel=1e-5)
    with pytest.raises(Interrupted):
        embed(_cfg(f0, secret, tmp_path, "cut"), interrupt_at=2)
    resumed = embed(_cfg(f0, secret, tmp_path, "cut"))
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage_2_warns_when_the_plan_ranks_the_score_and_the_alternatives_are_not_suppressed(f0_and_secrets, tmp_path,
                                                                                           capsys):
    """A plan sealing the white-box statistic `score` (the default) suits a release whose stage 2 suppresses the
    alternatives; embedding it otherwise says which plan suits that release instead."""
    f0, secret = f0_and_secrets
    for name, extra, warned in [("held", [], True), ("plain", ["specific.weight=0"], True),
                                ("suppressed", ["specific.suppress=1"], False)]:
        embed(_cfg(f0, secret, tmp_path, name, "train.max_steps=1", "train.checkpoint_every=1", *extra))
        assert ("or for this stage 2 make the secret with plan.whitebox_statistic=f0_excess"
                in capsys.readouterr().err) == warned, name


def test_a_plan_without_alternatives_is_refused_in_one_line(f0_and_secrets, tmp_path):
    f0, secret = f0_and_secrets
    from dist_awenc.config import WatermarkConfig
    from dist_awenc.watermark.generate import watermark

    bare = watermark(load_config(WatermarkConfig, None, [f"run.out_dir={tmp_path}", "run.name=bare", f"encoder={f0}",
                                                         "data.image_size=8", "generation.steps=2",
                                                         "generation.batch_size=8", "plan.alternatives=0"]))
    with pytest.raises(ConfigError, match="plan has none") as e:
        embed(_cfg(f0, bare, tmp_path, "refused"))
    assert "\n" not in str(e.value)


def test_the_stage_says_what_the_alternatives_are_held_at():
    from dist_awenc.watermark.embed import _target

    assert [_target(k) for k in (1.0, 0.0, 0.5)] == ["f0's response", "their controls' response", "0.5 x f0's response"]


def test_suppress_1_does_not_run_f0():
    """With the alternatives held at their controls' response, f0's forward pass is skipped (a quarter of the term's
    cost), and the term is the same as computing f0's response and multiplying it by 0."""
    alt, f0, f = _alternatives(), _encoder(0), _encoder(1)
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    picked = torch.tensor([1, 3])
    calls = []
    handle = f0.register_forward_hook(lambda *_: calls.append(1))
    out = Specificity(alt, secrets=2, images=16, suppress=1.0).term(f, f0, x, picked)
    handle.remove()
    assert calls == []
    stat = torch.as_tensor(whitebox_statistics(f, alt.keys[picked], alt.deltas[picked], alt.controls()[picked], x))
    assert out["specific"].item() == pytest.approx(torch.relu(stat).mean().item(), abs=1e-5)
