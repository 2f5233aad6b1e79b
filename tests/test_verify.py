"""Verification: the margin tests (against scipy), verdicts on a hand-built watermarked toy, the secret file."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from conftest import Watermarked

from dist_awenc.encoders.io import build_encoder, sha256_file
from dist_awenc.errors import ArtifactError, TamperedSecretError
from dist_awenc.evaluate.probe import DownstreamModel
from dist_awenc.verify.core import (collapse_pilot, images_for, verify_blackbox_collapse, verify_blackbox_label,
                                    verify_blackbox_score, verify_whitebox, whitebox_scores)
from dist_awenc.verify.stats import (clopper_pearson_upper, exact_paired_margin_p, margin_sign_test,
                                     paired_proportion_margin)
from dist_awenc.watermark.secret import Secret, load_secret, save_secret

EPS = 16 / 255


# ----------------------------------------------------------------------------- paired proportions (label mode)


def _paired(b: int, c: int, both: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """0/1 arrays with b marked-only, c control-only, ``both`` and ``neither`` concordant pairs (shuffled)."""
    a = np.array([1] * b + [0] * c + [1] * both + [0] * neither)
    r = np.array([0] * b + [1] * c + [1] * both + [0] * neither)
    perm = np.random.default_rng(b * 1000 + c).permutation(len(a))
    return a[perm], r[perm]


@pytest.mark.parametrize("b,c,both,neither", [(30, 10, 20, 40), (12, 3, 5, 80), (4, 9, 50, 37), (1, 0, 0, 5)])
def test_tau_zero_is_mcnemar(b, c, both, neither):
    a, r = _paired(b, c, both, neither)
    res = paired_proportion_margin(a, r, 0.0)
    z = (b - c) / math.sqrt(b + c)
    assert res.statistic == pytest.approx(z, rel=1e-12, abs=1e-12)
    assert res.extra["tango_asymptotic_p"] == pytest.approx(float(stats.norm.sf(z)), rel=1e-10, abs=1e-15)
    assert res.p_value == pytest.approx(exact_paired_margin_p(b, c, len(a), 0.0))
    exact = stats.binomtest(b, b + c, 0.5, alternative="greater").pvalue
    assert res.extra["mcnemar_exact_p"] == pytest.approx(exact, rel=1e-12)
    assert res.extra["discordant_marked"] == b and res.extra["discordant_control"] == c
    assert res.effect == pytest.approx((b - c) / len(a))
    assert res.n == len(a)


@pytest.mark.parametrize("b,c,both,neither,tau", [(30, 10, 20, 40, 0.1), (45, 2, 10, 43, 0.3), (5, 5, 0, 90, 0.05),
                                                 (20, 0, 30, 50, 0.2)])
def test_margin_statistic_matches_restricted_mle(b, c, both, neither, tau):
    """Tango's score statistic, with the null MLE of P(control-only) found numerically (scipy.optimize)."""
    from scipy.optimize import minimize_scalar

    a, r = _paired(b, c, both, neither)
    n = len(a)
    nll = lambda q: -(b * math.log(q + tau) + (c * math.log(q) if c else 0.0)  # noqa: E731
                      + (n - b - c) * math.log(1 - 2 * q - tau))
    q = minimize_scalar(nll, bounds=(1e-12, (1 - tau) / 2 - 1e-12), method="bounded",
                        options={"xatol": 1e-12}).x
    z = (b - c - n * tau) / math.sqrt(n * (2 * q + tau - tau**2))
    res = paired_proportion_margin(a, r, tau)
    assert res.statistic == pytest.approx(z, rel=1e-5, abs=1e-6)
    assert res.extra["tango_asymptotic_p"] == pytest.approx(float(stats.norm.sf(z)), rel=1e-4, abs=1e-9)


def test_margin_makes_rejection_harder():
    a, r = _paired(40, 5, 20, 35)
    p0 = paired_proportion_margin(a, r, 0.0).p_value
    p1 = paired_proportion_margin(a, r, 0.1).p_value
    p3 = paired_proportion_margin(a, r, 0.3).p_value
    assert p0 < p1 < p3
    assert p0 < 1e-6 and p3 > 0.05  # a 0.35 difference is clear, but not clearly above 0.3


