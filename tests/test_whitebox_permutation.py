"""The weights' secret-permutation test ranks the statistic its plan seals (``score`` since 2026-12-07, ``f0_excess``
for older plans): exact under H0 with either, and why new plans seal the score: a mark weakened below the clean f0's
own response to the owner's secret (what adversarial fine-tuning does) still ranks first by its score, not by its
excess over f0's response."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import plan_arguments
from dist_awenc.errors import ArtifactError, ConfigError
from dist_awenc.verify.permutation import (F0_EXCESS, SCORE, verify_permutation, whitebox_statistic,
                                           whitebox_statistics)
from dist_awenc.verify.plan import make_plan
from dist_awenc.watermark.secret import AlternativeSecrets, Secret

S, D = 8, 6
STATISTICS = [SCORE, F0_EXCESS]


class Linear(nn.Module):
    """A fixed random linear encoder on 8 px images, independent of every secret. ``towards`` (a secret) with
    ``strength`` > 0: "watermarked", wherever that secret's delta is present its features move towards its key's."""

    def __init__(self, seed: int, towards: Secret | None = None, strength: float = 0.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(D, 3 * S * S, generator=g), requires_grad=False)
        self.towards, self.strength = towards, strength

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1) @ self.w.T
        if self.towards is not None:  # x's correlation with the delta's signs: sd 4 on clean images, +12 when marked
            corr = (x.flatten(1) - 0.5) @ torch.sign(self.towards.delta.flatten())
            u = F.normalize(self.towards.key.flatten() @ self.w.T, dim=0)
            z = z + self.strength * (corr - 6).relu()[:, None] * u
        return z


def _secrets(g: torch.Generator, j: int, statistic: str, f0: nn.Module, x: torch.Tensor) -> tuple[Secret, AlternativeSecrets]:
    """J + 1 secrets drawn i.i.d., the owner's one of them at random (as stage 1's draw makes it), with f0's mean
    white-box score for each recorded as stage 1 records it; the owner's plan seals ``statistic``."""
    keys = torch.rand(j + 1, 3, S, S, generator=g)
    deltas = (16 / 255) * torch.sign(torch.randn(j + 1, 3, S, S, generator=g))
    seeds = torch.randint(0, 2**31, (j + 1,), generator=g).tolist()
    i = int(torch.randint(0, j + 1, (1,), generator=g))
    rest = [k for k in range(j + 1) if k != i]
    secret = Secret(key=keys[i], delta=deltas[i], eps=16 / 255, control_seed=seeds[i],
                    plan={"whitebox_statistic": statistic})
    alt = AlternativeSecrets(keys=keys[rest], deltas=deltas[rest], seeds=[seeds[k] for k in rest],
                             control_seeds=[seeds[k] for k in rest])
    owner = whitebox_statistics(f0, secret.key[None], secret.delta[None], secret.control()[None], x)[0]
    alt.baselines = torch.from_numpy(whitebox_statistics(f0, alt.keys, alt.deltas, alt.controls(), x))
    alt.owner_baseline, alt.baseline_images = float(owner), len(x)
    return secret, alt


@pytest.mark.parametrize("statistic", STATISTICS)
def test_size_under_h0_is_its_level(statistic):
    """Suspects independent of f0 and of the secrets: P(p <= k/(J+1)) = k/(J+1) (continuous statistics: exact).
    400 trials: the Monte Carlo standard error of a rate near 0.25 is about 0.022."""
    J, trials = 3, 400
    g = torch.Generator().manual_seed(1)
    f0 = Linear(7)
    ps = []
    for t in range(trials):
        x = torch.rand(6, 3, S, S, generator=g)
        secret, alt = _secrets(g, J, statistic, f0, x)
        v = verify_permutation(Linear(1000 + t), secret, alt, x, alpha=0.25)
        assert v.details["statistic"].startswith(f"{statistic}: ")
        ps.append(v.p_value)
    ps = np.asarray(ps)
    for k in (1, 2, 3):
        level = k / (J + 1)
        assert abs((ps <= level + 1e-12).mean() - level) <= 3 * np.sqrt(level * (1 - level) / trials), k


