"""The candidate statistics for the probabilities' permutation test, recounted from saved answers.

Reads the ``<suspect>.npz`` answers ``scripts/blackbox_statistic.py`` saves and, per candidate statistic, counts the
derivatives (the unattacked release and 13 attacks) whose owner's secret it ranks first among the J + 1 secrets
(p = 1/(J + 1)). This is how ``key_tv`` was chosen, on the first three releases; the others are the check made
after the choice. Every candidate is a fixed function of one secret's queries and the owner's f0, so each is an
exact permutation test; they differ only in power.

    .venv/bin/python scripts/blackbox_candidates.py 33 runs/blackbox_statistic/{demo,draw1,draw2,draw3,draw4}
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy.stats import theilslopes


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


def main() -> None:
    n, folders = int(sys.argv[1]), sys.argv[2:]
    counts: dict[str, list[int]] = {}
    for folder in folders:
        owner = np.load(Path(folder) / "owner_side.npz")
        for f in sorted(Path(folder).glob("*.npz")):
            if f.stem == "owner_side" or f.stem.startswith("null_"):
                continue
            stats = candidates(np.load(f), n)
            for name in ("clean_tv", "key_tv", "key_logp"):  # the same, adjusted for f0's response to each secret
                stats[f"{name}~f0 pull"] = residual(stats[name], owner["pull"])
                stats[f"{name}~f0 disruption"] = residual(stats[name], owner["disrupt"])
            for name, t in stats.items():
                counts.setdefault(name, [0] * len(folders))[folders.index(folder)] += first(t)
    print(f"| candidate (n = {n} images) | " + " | ".join(Path(f).name for f in folders) + " | all |")
    print("|---|" + "---|" * (len(folders) + 1))
    for name, c in counts.items():
        print(f"| {name} | " + " | ".join(map(str, c)) + f" | {sum(c)} |")


if __name__ == "__main__":
    main()
