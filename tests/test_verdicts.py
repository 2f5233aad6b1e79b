"""The decision procedure: encoder-level p-values only, at p <= alpha, Holm across a suspect's tests, made in one place.

The simulations draw synthetic null families from one population, calibrate on m' of them and decide on fresh
ones, and check the procedure's encoder-level false-positive rate against its stated level (with the Monte Carlo
error stated). They also show why the image-level p must not decide: on the same population it calls most
innocent encoders owned.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from dist_awenc.verify.calibration import Calibration, label_key, mode_test, tau_star
from dist_awenc.verify.core import Verdict, overall_verdict, round_up
from dist_awenc.verify.permutation import PERMUTATION
from dist_awenc.verify.run import calibrated_p
from dist_awenc.verify.stats import permutation_p, sign_test_critical

N = 64  # images per simulated verification


def _mc_bound(rate: float, reps: int) -> float:
    """The stated level plus three Monte Carlo standard errors of a rate estimated from ``reps`` trials."""
    return rate + 3 * math.sqrt(rate * (1 - rate) / reps)


def _tau_stars(scores: np.ndarray, alpha: float) -> np.ndarray:
    """tau* of the white-box sign test for each row of ``scores`` (R, n), vectorised: the c-th largest score, c the
    sign test's critical count (p <= alpha exactly when at least c scores exceed the margin)."""
    c = sign_test_critical(scores.shape[1], alpha)
    return np.sort(scores, axis=1)[:, -c]


def test_vectorised_tau_star_is_the_calibrations():
    rng = np.random.default_rng(1)
    for alpha in (1e-3, 0.05):
        s = rng.normal(0.05, 0.1, size=(5, N))
        fast = _tau_stars(s, alpha)
        for row, t in zip(s, fast):
            assert tau_star("whitebox", row, alpha) == pytest.approx(t, abs=1e-9)


def _null_population(rng, families: int, copies: int = 1) -> np.ndarray:
    """White-box scores of null encoders: each family has its own transfer level (a universal perturbation partly
    transfers to encoders that never saw it) shared by its parent and attacked copies. Shape (families, copies, N)."""
    level = rng.normal(0.04, 0.02, size=(families, 1, 1))
    return level + rng.normal(0.0, 0.08, size=(families, copies, N))


def _calibration(family_scores: np.ndarray) -> Calibration:
    null = [{"encoder": f"e{i}", "family": f"f{i}", "heldout": False, "tau_star": float(t)}
            for i, t in enumerate(family_scores)]
    data = {"modes": {"whitebox": {"threshold": float(family_scores.max()) + 1e-6, "null": null,
                                   "heldout": {"families": 0, "false_positive_families": 0,
                                               "heldout_fpr_upper_95": None}}}}
    return Calibration(Path("cal.json"), "c" * 64, {"whitebox": data["modes"]["whitebox"]["threshold"]}, {}, data)


@pytest.mark.parametrize("copies", [1, 3])
def test_conformal_p_holds_its_level_on_fresh_null_encoders(copies):
    """Calibrate on m' = 19 families (a family = a parent and its attacked copies, scored by its largest tau*),
    decide on a fresh null encoder: P(p <= alpha) <= alpha. With one encoder per family the conformal p is exact
    (the rate is alpha itself, up to Monte Carlo error); with copies it is conservative."""
    rng = np.random.default_rng(copies)
    alpha, m, reps = 0.1, 19, 4000
    cal_scores = _tau_stars(_null_population(rng, m * reps, copies).reshape(-1, N), 1e-3).reshape(reps, m, copies).max(2)
    suspect = _tau_stars(_null_population(rng, reps).reshape(reps, N), 1e-3)
    p = (1 + (cal_scores >= suspect[:, None]).sum(1)) / (m + 1)
    fpr = float(np.mean(p <= alpha))
    assert fpr <= _mc_bound(alpha, reps), fpr
    if copies == 1:
        assert fpr >= alpha - 3 * math.sqrt(alpha * (1 - alpha) / reps)  # exact, not merely conservative


