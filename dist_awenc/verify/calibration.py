"""A calibration: per-mode thresholds set on null encoders, checked on held-out ones (METHOD.md, "Calibration").

The unit of evidence is the encoder *family* (an independently pre-trained
null encoder together with the attacked copies made from it), never the
(encoder, secret) pair: an encoder that lets one universal perturbation
through lets others through, and an attacked copy is not independent of its
parent. Families are split into calibration and held-out ones. The threshold
of a mode is the largest ``tau*`` (the margin at which a trial's test just
reaches ``p = alpha``) of any calibration encoder with the owner's secret;
the false-positive rate is measured only on held-out families, with two
bounds, each labelled as what it is:

* ``heldout_fpr_upper_95``: the exact Clopper-Pearson 95% upper bound on the
  false-positive rate from the positives among the m held-out families
  (0 of m gives ``1 - 0.05 ** (1 / m)``);
* ``exceed_probability_bound``: for exchangeable families, a new null family
  exceeds the maximum of m' calibration families with probability at most
  ``1 / (m' + 1)``.

By the same exchangeability, at least one of m held-out families exceeds the
maximum of m' calibration families with probability ``m / (m' + m)`` even when
the calibration is right (1/2 for 30 and 30; :func:`heldout_crossing_probability`):
a held-out positive is expected about half the time, and the Clopper-Pearson
bound accounts for it; zero held-out positives is not a property of a secret.

A bound over the calibration families is zero by construction and is never
reported. The owner's f0 is not a null: it is reported as the owner's
reference. A calibration records its conditions (secret, alpha, n per mode,
dataset, split, hold-out hash) and :func:`check_conditions` refuses to apply
it under any other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from dist_awenc.files import read_json, save_figure, sha256_file
from dist_awenc.errors import ConfigError
from dist_awenc.verify.core import LABEL_MODES, MODES, round_up
from dist_awenc.verify.plan import holdout_sha256
from dist_awenc.verify.stats import TestResult, clopper_pearson_upper, margin_sign_test, paired_proportion_margin

CALIBRATION_FORMAT = "dist_awenc.calibration/2"
LABEL = "blackbox_label"


def label_key(classes: int, mode: str = LABEL) -> str:
    """A calibration's entry for a label-only mode on a task of ``classes`` classes (``blackbox_label@2``)."""
    return f"{mode}@{classes}"


def test_mode(key: str) -> str:
    """The mode whose test a calibration entry uses (``blackbox_label@2`` -> ``blackbox_label``)."""
    return key.split("@", 1)[0]


def mode_test(mode: str, samples: Any, tau: float) -> TestResult:
    """The mode's decisive test on raw samples: score arrays (white-box, score) or (hits_marked, hits_control)."""
    if test_mode(mode) in LABEL_MODES:
        return paired_proportion_margin(samples[0], samples[1], tau)
    return margin_sign_test(samples, tau, secondary=False)  # the decisive p only (tau* searches call this often)


def tau_star(mode: str, samples: Any, alpha: float, iters: int = 40) -> float:
    """The margin at which the trial's image-level p-value reaches ``alpha`` (p is non-decreasing in tau).

    The trial is positive (p <= alpha) at margin T when ``T < tau*``, up to the
    bisection's resolution (2**-40 of the range). Returns the lower end of the
    search range when the trial is negative at every margin, the upper end when
    it is positive at every margin. It is also the score of the conformal
    encoder-level p (:meth:`Calibration.encoder_p`): larger is more extreme.
    """
    lo, hi = (0.0, 0.999) if test_mode(mode) in LABEL_MODES else (-2.0, 2.0)
    if mode_test(mode, samples, lo).p_value > alpha:
        return lo
    if mode_test(mode, samples, hi).p_value <= alpha:
        return hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        if mode_test(mode, samples, mid).p_value <= alpha:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass
