"""The candidate statistics for the black-box permutation tests, recounted from saved answers.

Reads the ``<suspect>.npz`` answers ``scripts/blackbox_statistic.py`` saves and, per candidate statistic, counts the
derivatives (the unattacked release and 13 attacks) whose owner's secret it ranks first among the J + 1 secrets
(p = 1/(J + 1)), on the first n hold-out images. This is how ``key_tv`` was chosen for the probabilities, on the
first three releases (the others are the check made after the choice), and ``key_hits_shift`` for the labels
(``--grids``: each folder's robustness grid, in order; then only its thefts count). The label candidates read the
top-1 label of each saved answer, as label mode sees it. Every candidate is a fixed function of one secret's
queries and the owner's f0, so each is an exact permutation test; they differ only in power.

    .venv/bin/python scripts/blackbox_candidates.py 33 runs/blackbox_statistic/{demo,draw1,draw2,draw3,draw4}
    .venv/bin/python scripts/blackbox_candidates.py 49 runs/bbdef/s{0,1,2,3,4,5,6} --grids GRID..
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
from scipy.stats import theilslopes

from dist_awenc.verify.permutation import KEY_HITS_SHIFT, label_statistics


def tv(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 0.5 * np.abs(a - b).sum(-1)


def candidates(d: dict, n: int) -> dict[str, np.ndarray]:
    """(J + 1,) per candidate, on the first n hold-out images."""
    c, m, r, k = d["clean"][:n], d["marked"][:, :n], d["control"][:, :n], d["key"]
    key_label = k.argmax(1)[:, None]
    key_p = lambda p: np.take_along_axis(p, key_label[:, :, None].repeat(p.shape[1], 1), 2)[..., 0]  # noqa: E731
    return {
        "clean_tv": (tv(c[None], m) - tv(c[None], r)).mean(1),  # the score margin test's shift from the clean answer
        "key_tv": (tv(r, k[:, None]) - tv(m, k[:, None])).mean(1),  # marked answers pulled towards the key's
        "key_dot": ((m - r) * k[:, None, :]).sum(-1).mean(1),  # agreement with the key's answer
        "key_logp": (np.log(key_p(m) + 1e-6) - np.log(key_p(r) + 1e-6)).mean(1),  # log-probability of the key's label
        "key_hits": (m.argmax(-1) == key_label).mean(1) - (r.argmax(-1) == key_label).mean(1),  # label mode's
        "flips": (m.argmax(-1) != c.argmax(-1)).mean(1) - (r.argmax(-1) != c.argmax(-1)).mean(1),
        **label_candidates(m.argmax(-1), r.argmax(-1), k.argmax(-1)),
    }


def label_candidates(lm: np.ndarray, lr: np.ndarray, key_label: np.ndarray) -> dict[str, np.ndarray]:
    """(J + 1,) per label-only candidate from the marked and control labels (J + 1, n) and the keys' (J + 1,)."""
    seen = np.unique(np.concatenate([lm.ravel(), lr.ravel()]))
    shares = lambda a: (a[..., None] == seen).mean(1)  # noqa: E731  (J + 1, labels seen)
    gain = shares(lm) - shares(lr)
    as_torch = [torch.from_numpy(np.ascontiguousarray(a)).long() for a in (key_label, lm, lr)]
    return {
        "key_hits_shift": label_statistics(*as_torch, KEY_HITS_SHIFT),  # the product's: key_hits, ties broken by the shift
        "label_shift": 0.5 * np.abs(gain).sum(1),  # the label histograms' total variation alone
        "mode_gain": gain.max(1),  # the largest rise of any one label's share
        "marked_key": (lm == key_label[:, None]).mean(1),  # marked hits alone (no control)
        "concentration": (shares(lm) ** 2).sum(1) - (shares(lr) ** 2).sum(1),  # marked answers gathered on a label
    }


def residual(t: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Each secret's statistic minus a Theil-Sen line through the other secrets' (statistic, f0 response) pairs."""
    out = np.empty_like(t)
    for j in range(len(t)):
        o = np.arange(len(t)) != j
        slope, intercept, *_ = theilslopes(t[o], b[o])
        out[j] = t[j] - (intercept + slope * b[j])
    return out


def first(t: np.ndarray) -> bool:
    return bool((t[1:] < t[0] - 1e-12).all())


def thefts(grid: str) -> dict[str, bool]:
    """Which derivatives of a robustness grid are thefts, by the ``<attack>__<strength>`` names the answers carry."""
    with (Path(grid) / "robustness.csv").open() as f:
        return {f"{r['attack']}__{float(r['strength']):g}": r["theft"] == "True" for r in csv.DictReader(f)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("n", type=int, help="hold-out images per secret")
    ap.add_argument("folders", nargs="+", help="answers saved by scripts/blackbox_statistic.py, one folder a release")
    ap.add_argument("--grids", nargs="+", default=[], help="each folder's robustness grid, in order: count thefts only")
    a = ap.parse_args()
    n, folders, grids = a.n, a.folders, a.grids
    if grids and len(grids) != len(folders):
        ap.error(f"--grids names {len(grids)} grids for {len(folders)} folders; give one per folder")
    counts: dict[str, list[int]] = {}
    nulls: dict[str, int] = {}  # the nulls (clean f0, independent encoder) whose owner's secret ranks first
    null_count = 0
    for i, folder in enumerate(folders):
        owner = np.load(Path(folder) / "owner_side.npz")
        theft = thefts(grids[i]) if grids else None
        for f in sorted(Path(folder).glob("*.npz")):
            if f.stem == "owner_side":
                continue
            null = f.stem.startswith("null_")
            if not null and theft is not None:
                a, s = f.stem.split("__")
                if not theft[f"{a}__{float(s):g}"]:
                    continue
            null_count += null
            stats = candidates(np.load(f), n)
            for name in ("clean_tv", "key_tv", "key_logp"):  # the same, adjusted for f0's response to each secret
                stats[f"{name}~f0 pull"] = residual(stats[name], owner["pull"])
                stats[f"{name}~f0 disruption"] = residual(stats[name], owner["disrupt"])
            for name, t in stats.items():
                if null:
                    nulls[name] = nulls.get(name, 0) + first(t)
                else:
                    counts.setdefault(name, [0] * len(folders))[i] += first(t)
    what = "thefts" if grids else "derivatives"
    print(f"| candidate (n = {n} images; {what} ranked first) | " + " | ".join(Path(f).name for f in folders)
          + f" | all | nulls ranked first (of {null_count}) |")
    print("|---|" + "---|" * (len(folders) + 2))
    for name, c in counts.items():
        print(f"| {name} | " + " | ".join(map(str, c)) + f" | {sum(c)} | {nulls.get(name, 0)} |")


if __name__ == "__main__":
    main()