def test_the_calibrated_verdict_uses_the_conformal_p_and_decides_only_through_holm():
    rng = np.random.default_rng(5)
    alpha, m, reps, fp, image_level = 0.1, 19, 300, 0, 0
    for r in range(reps):
        cal = _calibration(_tau_stars(_null_population(rng, m).reshape(m, N), alpha))
        s = _null_population(rng, 1).reshape(N)
        v = Verdict("whitebox", None, float(s.mean()), N, cal.thresholds["whitebox"], alpha, False, "s" * 64,
                    image_p=mode_test("whitebox", s, cal.thresholds["whitebox"]).p_value, samples=s)
        calibrated_p(v, cal)
        t_s = tau_star("whitebox", s, alpha)
        expect = (1 + sum(t >= t_s - 1e-12 for t in cal.family_scores("whitebox"))) / (m + 1)
        assert v.p_value == pytest.approx(expect) and v.p_floor == pytest.approx(1 / (m + 1))
        fp += overall_verdict([v], alpha)["decision"]
        image_level += mode_test("whitebox", s, 0.0).p_value <= alpha  # the image-level p against no margin
    assert fp / reps <= _mc_bound(alpha, reps)
    # the bug this rule fixes: the image-level p calls most innocent encoders of this population "owned"
    assert image_level / reps > 0.5


def test_permutation_p_holds_its_level_when_the_suspect_transfers_every_secret():
    """Under H0 the owner's secret is one of J + 1 exchangeable draws even when the suspect responds to universal
    perturbations in general (a shared, encoder-level shift): P(p <= alpha) <= alpha at J = 19, alpha = 0.05."""
    rng = np.random.default_rng(3)
    alpha, J, reps = 0.05, 19, 6000
    shift = rng.normal(0.1, 0.05, size=(reps, 1))
    t = shift + rng.normal(0, 0.02, size=(reps, J + 1))  # column 0 the owner's secret
    p = np.array([permutation_p(row[0], row[1:]) for row in t])
    assert float(np.mean(p <= alpha)) <= _mc_bound(alpha, reps)
    assert float(np.mean(p <= alpha)) >= alpha - 3 * math.sqrt(alpha * (1 - alpha) / reps)  # exact


def test_the_excess_over_f0_keeps_the_permutation_p_exact_and_sharpens_it():
    """Ranking each secret's score minus f0's score with it (a fixed function of each secret) keeps the owner's
    secret exchangeable under H0: the size is alpha. Where some secrets transfer better than others to every encoder
    (a per-secret quality shared by f0, the suspect and the alternatives), the excess cancels it: a marked suspect's
    owner z-score rises."""
    rng = np.random.default_rng(4)
    alpha, J, reps = 0.05, 19, 4000
    quality = rng.normal(0.0, 0.03, size=(reps, J + 1))  # how well each secret transfers, column 0 the owner's
    f0 = 0.06 + quality + rng.normal(0, 0.005, size=(reps, J + 1))
    null = rng.normal(0.03, 0.01, size=(reps, 1)) + 0.8 * quality + rng.normal(0, 0.01, size=(reps, J + 1))
    p = np.array([permutation_p(s[0], s[1:]) for s in null - f0])
    assert abs(float(np.mean(p <= alpha)) - alpha) <= 3 * math.sqrt(alpha * (1 - alpha) / reps)
    marked = null.copy()
    marked[:, 0] += 0.04  # the embedded mark answers the owner's secret only
    z = lambda s: (s[:, 0] - s[:, 1:].mean(1)) / s[:, 1:].std(1, ddof=1)  # noqa: E731
    assert float(np.median(z(marked - f0))) > 1.5 * float(np.median(z(marked)))


def _perm(p: float, J: int, alpha: float) -> Verdict:
    return Verdict(PERMUTATION, p, 0.3, 256, None, alpha, False, "s" * 64, {"alternatives": J}, p_floor=1 / (J + 1))


def _margin(p, floor, alpha, mode="whitebox") -> Verdict:
    return Verdict(mode, p, 0.3, 256, 0.05, alpha, False, "s" * 64, image_p=1e-30, p_floor=floor)