class NullEncoder:
    """One null encoder's results: ``tau*`` per mode with the owner's secret (and the largest with others)."""

    name: str
    family: str  # the independent pre-training it comes from (itself, or its parent for an attacked copy)
    tau_star: dict[str, float]
    tau_star_other_secrets: dict[str, float] = field(default_factory=dict)
    effect: dict[str, float] = field(default_factory=dict)
    # per mode, the owner's-secret trial itself (scores, or [hits_marked, hits_control] as 0/1 lists): whether the
    # encoder is positive at a threshold is then its test's p there, computed directly
    samples: dict[str, Any] = field(default_factory=dict)

    def positive_at(self, mode: str, threshold: float, alpha: float) -> bool:
        """Whether this null encoder's test with the owner's secret gives p <= alpha at margin ``threshold``."""
        s = self.samples.get(mode)
        if s is None:  # a trial cached before the samples were kept: tau*'s bisection decides instead
            return self.tau_star[mode] > threshold
        data = (np.asarray(s[0], bool), np.asarray(s[1], bool)) if test_mode(mode) in LABEL_MODES else np.asarray(s)
        return mode_test(mode, data, threshold).p_value <= alpha


def split_families(families: list[str], holdout_fraction: float, seed: int) -> set[str]:
    """The held-out families: a seeded random ``floor(fraction * m)`` of them."""
    fams = sorted(set(families))
    n_hold = int(math.floor(len(fams) * holdout_fraction))
    return set(np.random.default_rng(seed).permutation(fams)[:n_hold].tolist())


def summarise(nulls: list[NullEncoder], owner: Optional[dict[str, dict]], alpha: float, holdout_fraction: float,
              seed: int) -> dict[str, Any]:
    """Thresholds from the calibration families; false positives and both bounds on the held-out families."""
    held = split_families([e.family for e in nulls], holdout_fraction, seed)
    cal_fams = sorted({e.family for e in nulls} - held)
    if not cal_fams:
        raise ConfigError("no calibration family left: lower population.holdout_fraction or add null encoders")
    modes: dict[str, Any] = {}
    extra = sorted((k for k in nulls[0].tau_star if k not in MODES),
                   key=lambda k: (MODES.index(test_mode(k)), int(k.split("@")[1])))
    for mode in (*MODES, *extra):  # every mode, then the label-only modes per number of classes
        threshold = max(e.tau_star[mode] for e in nulls if e.family not in held) + 1e-6
        positive = {e.name: e.positive_at(mode, threshold, alpha) for e in nulls}  # its test's p at the threshold
        held_fams = sorted(held)
        fam_pos = {f: any(positive[e.name] for e in nulls if e.family == f) for f in held_fams}
        k, m = sum(fam_pos.values()), len(held_fams)
        modes[mode] = {
            "threshold": threshold, "alpha": alpha,
            "calibration": {"families": len(cal_fams),
                            "encoders": sum(e.family not in held for e in nulls)},
            "heldout": {"families": m, "encoders": sum(e.family in held for e in nulls),
                        "false_positive_families": k,
                        "false_positive_encoders": sorted(e.name for e in nulls if e.family in held and positive[e.name]),
                        "heldout_fpr_upper_95": clopper_pearson_upper(k, m) if m else None},
            "exceed_probability_bound": 1 / (len(cal_fams) + 1),
            "owner_f0": None if owner is None else {
                "tau_star": owner[mode]["tau_star"], "detected_at_threshold": owner[mode]["tau_star"] > threshold},
            "null": [{"encoder": e.name, "family": e.family, "heldout": e.family in held, "tau_star": e.tau_star[mode],
                      "tau_star_other_secrets": e.tau_star_other_secrets.get(mode), "effect": e.effect.get(mode),
                      "positive": positive[e.name]} for e in nulls],
        }
    return {"modes": modes, "heldout_families": sorted(held), "calibration_families": cal_fams}


