"""Per-attack detection of the escaping derivatives over five seeds (results/robust/nulls60/students.md).

Reads runs/ablation/<variant>/students60/robustness.csv (configs/robustness/students.yaml run at each variant's
60-family calibration, as in README.md) and writes students.md here: for each variant and attack, how many of the
five seeds keep the pirate's accuracy within 5 points, how many of those each mode detects at its calibrated
threshold, and the white-box tau* per seed.

    .venv/bin/python scripts/robust_students.py
    .venv/bin/python scripts/robust_students.py --out results/robust/nulls60_xeon --variants plain rehearsal_ens

(--out: the folder whose students.md is written, default results/robust/nulls60; --variants: the rows, default every variant committed here.)
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["plain", "rehearsal30", "both_mixed30", "both_mixed30_shadow", "rehearsal30arch", "rehearsal_refs4",
            "rehearsal_refs4_shadow", "rehearsal_refs8", "both_refs4", "rehearsal_ens"]
MODES = ["whitebox", "blackbox_score", "blackbox_label", "blackbox_collapse"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results/robust/nulls60", help="folder to write students.md into")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, help="variants (runs/ablation/<variant>), in order")
    parser.add_argument("--run", default="students60", choices=["students60", "students10"], help="the five-seed run of each variant: students60 "
                        "(configs/robustness/students.yaml, writes students.md) or students10 (students10.yaml, "
                        "writes students10.md)")
    args = parser.parse_args()
    lines = [f"# The {'10-epoch students' if args.run == 'students10' else 'escaping derivatives'} over five seeds "
             "(60-family calibration)", "",
             "Kept: seeds that are thefts (#27: at least half of f0's advantage over a random init on probe and kNN, "
             "and within 5 points of the unattacked encoder; for runs made before #27, within the 5 points only). "
             "Each mode column: of those, "
             "how many its calibrated threshold detects. tau*: white-box, per seed 0-4 (threshold in brackets).", "",
             "| variant | derivative | kept | white-box | score | label | collapse | white-box tau* per seed |",
             "|---|---|---|---|---|---|---|---|"]
    for v in args.variants:
        rows = list(csv.DictReader((ROOT / f"runs/ablation/{v}/{args.run}/robustness.csv").open(newline="")))
        cal = v.split("_shadow")[0]  # a shadow row (<base>_shadow[_kind], or plain's shadow[_kind]) keeps its base's secret
        cal = "plain" if cal.startswith("shadow") else cal
        threshold = _threshold(ROOT / f"runs/ablation/{cal}/calibration60/calibration.json")
        attacks = {(r["attack"], r["strength"]) for r in rows if r["attack"] != "none"}
        for attack, strength in sorted(attacks, key=_row_order):
            rs = sorted((r for r in rows if r["attack"] == attack and float(r["strength"]) == float(strength)),
                        key=lambda r: int(r["seed"]))
            # runs since #27 carry `theft` (half of f0's advantage over random init, and the 5 points); older ones
            # only the 5-point rule, `keeps_utility` (scripts/recount_thefts.py recounts the committed tables)
            kept = [r for r in rs if r.get("theft", r["keeps_utility"]) == "True"]
            hits = [f"{sum(r[f'calibrated_{m}'] == 'True' for r in kept)}/{len(kept)}" for m in MODES]
            taus = ", ".join(f"{float(r['tau_star_whitebox']):.4f}" for r in rs)
            lines.append(f"| {v} | {attack}@{float(strength):g} | {len(kept)}/{len(rs)} | " + " | ".join(hits)
                         + f" | {taus} ({threshold:.4f}) |")
    name = "students.md" if args.run == "students60" else f"{args.run}.md"
    (args.out / name).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _row_order(pair: tuple[str, str]) -> tuple[int, str, float]:
    """The students first (distill, distill_arch), then the other attacks by name."""
    first = {"distill": 0, "distill_arch": 1}
    return first.get(pair[0], 2), pair[0], float(pair[1])


def _threshold(path: Path) -> float:
    return float(json.loads(path.read_text())["modes"]["whitebox"]["threshold"])


if __name__ == "__main__":
    main()