def test_the_decision_is_p_at_most_alpha_and_reachable():
    # J = 999 reaches 1e-3 with p <= alpha (p < alpha never could)
    v = _perm(1 / 1000, 999, 1e-3)
    assert overall_verdict([v], 1e-3)["decision"] is True and v.decision is True
    # J = 19 cannot reach 1e-3: left out, no decision, and the line says why
    v = _perm(1 / 20, 19, 1e-3)
    o = overall_verdict([v], 1e-3)
    assert o["decision"] is False and o["family"] == [] and "0.05, exceeds alpha" in o["left_out"][PERMUTATION]
    assert "cannot reach alpha=0.001" in v.line() and "OWNERSHIP" not in v.line()
    # at the demo's alpha = 0.05, the same p decides
    assert overall_verdict([_perm(1 / 20, 19, 0.05)], 0.05)["decision"] is True


def test_holm_over_the_tests_that_can_reach_alpha():
    # white-box at 1e-3: a margin calibrated on 30 families (smallest p 1/31) never rejects, so it is left out and
    # the permutation test decides alone at J = 999 (inside a Holm pair it would need p <= 5e-4, J >= 1999)
    perm, margin = _perm(1 / 1000, 999, 1e-3), _margin(1 / 31, 1 / 31, 1e-3)
    o = overall_verdict([margin, perm], 1e-3)
    assert o["decision"] is True and o["family"] == [PERMUTATION] and "whitebox" in o["left_out"]
    assert margin.decision is False and perm.decision is True
    # two tests that can both reach alpha: Holm's step-down (alpha/2 first)
    a, b = _margin(6e-4, 1e-4, 1e-3, "blackbox_score"), _perm(1e-3, 999, 1e-3)
    o = overall_verdict([a, b], 1e-3)
    assert o["family"] == ["blackbox_score", PERMUTATION] and o["decision"] is False  # 6e-4 > 1e-3 / 2
    a.p_value = 5e-4
    assert overall_verdict([a, b], 1e-3)["tests"] == {"blackbox_score": True, PERMUTATION: True}
    # an uncalibrated margin has no encoder-level p, whatever its image-level p
    u = _margin(None, None, 1e-3)
    o = overall_verdict([u], 1e-3)
    assert o["decision"] is False and "uncalibrated" in o["left_out"]["whitebox"] and "encoder-level p: none" in u.line()


def test_stating_more_classes_than_the_task_has_does_not_lower_the_label_threshold():
    """The label threshold is the largest over calibrated class counts >= the labels the suspect answered with."""
    LABEL = "blackbox_label"
    thresholds = {LABEL: 0.02, label_key(2): 0.3, label_key(5): 0.1}
    null = {k: [{"encoder": f"e{i}", "family": f"f{i}", "heldout": False, "tau_star": t * i / 10} for i in range(11)]
            for k, t in thresholds.items()}
    data = {"modes": {k: {"threshold": t, "null": null[k], "heldout": {"heldout_fpr_upper_95": 0.2}}
                      for k, t in thresholds.items()}, "label_classes": {"task": 10}}
    cal = Calibration(Path("cal.json"), "c" * 64, thresholds, {}, data)
    rng = np.random.default_rng(0)
    hm, hr = rng.random(49) < 0.6, rng.random(49) < 0.5
    # the verifier stated 5 classes (5's threshold, 0.1), but the suspect answered with only 2 labels
    v = Verdict(LABEL, None, 0.1, 49, 0.1, 1e-3, False, "s" * 64, {"labels_seen": 2}, samples=(hm, hr))
    calibrated_p(v, cal)
    assert v.threshold == 0.3 and "largest over class counts >= labels seen" in v.threshold_source
    assert v.image_p == mode_test(LABEL, (hm, hr), 0.3).p_value
    # answered with more labels than any calibrated count: no decision
    w = Verdict(LABEL, None, 0.1, 49, 0.1, 1e-3, False, "s" * 64, {"labels_seen": 12}, samples=(hm, hr))
    calibrated_p(w, cal)
    assert w.p_value is None and "12 distinct labels" in w.no_decision


def test_bounds_are_rounded_up():
    assert round_up(1 - 0.05 ** (1 / 30)) == 0.096  # 0.09503 printed as a bound is 0.096, never 0.095
    assert round_up(0.25) == 0.25 and round_up(0.1810001) == 0.182
    assert stats.binom.sf(0, 1, 0.5) == 0.5  # scipy present for the size checks above
