#!/usr/bin/env bash
# A pirate at twice the input resolution (#27, results/resolution/): the demo's release and, as a null, the demo's
# independent encoder, each fine-tuned at 32 px (configs/robustness/resolution.yaml: finetune_resolution@2, 5
# seeds) and verified against the demo secret's J = 19 alternatives in three accesses (weights, probabilities,
# labels). Prints the per-seed table of results/resolution/README.md.
#
#   bash scripts/resolution.sh [DEMO_DIR] [OUT_DIR]   # defaults: runs/demo, runs/resolution
# (DEMO_DIR, if absent, is made by `awenc demo specific.weight=0`: plain AWEncoder, the release/ rows)
# (PYTHON: the interpreter, default .venv/bin/python; SUSPECTS: name:folder pairs to attack, default
#  "release:$DEMO_DIR/embed independent:$DEMO_DIR/independent".) About 40 s a derivative on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
demo="${1:-runs/demo}"
out="${2:-runs/resolution}"
PY="${PYTHON:-.venv/bin/python}"
awenc() { "$PY" -m dist_awenc "$@"; }
[ -f "$demo/report.json" ] || awenc demo specific.weight=0 run.out_dir="$(dirname "$demo")" run.name="$(basename "$demo")"
suspects="${SUSPECTS:-release:$demo/embed independent:$demo/independent}"
for suspect in $suspects; do
  name="${suspect%%:*}"
  awenc robustness --config configs/robustness/resolution.yaml run.out_dir="$out" run.name="$name" \
      encoder="${suspect#*:}/encoder.safetensors" secret="$demo/watermark/secret.safetensors"
done
# shellcheck disable=SC2086
"$PY" - "$out" ${suspects} <<'PYEOF'
import csv, sys
out, names = sys.argv[1], [s.split(":")[0] for s in sys.argv[2:]]
print("| encoder | derivative | seed | input px | probe (f0 / random) | kNN (f0 / random) | theft | p weights (read at px) | p probabilities | p labels |")
print("|---|---|---|---|---|---|---|---|---|---|")
for name in names:
    for r in csv.DictReader(open(f"{out}/{name}/robustness.csv")):
        d = "none" if r["attack"] == "none" else f"{r['attack']}@{float(r['strength']):g}"
        print(f"| {name} | {d} | {r['seed']} | {r['input_size']} | {float(r['linear_probe']):.4f} "
              f"({float(r['f0_linear_probe']):.4f} / {float(r['random_linear_probe']):.4f}) | {float(r['knn']):.4f} "
              f"({float(r['f0_knn']):.4f} / {float(r['random_knn']):.4f}) | {'yes' if r['theft'] == 'True' else 'no'} | "
              f"{float(r['p_permutation']):.3g} ({r.get('whitebox_px') or r['input_size']}) | "
              f"{float(r['p_permutation_blackbox_score']):.3g} | "
              f"{float(r['p_permutation_blackbox_label']):.3g} |")
PYEOF