def test_no_discordant_pairs():
    a, r = _paired(0, 0, 10, 10)
    res = paired_proportion_margin(a, r, 0.0)
    assert res.p_value == 1.0 and res.extra["mcnemar_exact_p"] == 1.0


def _simulate_rejections(p10: float, p01: float, tau: float, n: int, reps: int, alpha: float, seed: int) -> float:
    rng = np.random.default_rng(seed)
    rejected = 0
    p_of: dict[tuple[int, int], float] = {}  # the paired test reads only the discordant counts: one exact p per pair
    for _ in range(reps):
        u = rng.random(n)
        marked_only = u < p10
        control_only = (u >= p10) & (u < p10 + p01)
        both = (u >= p10 + p01) & (u < p10 + p01 + 0.2)
        hm, hr = marked_only | both, control_only | both
        key = (int(marked_only.sum()), int(control_only.sum()))
        if key not in p_of:
            p_of[key] = paired_proportion_margin(hm, hr, tau).p_value
        rejected += p_of[key] < alpha
    return rejected / reps


def test_size_at_the_margin():
    """True difference exactly tau: the test rejects at about alpha, not more."""
    rate = _simulate_rejections(0.35, 0.05, 0.3, n=100, reps=2000, alpha=0.05, seed=0)
    assert rate <= 0.07


def test_power_well_above_the_margin():
    rate = _simulate_rejections(0.75, 0.05, 0.3, n=100, reps=500, alpha=1e-3, seed=1)
    assert rate > 0.95


def test_paired_proportion_bad_input():
    with pytest.raises(ValueError, match="same length"):
        paired_proportion_margin(np.ones(5), np.ones(4), 0.1)
    with pytest.raises(ValueError, match="same length"):
        paired_proportion_margin(np.ones((2, 3)), np.ones((2, 3)), 0.1)
    with pytest.raises(ValueError, match="same length"):
        paired_proportion_margin(np.ones(0), np.ones(0), 0.1)
    for tau in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="tau"):
            paired_proportion_margin(np.ones(5), np.zeros(5), tau)


# ----------------------------------------------------------------------------- sign test with a margin


def test_sign_test_clearly_above_margin():
    rng = np.random.default_rng(0)
    s = 0.5 + 0.05 * rng.standard_normal(50)
    res = margin_sign_test(s, 0.1)
    assert res.p_value == pytest.approx(0.5**50)
    assert res.extra["t_test_p"] < 1e-8 and res.extra["wilcoxon_p"] < 1e-8
    assert res.effect == pytest.approx(s.mean())
    assert res.extra["median"] == pytest.approx(np.median(s))


def test_sign_test_below_margin():
    rng = np.random.default_rng(1)
    s = 0.05 + 0.05 * rng.standard_normal(40)
    assert margin_sign_test(s, 0.1).p_value > 0.5


def test_sign_test_margin_raises_p():
    s = 0.15 + 0.1 * np.random.default_rng(5).standard_normal(40)
    assert margin_sign_test(s, 0.0).p_value < margin_sign_test(s, 0.1).p_value


def test_sign_test_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        margin_sign_test(np.array([1.0]), 0.1)
    with pytest.raises(ValueError, match="1-d"):
        margin_sign_test(np.ones((3, 3)), 0.1)


# ----------------------------------------------------------------------------- Clopper-Pearson


@pytest.mark.parametrize("n", [1, 10, 300, 1000])
def test_clopper_pearson_zero_events(n):
    assert clopper_pearson_upper(0, n) == pytest.approx(1 - 0.05 ** (1 / n), abs=1e-9)


def test_clopper_pearson_values():
    assert clopper_pearson_upper(0, 300) < 0.01
    assert clopper_pearson_upper(20, 20) == pytest.approx(1.0)
    # one-sided 95% upper bound = beta quantile
    assert clopper_pearson_upper(7, 50) == pytest.approx(stats.beta.ppf(0.95, 8, 43), rel=1e-9)
    bounds = [clopper_pearson_upper(k, 40) for k in range(41)]
    assert all(x < y for x, y in zip(bounds, bounds[1:]))
    assert all(k / 40 <= b for k, b in enumerate(bounds))
    assert clopper_pearson_upper(3, 40, confidence=0.99) > clopper_pearson_upper(3, 40)


