"""Stage 2's shadow student (dist_awenc/watermark/shadow.py): which weights each term trains, that the term does
what it is for (a distillation step on f's answers raises the student's watermark effect), restarts, the config."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_f0_and_secret, weights
from dist_awenc.config import EmbedConfig, load_config
from dist_awenc.encoders.io import build_encoder
from dist_awenc.errors import ConfigError
from dist_awenc.watermark.embed import embed
from dist_awenc.watermark.shadow import Shadow, build_shadow

CARD = {"arch": "tiny", "arch_kwargs": {"width": 8, "norm": "group"}}


def _encoder(seed: int):
    torch.manual_seed(seed)
    return build_encoder("tiny", CARD["arch_kwargs"], [0.5] * 3, [0.5] * 3, 8)


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    f = _encoder(seed)
    shadow = Shadow(build_shadow(f, CARD, "", seed=1), 1, "", CARD)
    aug = torch.rand(16, 3, 8, 8, generator=g)
    delta = (torch.rand(3, 8, 8, generator=g) - 0.5) * 0.2
    key = torch.rand(1, 3, 8, 8, generator=g)
    return f, shadow, aug, (aug + delta).clamp(0, 1), key


def _grads(module):
    return [p.grad for p in module.parameters()]


def test_the_shadow_term_trains_f_only_and_the_steal_term_trains_the_shadow_only():
    f, shadow, aug, marked, key = _setup()
    shadow.terms(aug, f(aug), marked, key)["shadow"].backward()
    assert all(g is None or not g.any() for g in _grads(shadow.student))
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(f))

    f, shadow, aug, marked, key = _setup()
    shadow.terms(aug, f(aug), marked, key)["steal"].backward()
    assert all(g is None or not g.any() for g in _grads(f))
    assert all(g is not None for g in _grads(shadow.student))


def _effect_after_one_distillation_step(f, shadow, aug, marked, key, lr: float) -> tuple[float, float]:
    """The student's watermark effect before and after one SGD step on its distillation loss from f's answers."""
    student = shadow.student
    before = shadow.terms(aug, f(aug).detach(), marked, key)["shadow_effect"].item()
    params = list(student.parameters())
    loss = shadow.terms(aug, f(aug).detach(), marked, key)["steal"]
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * g / torch.cat([x.flatten() for x in grads]).norm()
    after = shadow.terms(aug, f(aug).detach(), marked, key)["shadow_effect"].item()
    with torch.no_grad():  # undo the step
        for p, g in zip(params, grads):
            p += lr * g / torch.cat([x.flatten() for x in grads]).norm()
    return before, after


def test_training_f_on_the_shadow_term_makes_distilling_f_teach_the_watermark():
    """What the term is for: after f is trained on it, a pirate's distillation step on f's clean answers raises the
    student's watermark effect (it did not before), and the gradient cosine that the term maximises has risen."""
    f, shadow, aug, marked, key = _setup()
    b0, a0 = _effect_after_one_distillation_step(f, shadow, aug, marked, key, lr=0.05)
    start = shadow.terms(aug, f(aug), marked, key)["shadow"].item()
    opt = torch.optim.Adam(f.parameters(), lr=3e-3)
    for _ in range(40):
        opt.zero_grad()
        shadow.terms(aug, f(aug), marked, key)["shadow"].backward()
        opt.step()
    end = shadow.terms(aug, f(aug), marked, key)["shadow"].item()
    b1, a1 = _effect_after_one_distillation_step(f, shadow, aug, marked, key, lr=0.05)
    assert end < start - 0.3, (start, end)
    assert b1 == pytest.approx(b0, abs=1e-6)  # the student itself was not trained
    assert a1 - b1 > 0 and a1 - b1 > 5 * abs(a0 - b0), ((b0, a0), (b1, a1))


def test_restart_draws_a_fresh_seeded_student():
    f = _encoder(0)
    shadow = Shadow(build_shadow(f, CARD, "", seed=3), 3, "", CARD)
    with torch.no_grad():
        for p in shadow.student.parameters():
            p.add_(1.0)
    shadow.restart(2)
    same = build_shadow(f, CARD, "", seed=3, refresh_index=2).state_dict()
    other = build_shadow(f, CARD, "", seed=3, refresh_index=1).state_dict()
    now = shadow.student.state_dict()
    assert all(torch.equal(now[k], same[k]) for k in same)
    assert any(not torch.equal(now[k], other[k]) for k in other)
    assert not torch.equal(build_shadow(f, CARD, "", seed=3).state_dict()["backbone.features.0.weight"],
                           build_shadow(f, CARD, "", seed=4).state_dict()["backbone.features.0.weight"])


@pytest.mark.parametrize("override, message", [
    ("shadow.weight=-1", "shadow.weight must be >= 0"),
    ("shadow.refresh=-2", "shadow.refresh must be >= 0"),
    ("shadow.arch=vgg99", "shadow.arch: unknown encoder 'vgg99'"),
])
def test_bad_shadow_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(EmbedConfig, None, [override])
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def f0_and_secret(tmp_path_factory):
    return tiny_f0_and_secret(tmp_path_factory.mktemp("shadow"), "generation.steps=10", "generation.batch_size=32")


def _cfg(f0, secret, out, name, *extra) -> EmbedConfig:
    over = {"run.out_dir": out, "run.name": name, "encoder": f0, "secret": secret, "data.image_size": 8,
            "train.batch_size": 32, "train.epochs": 1, "train.max_steps": 4, "train.checkpoint_every": 2,
            "train.log_every": 1, "train.progress": False, "shadow.weight": 2.0}
    return load_config(EmbedConfig, None, [f"{k}={v}" for k, v in over.items()] + list(extra))


@pytest.mark.numerics
def test_embedding_with_a_shadow_logs_its_terms_restarts_and_resumes_bit_for_bit(f0_and_secret, tmp_path):
    from dist_awenc.engine.loop import Interrupted

    _, f0, secret = f0_and_secret
    full = embed(_cfg(f0, secret, tmp_path, "full", "shadow.refresh=3"))
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_steal", "loss_shadow", "shadow_effect"} <= set(rows[-1])
    assert rows[-1]["loss"] == pytest.approx(sum(rows[-1][f"loss_{k}"] * w for k, w in
                                                 [("cl", 1), ("wm", 1), ("dev", 0.5), ("key", 1), ("keep", 1),
                                                  ("steal", 1), ("shadow", 2.0)]), rel=1e-5)
    with pytest.raises(Interrupted):
        embed(_cfg(f0, secret, tmp_path, "cut", "shadow.refresh=3"), interrupt_at=2)
    resumed = embed(_cfg(f0, secret, tmp_path, "cut", "shadow.refresh=3"))
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = weights(embed(_cfg(f0, secret, tmp_path, "plain", "shadow.weight=0")))
    assert any(not torch.equal(a[k], plain[k]) for k in a)  # the term changed the watermarked encoder


def test_a_shadow_under_deepspeed_is_refused_before_the_run_folder_exists(f0_and_secret, tmp_path):
    _, f0, secret = f0_and_secret
    with pytest.raises(ConfigError, match="not supported under train.deepspeed") as e:
        embed(_cfg(f0, secret, tmp_path, "ds", "train.deepspeed=configs/deepspeed/zero2.json"))
    assert "\n" not in str(e.value) and not (tmp_path / "ds").exists()
