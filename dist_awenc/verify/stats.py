"""The statistical tests behind a verdict (scipy.stats does the distributions).

Every margin test is one-sided with a margin ``tau``: a universal adversarial
perturbation partly transfers to encoders that never saw the watermark, so
"marked beats control" alone is not evidence; "marked beats control by more
than tau" is. Each decisive p-value is exact for the null it names: the sign
test for H0: median(s) <= tau (white-box, score), an exact unconditional
test for H0: p10 - p01 <= tau (label), and the secret-permutation test
(:func:`permutation_p`), which needs no margin at all. Every test here
rejects at ``p <= alpha`` (METHOD.md, stage 3), and :func:`holm` too. Bounds
that are printed are rounded up, never to nearest (:func:`format_bound`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
from scipy import special, stats
from scipy.optimize import minimize_scalar


@dataclass
class TestResult:
    p_value: float
    statistic: float
    effect: float  # the estimate the margin is compared with
    n: int
    extra: dict


def margin_sign_test(s: np.ndarray, tau: float, secondary: bool = True) -> TestResult:
    """Exact one-sided sign test of H0: median(s) <= tau.

    Under H0 each ``s_i`` exceeds ``tau`` with probability at most 1/2, so the
    number of exceedances ``k = #{s_i > tau}`` is stochastically at most
    Binomial(n, 1/2) whatever the shape of the distribution (skewed either
    way); ties with ``tau`` count as non-exceedances, which only makes the
    test more conservative. The p-value is scipy's exact ``binomtest``.

    The Wilcoxon signed-rank test and the t-test on ``s - tau`` are reported
    in ``extra`` as secondary statistics only: Wilcoxon tests symmetry about
    tau, not the median, and rejects skewed nulls whose median is tau.

    Args:
        s: (n,) paired differences (marked minus control).
        tau: the margin.
        secondary: also compute the Wilcoxon and t-test p-values.

    Returns:
        p-value of the sign test; effect = mean(s); ``extra`` holds the
        median, the exceedance count and the secondary p-values.
    """
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 1 or len(s) < 2:
        raise ValueError(f"need a 1-d array of at least 2 paired differences, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("paired differences must be finite (a NaN or inf came from the suspect's outputs)")
    n, k = len(s), int(np.sum(s > tau))
    p = float(stats.binomtest(k, n, 0.5, alternative="greater").pvalue)
    return TestResult(p_value=p, statistic=float(k), effect=float(s.mean()), n=n,
                      extra={"median": float(np.median(s)), "exceedances": k, "test": "sign (exact binomial)",
                             **(secondary_tests(s, tau) if secondary else {})})


def secondary_tests(s: np.ndarray, tau: float) -> dict[str, float]:
    """Wilcoxon signed-rank and t-test p-values on ``s - tau`` (reported, never decisive)."""
    d = np.asarray(s, dtype=np.float64) - tau
    w = 1.0 if np.all(d == 0) else float(stats.wilcoxon(d, alternative="greater", zero_method="wilcox").pvalue)
    t = float(stats.ttest_1samp(d, 0.0, alternative="greater").pvalue) if np.std(d) > 0 else (0.0 if d.mean() > 0 else 1.0)
    return {"wilcoxon_p": w, "t_test_p": t}


def sign_test_critical(n: int, alpha: float) -> int:
    """Smallest exceedance count ``k`` whose sign-test p-value is at most ``alpha`` (n + 1 if none is).

    The test rejects at ``p <= alpha``, so ``k`` is where it starts to reject.
    """
    # binom.sf(k - 1) = P(K >= k): decreasing in k
    ks = np.arange(n + 1)
    ok = stats.binom.sf(ks - 1, n, 0.5) <= alpha
    return int(ks[ok][0]) if ok.any() else n + 1


def tango_z(b: np.ndarray, c: np.ndarray, n: int, tau: float) -> np.ndarray:
    """Tango's score statistic for H0: p10 - p01 <= tau on n paired 0/1 outcomes (vectorised).

    Args:
        b: discordant pairs with a hit under the mark only (any shape).
        c: discordant pairs with a hit under the control only (same shape).
        n: number of pairs.
        tau: the margin on the hit-rate difference, in [0, 1).

    Returns:
        z of the same shape: ``(b - c - n tau) / sqrt(n (2 q01 + tau - tau^2))`` with
        ``q01`` the restricted maximum-likelihood estimate of P(control-only) under
        ``p10 - p01 = tau`` (Tango 1998, Stat. Med. 17:891).
    """
    b, c = np.asarray(b, dtype=np.float64), np.asarray(c, dtype=np.float64)
    big_b = (b + c) * (1 - tau) - 2 * tau * (n - b)
    q01 = (big_b + np.sqrt(big_b**2 + 8 * n * c * tau * (1 - tau))) / (4 * n)
    var = n * (2 * q01 + tau - tau**2)
    num = b - c - n * tau
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(var > 0, num / np.sqrt(np.where(var > 0, var, 1.0)), np.sign(num) * np.inf)
    return np.where((var <= 0) & (num == 0), 0.0, z)


def _trinomial_logpmf(b: np.ndarray, c: np.ndarray, n: int, q01: np.ndarray, tau: float) -> np.ndarray:
    """log P(b, c, n - b - c) under (p10, p01, p00) = (q01 + tau, q01, 1 - 2 q01 - tau); (G, O) for G nuisances."""
    q = np.asarray(q01, dtype=np.float64)[:, None]
    m = n - b - c
    return (special.gammaln(n + 1) - special.gammaln(b + 1) - special.gammaln(c + 1) - special.gammaln(m + 1)
            + special.xlogy(b, q + tau) + special.xlogy(c, q) + special.xlogy(m, np.clip(1 - 2 * q - tau, 0, 1)))


@lru_cache(maxsize=512)
def _null_table(n: int, tau: float, grid: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every outcome (b, c) of n pairs, sorted by Tango's z (largest first), and the grid of nuisances."""
    bb, cc = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    ok = bb + cc <= n
    bb, cc = bb[ok], cc[ok]
    order = np.argsort(-tango_z(bb, cc, n, tau), kind="stable")
    return bb[order], cc[order], tango_z(bb[order], cc[order], n, tau), np.linspace(0.0, (1 - tau) / 2, grid)