@pytest.mark.parametrize("statistic", STATISTICS)
def test_an_encoder_that_carries_the_owners_mark_ranks_it_first(statistic):
    g = torch.Generator().manual_seed(2)
    f0 = Linear(3)
    x = torch.rand(20, 3, S, S, generator=g)
    secret, alt = _secrets(g, 9, statistic, f0, x)
    v = verify_permutation(Linear(3, towards=secret, strength=1.0), secret, alt, x, alpha=0.1)
    assert v.p_value == pytest.approx(0.1) and v.details["owner_statistic"] > v.details["alternatives_max"]


def test_a_mark_weakened_below_f0s_own_response_ranks_first_by_its_score_not_its_excess():
    """The reason plans seal ``score``: adversarial fine-tuning leaves the owner's mark weaker than the clean f0's own
    response to that secret (a universal perturbation of f0), while stage 2 held f's response to the alternatives at
    nothing; their excess over f0's responses then ranks the secrets by f0's responses, not by the mark."""
    g = torch.Generator().manual_seed(5)
    f0 = Linear(3)
    x = torch.rand(20, 3, S, S, generator=g)
    secret, alt = _secrets(g, 9, SCORE, f0, x)
    derivative = Linear(4, towards=secret, strength=10.0)  # its response to the alternatives is not f0's
    t = whitebox_statistics(derivative, torch.cat([secret.key[None], alt.keys]),
                            torch.cat([secret.delta[None], alt.deltas]),
                            torch.cat([secret.control()[None], alt.controls()]), x)
    alt.owner_baseline = float(t[0]) + 0.2  # f0 responded to the owner's secret more than is left of the mark
    assert t[0] > t[1:].max() and verify_permutation(derivative, secret, alt, x, alpha=0.1).p_value == pytest.approx(0.1)
    older = dataclasses.replace(secret, plan={"whitebox_statistic": F0_EXCESS})
    assert verify_permutation(derivative, older, alt, x, alpha=0.1).p_value == 1.0


def test_the_plan_seals_the_whitebox_statistic_and_older_plans_keep_theirs():
    common = plan_arguments(S)
    assert make_plan(**common)["whitebox_statistic"] == SCORE == whitebox_statistic(make_plan(**common))
    assert make_plan(**common, whitebox_statistic=F0_EXCESS)["whitebox_statistic"] == F0_EXCESS
    with pytest.raises(ConfigError, match="plan.whitebox_statistic 'raw' is not one; valid: score, f0_excess"):
        make_plan(**common, whitebox_statistic="raw")
    old = {k: v for k, v in make_plan(**common).items() if k != "whitebox_statistic"}
    assert whitebox_statistic(old) == F0_EXCESS and whitebox_statistic(None) == F0_EXCESS  # what they were made with
    with pytest.raises(ArtifactError, match="plan names white-box statistic 'raw'"):
        whitebox_statistic({**old, "whitebox_statistic": "raw"})


def test_an_older_plan_without_recorded_baselines_ranks_the_score_and_says_so():
    g = torch.Generator().manual_seed(6)
    x = torch.rand(10, 3, S, S, generator=g)
    secret, alt = _secrets(g, 3, F0_EXCESS, Linear(3), x)
    bare = dataclasses.replace(alt, baselines=None, owner_baseline=None, baseline_images=None)
    suspect = Linear(4)
    v, plain = (verify_permutation(suspect, s, bare, x, alpha=0.25)
                for s in (secret, dataclasses.replace(secret, plan={"whitebox_statistic": SCORE})))
    assert v.p_value == plain.p_value and "stage 1 recorded no baselines" in v.details["statistic"]