@dataclass
class Calibration:
    """A loaded calibration file: thresholds per mode, its SHA-256 and its recorded conditions."""

    path: Path
    sha256: str
    thresholds: dict[str, float]
    conditions: dict[str, Any]
    data: dict[str, Any]

    def heldout_failure(self, mode: str) -> Optional[str]:
        """One phrase when ``mode``'s threshold let held-out null families through (None when it did not)."""
        h = self.data["modes"][mode]["heldout"]
        if not h["false_positive_families"]:
            return None
        return (f"calibration {self.sha256[:12]}... let {h['false_positive_families']}/{h['families']} held-out null "
                f"families through at its {mode} threshold (FPR <= {h['heldout_fpr_upper_95']:.3f}, 95% CP): it fires on "
                "encoders that are not the owner's; calibrate again with more families")

    def label_classes(self, mode: str = LABEL) -> dict[int, str]:
        """A label-only mode's calibrated class counts and their entries (the pirate task's own under ``mode``)."""
        per = {int(k.split("@", 1)[1]): k for k in self.thresholds if k.startswith(mode + "@")}
        full = (self.data.get("label_classes") or {}).get("task")
        if full:
            per.setdefault(int(full), mode)
        return per

    def key_for(self, mode: str, classes: Optional[int]) -> tuple[str, str]:
        """The entry whose threshold a verification applies, and a phrase saying which (empty for the mode's own).

        Label mode with ``classes`` takes that class count's threshold; without, the largest over every
        calibrated class count, which is safe whatever the suspect's task.

        Raises:
            ConfigError: ``classes`` that this calibration has no threshold for.
        """
        if mode not in LABEL_MODES:
            return mode, ""
        per = self.label_classes(mode)
        if classes is None:
            if len(per) <= 1:
                return mode, ""
            key = max(per.values(), key=lambda k: self.thresholds[k])
            return key, (f"label threshold of {next(c for c, k in per.items() if k == key)} classes, the largest over "
                         f"the calibrated {', '.join(map(str, sorted(per)))} (verify.classes unset)")
        if classes not in per:
            have = ", ".join(map(str, sorted(per))) or "none (a calibration from before per-class label thresholds)"
            raise ConfigError(f"verify.classes={classes}: calibration {self.path} has {mode} thresholds for these class "
                              f"counts: {have}; calibrate with population.label_classes including {classes}")
        # stating more classes than the task has must not lower the threshold: the largest over counts >= classes
        key = max((k for c, k in per.items() if c >= classes), key=lambda k: self.thresholds[k])
        return key, f"label threshold: the largest over calibrated class counts >= {classes}"

    def family_scores(self, key: str) -> list[float]:
        """Per calibration family (held-out ones excluded), the largest tau* of its encoders with the owner's secret."""
        best: dict[str, float] = {}
        for t in self.data["modes"][key].get("null", []):
            if not t["heldout"]:
                best[t["family"]] = max(best.get(t["family"], -math.inf), float(t["tau_star"]))
        return list(best.values())

    def encoder_p(self, key: str, suspect_tau_star: float) -> tuple[float, float]:
        """The conformal encoder-level p of a suspect whose tau* is ``suspect_tau_star``, and the smallest possible.

        ``p = (1 + #{calibration families with tau* >= the suspect's}) / (m' + 1)``: exact (valid) when the suspect
        is exchangeable with the null families, conservative when it is one encoder and a family's score is the
        largest of several (parent and attacked copies). Ties count against the suspect.
        """
        scores = np.asarray(self.family_scores(key))
        m = len(scores)
        return float((1 + np.sum(scores >= suspect_tau_star - 1e-12)) / (m + 1)), 1 / (m + 1)

    def eligible_label_keys(self, mode: str, labels_seen: int) -> list[str]:
        """A label-only mode's entries for class counts >= the distinct labels the suspect answered with."""
        return [k for c, k in sorted(self.label_classes(mode).items()) if c >= labels_seen]

    def heldout_bound(self, key: str) -> Optional[float]:
        return self.data["modes"][key]["heldout"]["heldout_fpr_upper_95"]

    def summary(self, mode: str) -> str:
        m = self.data["modes"][mode]
        h = m["heldout"]
        bound = h["heldout_fpr_upper_95"]
        return (f"{h['false_positive_families']}/{h['families']} held-out null families positive, "
                f"FPR <= {round_up(bound):.3f} (95% CP)" if bound is not None else "no held-out families")