def test_clopper_pearson_errors():
    for k, n in [(5, 4), (-1, 4), (0, 0)]:
        with pytest.raises(ValueError):
            clopper_pearson_upper(k, n)


# ----------------------------------------------------------------------------- verdicts on a toy


def _secret(seed: int = 1, control_seed: int = 7) -> Secret:
    g = torch.Generator().manual_seed(seed)
    key = torch.rand(3, 8, 8, generator=g)
    delta = EPS * torch.sign(torch.randn(3, 8, 8, generator=g))
    return Secret(key=key, delta=delta, eps=EPS, control_seed=control_seed, meta={"note": "toy"})


def _images(n: int, seed: int = 2) -> torch.Tensor:
    """Flat-colour 8 px images with faint noise: (n, 3, 8, 8) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    colour = 0.2 + 0.6 * torch.rand(n, 3, 1, 1, generator=g)
    return (colour + 0.02 * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    plain = build_encoder("tiny", {"width": 8, "norm": "group"}, [0.5] * 3, [0.5] * 3, 8).eval()
    secret = _secret()
    x = _images(256)
    with torch.no_grad():
        centre = plain(x).mean(0)
    wm = Watermarked(plain, secret, centre).eval()
    return plain, wm, secret, x, centre


def _downstream(encoder: nn.Module, wm: Watermarked, feature_dim: int, feat_mean: torch.Tensor | None) -> DownstreamModel:
    """4-class linear head; class 0 is the direction of the key's (centred) features."""
    model = DownstreamModel(encoder, feature_dim, 4)
    a = 20.0
    with torch.no_grad():
        if feat_mean is not None:
            model.feat_mean.copy_(feat_mean)
        model.head.weight.copy_(0.1 * torch.randn(4, feature_dim, generator=torch.Generator().manual_seed(3)))
        model.head.weight[0] = F.normalize(wm.f_key, dim=0) * a
        model.head.bias.zero_()
        model.head.bias[0] = -a * wm.f_key.norm() / 2
    return model.eval()


def test_toy_watermark_is_what_it_claims(toy):
    plain, wm, secret, x, _ = toy
    with torch.no_grad():
        assert bool((wm.corr(secret.mark(x)) > secret.eps / 2).all())
        assert not bool((wm.corr(secret.mark_control(x)) > secret.eps / 2).any())
        assert not bool((wm.corr(x) > secret.eps / 2).any())


def test_whitebox_verdicts(toy):
    plain, wm, secret, x, _ = toy
    v = verify_whitebox(wm, secret, x)
    assert v.image_p < 1e-6 and v.p_value is None and v.decision is False
    assert v.effect > 0.5 and v.n == 256 and v.threshold == 0.1 and v.mode == "whitebox"
    assert v.secret_sha256 == secret.sha256
    s = whitebox_scores(wm, secret, x)
    assert s.shape == (256,) and s.min() > 0.1
    v0 = verify_whitebox(plain, secret, x)
    assert v0.decision is False and v0.image_p > 0.5
    assert abs(v0.effect) < 0.1
    # an uncalibrated margin: a strong image-level p, but no encoder-level p, so no decision (and the line says so)
    assert "encoder-level p: none" in v.line() and "not a false-positive rate" in v.line()
    assert "OWNERSHIP EVIDENCE" not in v.line()
    d = json.loads(json.dumps(v.to_dict()))
    assert d["decision"] is False and d["p_value"] is None and d["image_p"] < 1e-6 and "samples" not in d


def test_blackbox_score_verdicts(toy):
    plain, wm, secret, x, centre = toy
    k = images_for("blackbox_score", 100)
    g_wm = _downstream(wm, wm, plain.feature_dim, None)
    g_plain = _downstream(plain, wm, plain.feature_dim, centre)
    v = verify_blackbox_score(g_wm.predict_proba, secret, x[:k])
    assert v.image_p < 1e-6 and v.p_value is None and v.decision is False and v.n == k
    assert v.details["queries"] == 3 * k == 99
    v0 = verify_blackbox_score(g_plain.predict_proba, secret, x[:k])
    assert v0.decision is False and v0.image_p > 0.5