def _sup_over_grid(f: Callable[[np.ndarray], np.ndarray], grid: np.ndarray) -> float:
    """The supremum of ``f`` over ``[grid[0], grid[-1]]``: the grid, then a bounded search at every local maximum.

    ``f`` maps an array of points to an array of values. A local maximum of the
    grid is a point whose value is at least its neighbours' (an endpoint has
    one), up to float noise (1e-12 of the grid's maximum: a tail near 1 ripples
    at 1e-16 and would otherwise count as dozens of maxima); a run of such
    points (a plateau) is one maximum. Each is refined by scipy's bounded
    scalar search between the grid points either side of it, so a narrow peak
    that the grid undersamples is found even when another peak holds the
    grid's argmax. The result is never below the grid's maximum.
    """
    grid = np.asarray(grid, dtype=np.float64)
    vals = np.asarray(f(grid), dtype=np.float64)
    best, g = float(vals.max()), len(grid)
    if g < 2:
        return best
    tol = 1e-12 * float(np.abs(vals).max())
    up = np.r_[True, vals[1:] >= vals[:-1] - tol]  # at least the left neighbour (the left end has none)
    down = np.r_[vals[:-1] >= vals[1:] - tol, True]  # at least the right neighbour
    peak = np.r_[up & down, False]
    starts = np.flatnonzero(peak[:-1] & ~np.r_[False, peak[:-2]])  # first point of each run of local maxima
    for i in starts:
        j = i + int(np.argmin(peak[i:]))  # one past the run's last point
        lo, hi = grid[max(i - 1, 0)], grid[min(j, g - 1)]
        if hi > lo:
            res = minimize_scalar(lambda q: -float(f(np.array([q]))[0]), bounds=(lo, hi), method="bounded",
                                  options={"xatol": 1e-12})
            best = max(best, -float(res.fun))
    return best


def exact_paired_margin_p(b: int, c: int, n: int, tau: float) -> float:
    """Exact unconditional p-value of Tango's statistic for H0: p10 - p01 <= tau.

    The p-value is the largest probability, over every null distribution of the
    pairs on the boundary ``p10 = p01 + tau`` (the nuisance ``p01`` ranges over
    ``[0, (1 - tau) / 2]``), that the statistic is at least the observed one:
    a trinomial sum over all ``(b', c')`` with ``b' + c' <= n``, maximised over
    the nuisance by a grid, then refined by a bounded scalar search around
    every local maximum of the grid (:func:`_sup_over_grid`): the tail can have
    several, and the grid's argmax need not sit on the highest (n = 100,
    tau = 0.02, (b, c) = (39, 10): refining the argmax alone understated p by
    7.5e-4 of itself). This holds the size at ``alpha`` where the normal
    approximation is liberal; reject at ``p <= alpha``.
    """
    b, c, n, tau = int(b), int(c), int(n), float(tau)
    if n < 1 or b < 0 or c < 0 or b + c > n:
        raise ValueError(f"need b, c >= 0 and b + c <= n with n >= 1, got b={b}, c={c}, n={n}")
    if not 0 <= tau < 1:
        raise ValueError(f"tau must be in [0, 1), got {tau}")
    bb, cc, z, qs = _null_table(n, tau)
    z_obs = float(tango_z(np.array(b), np.array(c), n, tau))
    k = int(np.searchsorted(-z, -(z_obs - 1e-9), side="right"))  # outcomes at least as extreme: the first k
    if k == 0:
        # Unreachable: (b, c) is in the table and at least as extreme as itself, so k >= 1. Were it reached,
        # the empty tail would read 0, which is never a p-value here; 1 is the conservative answer.
        return 1.0
    eb, ec = bb[:k], cc[:k]
    best = _sup_over_grid(lambda q: np.exp(_trinomial_logpmf(eb, ec, n, q, tau)).sum(axis=1), qs)
    return float(min(1.0, best))


