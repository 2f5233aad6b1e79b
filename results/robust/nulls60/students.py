"""Per-attack detection of the escaping derivatives over five seeds (results/robust/nulls60/students.md).

Reads runs/ablation/<variant>/students60/robustness.csv (configs/robustness/students.yaml run at each variant's
60-family calibration, as in README.md) and writes students.md here: for each variant and attack, how many of the
five seeds keep the pirate's accuracy within 5 points, how many of those each mode detects at its calibrated
threshold, and the white-box tau* per seed.

    .venv/bin/python results/robust/nulls60/students.py
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
VARIANTS = ["plain", "rehearsal30", "both_mixed30", "both_mixed30_shadow", "rehearsal30arch", "rehearsal_refs4",
            "rehearsal_refs4_shadow", "rehearsal_refs8", "both_refs4", "rehearsal_ens"]
ATTACKS = [("distill", "30"), ("distill_arch", "30"), ("adversarial_finetune", "3")]
MODES = ["whitebox", "blackbox_score", "blackbox_label", "blackbox_collapse"]


def main() -> None:
    lines = ["# The escaping derivatives over five seeds (60-family calibration)", "",
             "Kept: seeds whose pirate accuracy stays within 5 points of the clean encoder's. Each mode column: of those, "
             "how many its calibrated threshold detects. tau*: white-box, per seed 0-4 (threshold in brackets).", "",
             "| variant | derivative | kept | white-box | score | label | collapse | white-box tau* per seed |",
             "|---|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        rows = list(csv.DictReader((ROOT / f"runs/ablation/{v}/students60/robustness.csv").open(newline="")))
        cal = v.removesuffix("_shadow")
        threshold = _threshold(ROOT / f"runs/ablation/{cal}/calibration60/calibration.json")
        for attack, strength in ATTACKS:
            rs = sorted((r for r in rows if r["attack"] == attack and float(r["strength"]) == float(strength)),
                        key=lambda r: int(r["seed"]))
            kept = [r for r in rs if r["keeps_utility"] == "True"]
            hits = [f"{sum(r[f'calibrated_{m}'] == 'True' for r in kept)}/{len(kept)}" for m in MODES]
            taus = ", ".join(f"{float(r['tau_star_whitebox']):.4f}" for r in rs)
            lines.append(f"| {v} | {attack}@{strength} | {len(kept)}/{len(rs)} | " + " | ".join(hits)
                         + f" | {taus} ({threshold:.4f}) |")
    (Path(__file__).parent / "students.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _threshold(path: Path) -> float:
    return float(json.loads(path.read_text())["modes"]["whitebox"]["threshold"])


if __name__ == "__main__":
    main()