def load_calibration(path: str | Path) -> Calibration:
    """Read a ``calibration.json`` (or its run folder); one-line errors for anything else."""
    p = Path(path)
    p = p / "calibration.json" if p.is_dir() else p
    data = read_json(p, ConfigError, "a calibration file: run awenc calibrate first")
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
        got = data.get("format") if isinstance(data, dict) else None
        raise ConfigError(f"{p}: not a calibration file of this version (format {got!r}, expected "
                          f"{CALIBRATION_FORMAT!r}); rerun awenc calibrate")
    return Calibration(p, sha256_file(p), {m: float(v["threshold"]) for m, v in data["modes"].items()},
                       data["conditions"], data)


def load_thresholds(path: str | Path) -> dict[str, float]:
    """Per-mode thresholds of a calibration file."""
    return load_calibration(path).thresholds


def conditions(*, secret_sha256: str, alpha: float, n: dict[str, int], dataset: str, dataset_size: int,
               split_seed: int, holdout_indices) -> dict[str, Any]:
    """The conditions a calibration is valid for."""
    return {"secret_sha256": secret_sha256, "alpha": float(alpha), "n": {k: int(v) for k, v in n.items()},
            "dataset": dataset, "dataset_size": int(dataset_size), "split_seed": int(split_seed),
            "holdout_sha256": holdout_sha256(dataset, dataset_size, split_seed, holdout_indices)}


def check_conditions(cal: Calibration, *, secret_sha256: str, alpha: float, n: dict[str, int], dataset: str,
                     dataset_size: int, split_seed: int, holdout_indices) -> None:
    """Refuse (one line) to apply a calibration made under other conditions than this verification's."""
    want = conditions(secret_sha256=secret_sha256, alpha=alpha, n=n, dataset=dataset, dataset_size=dataset_size,
                      split_seed=split_seed, holdout_indices=holdout_indices)
    have = cal.conditions
    diffs = []
    for key in ("secret_sha256", "alpha", "dataset", "dataset_size", "split_seed", "holdout_sha256"):
        if have.get(key) != want[key]:
            diffs.append(f"{key} {_short(have.get(key))} (here {_short(want[key])})")
    for mode, k in want["n"].items():
        if have.get("n", {}).get(mode) != k:
            diffs.append(f"n for {mode} {have.get('n', {}).get(mode)} (here {k})")
    if diffs:
        raise ConfigError(f"calibration {cal.path} was made under other conditions: " + "; ".join(diffs)
                          + "; calibrate again for these conditions")


def _short(v: Any) -> str:
    return f"{v[:12]}..." if isinstance(v, str) and len(v) == 64 else repr(v)


def heldout_crossing_probability(calibration_families: int, heldout_families: int) -> float:
    """P(at least one held-out family exceeds the maximum of the calibration families) for exchangeable families.

    The largest of ``m' + m`` exchangeable statistics (no ties) is equally likely to be any of them, so it is a
    held-out one with probability ``m / (m' + m)``, and that happens exactly when some held-out family crosses
    the threshold. Ties (many nulls at ``tau* = 0`` in the label modes) only make a crossing less likely.
    """
    if calibration_families < 1 or heldout_families < 0:
        raise ValueError(f"need at least one calibration family and a non-negative held-out count, not "
                         f"{calibration_families} and {heldout_families}")
    return heldout_families / (calibration_families + heldout_families)