def paired_proportion_margin(hits_marked: np.ndarray, hits_control: np.ndarray, tau: float) -> TestResult:
    """One-sided test of H0: P(hit | marked) - P(hit | control) <= tau on paired 0/1 outcomes.

    The statistic is Tango's score statistic (Tango 1998); the decisive
    p-value is its exact unconditional p-value (:func:`exact_paired_margin_p`),
    because the normal tail is liberal at small n and small margins. The
    asymptotic Tango p-value and McNemar's exact conditional p-value (a
    binomial test on the discordant pairs, the classic test at tau = 0) are
    reported beside it in ``extra``.

    Args:
        hits_marked, hits_control: (n,) 0/1 outcomes of the same n queries.
        tau: the margin on the hit-rate difference, in [0, 1).
    """
    a = np.asarray(hits_marked).astype(bool)
    c_ = np.asarray(hits_control).astype(bool)
    if a.shape != c_.shape or a.ndim != 1 or len(a) < 1:
        raise ValueError(f"need two 1-d 0/1 arrays of the same length, got {a.shape} and {c_.shape}")
    if not 0 <= tau < 1:
        raise ValueError(f"tau must be in [0, 1), got {tau}")
    n = len(a)
    b = int(np.sum(a & ~c_))  # marked hit, control missed
    c = int(np.sum(~a & c_))  # control hit, marked missed
    z = float(tango_z(np.array(b), np.array(c), n, tau))
    p = exact_paired_margin_p(b, c, n, tau)
    mcnemar = float(stats.binomtest(b, b + c, 0.5, alternative="greater").pvalue) if b + c > 0 else 1.0
    return TestResult(p_value=p, statistic=z, effect=(b - c) / n, n=n,
                      extra={"hit_rate_marked": float(a.mean()), "hit_rate_control": float(c_.mean()),
                             "discordant_marked": b, "discordant_control": c, "test": "Tango score, exact unconditional",
                             "tango_asymptotic_p": float(stats.norm.sf(z)), "mcnemar_exact_p": mcnemar})


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """Exact one-sided upper confidence bound on a rate from k events in n trials."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    return float(stats.binomtest(k, n).proportion_ci(confidence_level=2 * confidence - 1, method="exact").high)


def round_up(x: float, digits: int = 3) -> float:
    """``x`` rounded up (towards +inf) to ``digits`` decimals: a printed upper bound never understates.

    An exact decimal stays itself despite float noise (0.05 * 1000 is 50.000000000000007 in floats): the
    scaled value is lowered by 1e-9 before the ceiling, so for values of order 1 (rates, p-values) the
    result is below ``x`` by at most 1e-9 / 10**digits, never by a printed digit.
    """
    if not math.isfinite(x):
        raise ValueError(f"cannot round a non-finite bound: {x}")
    scale = 10**digits
    return math.ceil(x * scale - 1e-9) / scale


def format_bound(x: float, digits: int = 3) -> str:
    """An upper bound as text with ``digits`` decimals, rounded up (:func:`round_up`): 0.09503 prints as 0.096."""
    return f"{round_up(x, digits):.{digits}f}"


def permutation_p(t_owner: float, t_alternatives: np.ndarray, tie: float = 0.0) -> float:
    """Exact p-value of the secret-permutation test (METHOD.md, stage 3).

    Under H0 the suspect is independent of f0 and of every secret generated on
    it, so the owner's statistic is exchangeable with the J alternatives' and
    ``p = (1 + #{j : T_j >= T_owner}) / (J + 1)`` is exact (ties count against
    the owner). It is decided with ``p <= alpha``; its resolution is
    ``1 / (J + 1)``, so J = 999 alternatives reach alpha = 1e-3 (p = 1/1000).

    ``tie``: statistics within this of the owner's count as ties (against the owner: p only grows, so the test
    stays valid). Two computations of one statistic by differently batched float32 kernels differ in the last
    bits; where every statistic is that close (the clean f0 under the excess-over-f0 statistic: all 0 up to
    rounding) the rounding must not rank the owner first.
    """
    t = np.asarray(t_alternatives, dtype=np.float64)
    if t.ndim != 1 or len(t) < 1:
        raise ValueError(f"need a 1-d array of at least one alternative statistic, got shape {t.shape}")
    if not np.isfinite(t_owner) or not np.all(np.isfinite(t)):
        raise ValueError("permutation statistics must be finite")
    if not tie >= 0:
        raise ValueError(f"tie must be >= 0, got {tie}")
    return float((1 + np.sum(t >= t_owner - tie)) / (len(t) + 1))


def holm(p_values: dict[str, float], alpha: float) -> dict[str, bool]:
    """Holm's step-down rejections at family-wise level ``alpha`` (scipy has no Holm; this is the 5-line rule).

    The i-th smallest p-value (from 0) is rejected while every p-value so far satisfies
    ``p <= alpha / (m - i)``, the same ``p <= alpha`` rule as a single test (m = 1).
    Returns, per test name, whether it is rejected.
    """
    order = sorted(p_values, key=lambda k: p_values[k])
    m, out, stop = len(order), {}, False
    for i, k in enumerate(order):
        stop = stop or p_values[k] > alpha / (m - i)
        out[k] = not stop
    return out
