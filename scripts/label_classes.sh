#!/usr/bin/env bash
# Label mode's power against the pirate task's number of classes (issue #13), on the demo's encoders.
#
#   bash scripts/demo.sh                                               # runs/demo: f0, secret, watermarked encoder
#   .venv/bin/awenc calibrate --config configs/sweep/null/digits.yaml  # runs/calibration: label thresholds per class count
#   bash scripts/label_classes.sh                                      # runs/label_classes -> results/label_classes/
#
# For k in 2, 3, 5, 10 and three pirate seeds (the seed of the head's train split and training), the pirate's
# digits task is regrouped into k classes (label mod k) on top of the watermarked encoder, the owner's clean f0
# and the independent encoder, and verified in label mode with 100 queries at the calibrated k-class threshold
# (verify.classes=k). The table also gives, from the same logged hit counts, the p-value at the largest label
# threshold (what verify uses when the class count is not stated) and at the uncalibrated default margin 0.3.
set -euo pipefail
cd "$(dirname "$0")/.."
A=.venv/bin/awenc
OUT=runs/label_classes
SEEDS="${SEEDS:-0 1 2}"
for k in 2 3 5 10; do
  for enc in embed f0 independent; do
    for seed in $SEEDS; do
      name="${enc}_k${k}_s${seed}"
      [ -f "$OUT/v_$name/verdict.json" ] && continue
      $A downstream encoder="runs/demo/$enc" classes="$k" run.seed="$seed" run.out_dir="$OUT" run.name="$name" \
        probe.epochs=100 >/dev/null
      $A verify --mode blackbox_label suspect="$OUT/$name" secret=runs/demo/watermark verify.classes="$k" \
        run.out_dir="$OUT" run.name="v_$name" >/dev/null
    done
  done
done
mkdir -p results/label_classes
.venv/bin/python - "$OUT" results/label_classes <<'EOF'
import json, sys
from pathlib import Path

from dist_awenc.verify.calibration import LABEL, load_calibration
from dist_awenc.verify.stats import exact_paired_margin_p

out, dest = Path(sys.argv[1]), Path(sys.argv[2])
record = json.loads(Path("runs/demo/watermark/secret.json").read_text())
cal = load_calibration(record["calibration"]["path"])  # the calibration bound to the secret, which verify used
largest_key, _ = cal.key_for(LABEL, None)
tau_max = cal.thresholds[largest_key]
names = {"embed": "watermarked", "f0": "owner's clean f0", "independent": "independent"}
rows, power = [], {}
for k in (2, 3, 5, 10):
    for enc in names:
        for v in sorted(out.glob(f"v_{enc}_k{k}_s*/verdict.json")):
            d = json.loads(v.read_text())
            x = d["details"]
            b, c, n = x["discordant_marked"], x["discordant_control"], d["n"]
            p_max = exact_paired_margin_p(b, c, n, tau_max)
            p_03 = exact_paired_margin_p(b, c, n, 0.3)
            seed = v.parent.name.rsplit("_s", 1)[1]
            rows.append(f"| {k} | {names[enc]} | {seed} | {x['hit_rate_marked']:.2f} | {x['hit_rate_control']:.2f} | "
                        f"{d['threshold']:.4f} | {d['p_value']:.2g} | {'**yes**' if d['decision'] else 'no'} | "
                        f"{p_max:.2g} | {'yes' if p_max < d['alpha'] else 'no'} | {p_03:.2g} | {x['queries']} |")
            power.setdefault(f"{names[enc]}@{k}", []).append(bool(d["decision"]))
head = ["| classes k | encoder | pirate seed | hit rate marked | hit rate control | k-class threshold | p | decides at alpha 1e-3 "
        f"| p at the largest threshold ({tau_max:.4f}, k unstated) | decides | p at the default margin 0.3 | queries |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
(dest / "table.md").write_text("\n".join(head + rows) + "\n")
(dest / "power.json").write_text(json.dumps({"calibration_sha256": cal.sha256, "largest_label_threshold": tau_max,
                                             "thresholds": {k: v for k, v in cal.thresholds.items() if k.startswith(LABEL)},
                                             "decisions": power}, indent=2) + "\n")
print("\n".join(head + rows))
EOF