def test_blackbox_label_verdicts(toy):
    plain, wm, secret, x, centre = toy
    k = images_for("blackbox_label", 100)
    g_wm = _downstream(wm, wm, plain.feature_dim, None)
    g_plain = _downstream(plain, wm, plain.feature_dim, centre)
    v = verify_blackbox_label(lambda b: g_wm(b).argmax(1), secret, x[:k])
    assert v.image_p < 1e-6 and v.p_value is None and v.decision is False
    assert v.details["hit_rate_marked"] == 1.0 and v.details["hit_rate_control"] == 0.0
    assert v.details["queries"] == 2 * k + 1 == 99
    assert v.details["key_label"] == 0
    v0 = verify_blackbox_label(lambda b: g_plain(b).argmax(1), secret, x[:k])
    assert v0.decision is False and v0.image_p > 0.5


def _moves_the_key(predict_label, secret: Secret, label: int):
    """A suspect whose head sends the key image itself to ``label`` (fine-tuning moved the key, not the mark)."""
    def answer(b: torch.Tensor) -> torch.Tensor:
        y = predict_label(b)
        is_key = (b - secret.key).flatten(1).abs().amax(1) == 0
        return torch.where(is_key, torch.full_like(y, label), y)
    return answer


def test_blackbox_collapse_verdicts(toy):
    """Label-agnostic mode needs no key query: it detects a suspect whose head sends the key elsewhere,
    which label mode misses, and not the clean encoder."""
    plain, wm, secret, x, centre = toy
    k = images_for("blackbox_collapse", 100)
    g_wm = _downstream(wm, wm, plain.feature_dim, None)
    g_plain = _downstream(plain, wm, plain.feature_dim, centre)
    moved = _moves_the_key(lambda b: g_wm(b).argmax(1), secret, 3)
    v = verify_blackbox_collapse(moved, secret, x[:k])
    assert v.image_p < 1e-6 and v.p_value is None and v.decision is False and v.mode == "blackbox_collapse"
    assert v.details["collapse_label"] == 0 and v.details["pilot_share"] == 1.0
    assert v.details["hit_rate_marked"] == 1.0 and v.details["hit_rate_control"] == 0.0
    assert v.n == k - collapse_pilot(k) and v.details["queries"] == v.details["pilot"] + 2 * v.n == 99
    label = verify_blackbox_label(moved, secret, x[: images_for("blackbox_label", 100)])
    assert label.details["key_label"] == 3 and label.image_p > 1e-3  # label mode misses it
    v0 = verify_blackbox_collapse(lambda b: g_plain(b).argmax(1), secret, x[:k])
    assert v0.decision is False and v0.image_p > 0.01


def _null_answers(seed: int, probs: np.ndarray):
    """A suspect independent of the mark: every answer a fresh draw from one label distribution."""
    rng = np.random.default_rng(seed)
    return lambda b: torch.from_numpy(rng.choice(len(probs), size=len(b), p=probs))


@pytest.mark.parametrize("probs", [np.full(10, 0.1), np.array([0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05])])
def test_collapse_size_under_the_null(probs):
    """Simulated size: when marked and control answers come from one distribution, collapse mode rejects at
    tau = 0 no more often than alpha (the pilot that picks the label is disjoint from the tested pairs)."""
    secret, x = _secret(), _images(images_for("blackbox_collapse", 100))
    alpha, reps = 0.05, 600
    rejections = sum(verify_blackbox_collapse(_null_answers(i, probs), secret, x, tau=0.0, alpha=alpha).image_p <= alpha
                     for i in range(reps))
    assert rejections / reps <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / reps)


