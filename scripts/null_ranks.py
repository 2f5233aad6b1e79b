"""The permutation tests' size on real nulls: where encoders not derived from the release rank the owner's secret.

Under H0 the owner's secret is exchangeable with its plan's J alternatives (stage 1 made all J + 1 alike and a
digest drew the owner's), so on any encoder the release was not derived from, the owner's rank among the J + 1 is
uniform and P(p <= k/(J + 1)) = k/(J + 1). The unit tests simulate that on toy models; this measures it on the
product's own nulls: each null encoder and the product a pirate would build on it (a linear head on the pirate's
task, as the robustness grid trains it), asked with every secret set given: the weights by the mean score
(``score``), the probabilities and labels by the statistics each set's plan seals (``--current``: those a plan made
now seals, ``key_tv`` and ``key_hits_shift``), on the images the plan's n pays for (``--score-images``: another count
for the probabilities). Secret sets need no embedding, only stage 1: the nulls do not depend on the release.

    .venv/bin/python scripts/null_ranks.py OUT.csv --nulls f0=runs/demo_score/f0 independent=runs/demo/independent \
        --secrets runs/fresh/s*/watermark runs/nullcheck/s*
    .venv/bin/python scripts/null_ranks.py OUT.csv --summary        # the rank table and the uniformity tests

Writes one row per (null, secret set): the owner's p in each access. ``--summary`` prints, per access and null,
how many sets gave p <= 0.05 and <= 0.25 against the uniform law's expectation, the mean p, scipy's exact
two-sided binomial p of the first count, a chi-square test of the ranks' uniformity, and the mean rank's z against
the uniform law's mean (sd sqrt(((J + 1)^2 - 1) / 12 / sets)) with its one-sided p (small: ranks skewed to first).
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
from scipy import stats

ACCESSES = ("weights", "probabilities", "labels")


def measure(out: Path, nulls: list[str], secrets: list[str], current: bool = False, score_images: int = 0) -> None:
    from dist_awenc.attacks.stage import PirateData
    from dist_awenc.config import DataSection
    from dist_awenc.data import build_dataset, splits_for
    from dist_awenc.encoders.io import load_encoder
    from dist_awenc.evaluate.downstream import evaluate_encoder
    from dist_awenc.verify.core import images_for
    from dist_awenc.verify.permutation import (DEFAULT_LABEL_STATISTIC, DEFAULT_SCORE_STATISTIC, PERMUTATION_TIE,
                                               blackbox_label_statistics, blackbox_score_statistics, label_statistic,
                                               score_statistic, whitebox_statistics)
    from dist_awenc.verify.stats import permutation_p
    from dist_awenc.watermark.draw import load_plan_alternatives
    from dist_awenc.watermark.secret import load_secret

    data = DataSection()
    rows, products = [], {}
    for spec in nulls:
        name, path = spec.split("=", 1)
        enc, card = load_encoder(path)
        pirate = PirateData.load(data, card["input_size"])
        model, _ = evaluate_encoder(enc, pirate.images, pirate.labels, pirate.num_classes, seed=0)
        products[name] = (enc.eval(), model.eval())
    holdout = None
    for folder in secrets:
        sec = load_secret(str(Path(folder) / "secret.safetensors"))
        alt = load_plan_alternatives(str(Path(folder) / "secret.safetensors"), sec)
        if holdout is None:
            dataset = build_dataset(data.name, image_size=sec.image_size, seed=data.split_seed)
            holdout, _ = dataset.get_batch(splits_for(len(dataset), data.split_seed, data.splits, "x",
                                                      "holdout")["holdout"])
        keys, deltas = torch.cat([sec.key[None], alt.keys]), torch.cat([sec.delta[None], alt.deltas])
        controls = torch.cat([sec.control()[None], alt.controls()])
        n, plan = sec.plan["n"], sec.plan
        if current:  # what a plan made now seals, whatever this one did
            plan = {**plan, "score_statistic": DEFAULT_SCORE_STATISTIC, "label_statistic": DEFAULT_LABEL_STATISTIC}
        for name, (enc, model) in products.items():
            with torch.no_grad():
                t = {"weights": whitebox_statistics(enc, keys, deltas, controls, holdout[: n["whitebox"]]),
                     "probabilities": blackbox_score_statistics(
                         model.predict_proba, keys, deltas, controls,
                         holdout[: score_images or images_for("blackbox_score", n["blackbox_score"])], score_statistic(plan)),
                     "labels": blackbox_label_statistics(
                         lambda b: model(b).argmax(1), keys, deltas, controls,
                         holdout[: images_for("blackbox_label", n["blackbox_label"])], label_statistic(plan))}
            row = {"null": name, "secret": sec.sha256[:8], "folder": folder, "alternatives": len(alt)}
            row.update({a: permutation_p(float(v[0]), v[1:], tie=PERMUTATION_TIE) for a, v in t.items()})
            rows.append(row)
            print(f"{folder:<36} {name:<12} " + "  ".join(f"{a} {row[a]:.2f}" for a in ACCESSES), flush=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def summary(path: Path) -> str:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    lines = ["| access | null | sets | p <= 0.05 (expected) | p <= 0.25 (expected) | mean p (expected) | "
             "binomial p of the first count | chi-square p, ranks uniform (4 bins) | mean rank: z (one-sided p) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for access in ACCESSES:
        for null in dict.fromkeys(r["null"] for r in rows):
            ps = np.array([float(r[access]) for r in rows if r["null"] == null])
            j1 = int(rows[0]["alternatives"]) + 1
            ranks = np.rint(ps * j1).astype(int)  # 1 .. J + 1
            low, quarter = int((ps <= 0.05 + 1e-9).sum()), int((ps <= 0.25 + 1e-9).sum())
            binom = stats.binomtest(low, len(ps), 1 / j1).pvalue
            bins = np.bincount(np.minimum((ranks - 1) * 4 // j1, 3), minlength=4)
            chi = stats.chisquare(bins).pvalue
            z = (ranks.mean() - (j1 + 1) / 2) / np.sqrt((j1 * j1 - 1) / 12 / len(ps))  # uniform on 1..J+1
            lines.append(f"| {access} | {null} | {len(ps)} | {low} ({len(ps) / j1:.1f}) | {quarter} "
                         f"({len(ps) * np.ceil(0.25 * j1) / j1:.1f}) | {ps.mean():.3f} ({(j1 + 1) / 2 / j1:.3f}) | "
                         f"{binom:.3g} | {chi:.3g} | {z:+.2f} ({stats.norm.cdf(z):.3g}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--nulls", nargs="+", default=[], help="name=encoder (run folder or file)")
    ap.add_argument("--secrets", nargs="+", default=[], help="stage-1 run folders (secret + alternatives)")
    ap.add_argument("--current", action="store_true",
                    help="rank every set by the statistics and budget new plans seal, whatever its own plan sealed")
    ap.add_argument("--score-images", type=int, default=0,
                    help="ask the probabilities about this many images per secret (0: the plan's, n // 3)")
    ap.add_argument("--summary", action="store_true", help="print the table of an existing CSV")
    a = ap.parse_args()
    if not a.summary:
        if not (a.nulls and a.secrets):
            ap.error("give --nulls and --secrets (or --summary)")
        measure(Path(a.out), a.nulls, a.secrets, a.current, a.score_images)
    print(summary(Path(a.out)))


if __name__ == "__main__":
    main()
