"""The statistical tests behind a verdict (scipy.stats does the distributions).

Every test is one-sided with a margin ``tau``: a universal adversarial
perturbation partly transfers to encoders that never saw the watermark, so
"marked beats control" alone is not evidence; "marked beats control by more
than tau" is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass
class TestResult:
    p_value: float
    statistic: float
    effect: float  # the estimate the margin is compared with
    n: int
    extra: dict


def margin_wilcoxon(s: np.ndarray, tau: float) -> TestResult:
    """One-sided Wilcoxon signed-rank test of H0: median(s) <= tau.

    Args:
        s: (n,) paired differences (marked minus control).
        tau: the margin.

    Returns:
        p-value of ``wilcoxon(s - tau, alternative="greater")``; effect = mean(s);
        the paired t-test's p-value on the same shifted differences is in ``extra``.
    """
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 1 or len(s) < 2:
        raise ValueError(f"need a 1-d array of at least 2 paired differences, got shape {s.shape}")
    d = s - tau
    if np.all(d == 0):
        p, stat = 1.0, 0.0
    else:
        res = stats.wilcoxon(d, alternative="greater", zero_method="wilcox")
        p, stat = float(res.pvalue), float(res.statistic)
    t_p = float(stats.ttest_1samp(d, 0.0, alternative="greater").pvalue) if np.std(d) > 0 else (0.0 if d.mean() > 0 else 1.0)
    return TestResult(p_value=p, statistic=stat, effect=float(s.mean()), n=len(s),
                      extra={"median": float(np.median(s)), "t_test_p": t_p})


def paired_proportion_margin(hits_marked: np.ndarray, hits_control: np.ndarray, tau: float) -> TestResult:
    """One-sided test of H0: P(hit | marked) - P(hit | control) <= tau on paired 0/1 outcomes.

    Tango's score test for a difference of paired proportions (Tango 1998,
    Stat. Med. 17:891), with the null variance at the restricted maximum-
    likelihood estimate; the normal tail comes from scipy. With tau = 0 it is
    McNemar's test; McNemar's exact p-value (a binomial test on the discordant
    pairs) is reported beside it in ``extra``.

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
    big_b = (b + c) * (1 - tau) - 2 * tau * (n - b)
    q01 = (big_b + math.sqrt(big_b**2 + 8 * n * c * tau * (1 - tau))) / (4 * n)  # restricted MLE of P(control-only)
    var = n * (2 * q01 + tau - tau**2)
    z = (b - c - n * tau) / math.sqrt(var) if var > 0 else (math.inf if b - c > n * tau else -math.inf)
    p = float(stats.norm.sf(z))
    exact = float(stats.binomtest(b, b + c, 0.5, alternative="greater").pvalue) if b + c > 0 else 1.0
    return TestResult(p_value=p, statistic=float(z), effect=(b - c) / n, n=n,
                      extra={"hit_rate_marked": float(a.mean()), "hit_rate_control": float(c_.mean()),
                             "discordant_marked": b, "discordant_control": c, "mcnemar_exact_p": exact})


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """Exact one-sided upper confidence bound on a rate from k events in n trials."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    return float(stats.binomtest(k, n).proportion_ci(confidence_level=2 * confidence - 1, method="exact").high)