def markdown(report: dict) -> str:
    """The calibration as a reader checks it: thresholds, both bounds, and every held-out null encoder."""
    c = report["conditions"]
    lines = [f"# Calibration of secret `{c['secret_sha256'][:16]}…`", "",
             f"alpha = {c['alpha']:g}; n = {c['n']}; {c['dataset']} ({c['dataset_size']} images), split seed "
             f"{c['split_seed']}; {report['population']['families']} null families, "
             f"{len(report['population']['encoders'])} null encoders.", "",
             "| mode | threshold | calibration families | held-out families | held-out positive | "
             "held-out FPR, exact 95% upper bound (Clopper-Pearson), rounded up | P(new null family > threshold), averaged over calibrations, <= 1/(m'+1) | "
             "owner's clean f0 tau* |", "|---|---|---|---|---|---|---|---|"]
    for mode, m in report["modes"].items():
        h, o = m["heldout"], m.get("owner_f0")
        bound = f"{round_up(h['heldout_fpr_upper_95']):.3f}" if h["heldout_fpr_upper_95"] is not None else "n/a"
        owner = f"{o['tau_star']:.4f}" + (" (above the threshold)" if o["detected_at_threshold"] else "") if o else "n/a"
        lines.append(f"| {mode} | {m['threshold']:.4f} | {m['calibration']['families']} | {h['families']} | "
                     f"{h['false_positive_families']} | {bound} | {round_up(m['exceed_probability_bound']):.3f} | {owner} |")
    first = next(iter(report["modes"].values()))
    m_cal, m_held = first["calibration"]["families"], first["heldout"]["families"]
    if m_held:
        lines += ["", f"Even when nothing is wrong, at least one of {m_held} held-out families exceeds the maximum of "
                  f"{m_cal} calibration families with probability {heldout_crossing_probability(m_cal, m_held):.2f} "
                  "(exchangeable families; ties make it less): a held-out positive or two in a mode is what a "
                  "correct calibration produces about that often, and the exact bound above accounts for it."]
    lc = report.get("label_classes") or {}
    if lc.get("regrouped"):
        lines += ["", f"`blackbox_label@k`, `blackbox_collapse@k`: the label-only modes on the pirate's {lc['task']}-class task regrouped into k classes "
                  "(label y becomes y mod k), each with its own downstream model; `awenc verify verify.classes=k` "
                  "applies that threshold, and without verify.classes the largest of them."]
    lines += ["", "Held-out null encoders (tau* with the owner's secret; positive when its test at the threshold gives "
              "p <= alpha):", "",
              "| encoder | family | " + " | ".join(f"{m} tau*" for m in report["modes"]) + " | positive |",
              "|---|---|" + "---|" * len(report["modes"]) + "---|"]
    rows = {t["encoder"]: t for t in next(iter(report["modes"].values()))["null"] if t["heldout"]}
    for name, t in rows.items():
        stars = [next(x for x in m["null"] if x["encoder"] == name) for m in report["modes"].values()]
        lines.append(f"| {name} | {t['family']} | " + " | ".join(f"{x['tau_star']:.4f}" for x in stars)
                     + f" | {'yes: ' + ', '.join(mo for mo, x in zip(report['modes'], stars) if x['positive']) if any(x['positive'] for x in stars) else 'no'} |")
    lines += ["", "A bound over the calibration families would be zero by construction and is not reported.", ""]
    return "\n".join(lines)


def plot_null(report: dict, path: Path) -> None:
    """Per mode: the null encoders' tau* (calibration and held-out), the threshold and the owner's f0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if m in report["modes"]]  # a calibration from before collapse mode has three
    fig, axes = plt.subplots(1, len(modes), figsize=(4.3 * len(modes), 3.4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        m = report["modes"][mode]
        cal = [t["tau_star"] for t in m["null"] if not t["heldout"]]
        held = [t["tau_star"] for t in m["null"] if t["heldout"]]
        bins = np.linspace(min(cal + held), max(cal + held + [m["threshold"]]) + 1e-9, 25)
        ax.hist([cal, held], bins=bins, stacked=True, color=["tab:gray", "tab:blue"],
                label=[f"calibration ({len(cal)})", f"held-out ({len(held)})"])
        ax.axvline(m["threshold"], color="tab:red", ls="--", label=f"threshold {m['threshold']:.3f}")
        if m.get("owner_f0"):
            ax.axvline(m["owner_f0"]["tau_star"], color="tab:green", ls=":", label="owner's clean f0")
        ax.set_title(f"{mode}: null encoders, owner's secret", fontsize=9)
        ax.set_xlabel("tau* (margin where p = alpha)")
        ax.legend(fontsize=7)
    save_figure(fig, path)