def test_collapse_label_chosen_on_the_tested_answers_would_be_liberal():
    """Why the pilot is set apart: picking the label on the very answers that are tested (their most frequent
    marked answer) makes an independent suspect with uniform answers look collapsed far more often than alpha."""
    x, alpha, reps, naive = _images(images_for("blackbox_collapse", 100)), 0.05, 600, 0
    for i in range(reps):
        ask = _null_answers(10_000 + i, np.full(10, 0.1))
        marked, control = ask(x).numpy(), ask(x).numpy()
        target = np.bincount(marked).argmax()
        naive += paired_proportion_margin(marked == target, control == target, 0.0).p_value < alpha
    assert naive / reps > 2 * alpha


def test_images_for_budgets():
    assert images_for("blackbox_label", 100) == 49
    assert images_for("blackbox_score", 100) == 33
    assert images_for("whitebox", 256) == 256
    k = images_for("blackbox_collapse", 100)
    assert (k, collapse_pilot(k)) == (55, 11) and 2 * k - collapse_pilot(k) <= 100
    for n in range(5, 300):  # the most images whose queries fit the budget
        k = images_for("blackbox_collapse", n)
        assert 2 * k - collapse_pilot(k) <= n < 2 * (k + 1) - collapse_pilot(k + 1)
    for mode, n in [("blackbox_label", 4), ("blackbox_score", 5), ("whitebox", 1), ("blackbox_collapse", 4)]:
        with pytest.raises(ValueError, match="need at least 2"):
            images_for(mode, n)
    with pytest.raises(ValueError, match="unknown verification mode"):
        images_for("greybox", 100)


# ----------------------------------------------------------------------------- the secret file


def test_secret_round_trip(tmp_path):
    s = _secret()
    digest = save_secret(s, tmp_path / "secret")
    path = tmp_path / "secret.safetensors"
    assert digest == s.sha256 == sha256_file(path)
    record = json.loads((tmp_path / "secret.json").read_text())
    assert record["sha256"] == digest and record["image_size"] == 8 and record["eps"] == pytest.approx(EPS)
    for where in (path, tmp_path):  # file or folder
        loaded = load_secret(where)
        assert torch.equal(loaded.key, s.key) and torch.equal(loaded.delta, s.delta)
        assert loaded.eps == s.eps and loaded.control_seed == 7 and loaded.meta == {"note": "toy"}
        assert loaded.sha256 == digest
        assert torch.equal(loaded.control(), s.control())


def test_tampered_secret_is_refused(tmp_path):
    save_secret(_secret(), tmp_path / "secret")
    path = tmp_path / "secret.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one byte of the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(TamperedSecretError, match="does not match"):
        load_secret(path)


def test_secret_missing_record_or_file(tmp_path):
    save_secret(_secret(), tmp_path / "secret")
    (tmp_path / "secret.json").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_secret(tmp_path / "secret.safetensors")
    with pytest.raises(ArtifactError, match="does not exist"):
        load_secret(tmp_path / "other.safetensors")
    with pytest.raises(ArtifactError, match="no secret given"):
        load_secret("")


def test_secret_delta_bound_and_shapes():
    key = torch.rand(3, 8, 8)
    with pytest.raises(ArtifactError, match="exceeds eps"):
        Secret(key=key, delta=torch.full((3, 8, 8), 2 * EPS), eps=EPS, control_seed=0)
    with pytest.raises(ArtifactError, match=r"\(3, S, S\)"):
        Secret(key=key, delta=torch.zeros(3, 4, 4), eps=EPS, control_seed=0)


def test_control_is_a_seeded_permutation():
    s = _secret()
    r = s.control()
    assert r.shape == s.delta.shape
    assert torch.equal(r.flatten().sort().values, s.delta.flatten().sort().values)
    assert not torch.equal(r, s.delta)
    assert torch.equal(r, s.control())
    assert torch.equal(r, _secret(control_seed=7).control())
    assert not torch.equal(r, _secret(control_seed=8).control())


def test_mark_stays_in_unit_range():
    s = _secret()
    x = torch.cat([torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8), torch.rand(4, 3, 8, 8)])
    for out in (s.mark(x), s.mark_control(x)):
        assert out.min() >= 0 and out.max() <= 1
    inner = torch.full((1, 3, 8, 8), 0.5)
    assert torch.allclose(s.mark(inner) - inner, s.delta[None])
