#!/usr/bin/env bash
# The robustness grid's derivatives under the permutation tests that decide (#27, results/permutation_grid/): the
# demo's release (plain AWEncoder, and with stage 2's specificity term, the demo's default) attacked by
# configs/robustness/ablation.yaml (19 derivatives, one seed), each verified against the demo secret's J = 19
# alternatives in three accesses: weights, the pirate's probabilities, its labels. Prints, per release, the
# permutation p of every derivative and, per access, how many thefts reach p = 1/(J + 1) = 0.05 (the demo's alpha).
#
#   bash scripts/permutation_grid.sh [PLAIN_DEMO] [DEMO] [OUT_DIR]
#   # defaults: runs/demo (`awenc demo specific.weight=0`), runs/demo_spec (`awenc demo`), runs/permutation_grid
# (PYTHON: the interpreter, default .venv/bin/python; DRAWS="1 2": also other secrets on the same f0, stage 1 run
#  again with run.seed=1, 2, each embedded both ways from the demos' stage-2 configs and attacked the same way, into
#  OUT_DIR/draw<seed>/; the counts are then printed per draw.) About 2 minutes a grid, 10 a draw, on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
plain="${1:-runs/demo}"
spec="${2:-runs/demo_spec}"
out="${3:-runs/permutation_grid}"
PY="${PYTHON:-.venv/bin/python}"
awenc() { "$PY" -m dist_awenc "$@"; }
"$PY" scripts/plain_demo.py "$plain" || exit 2
[ -f "$plain/report.json" ] || awenc demo specific.weight=0 run.out_dir="$(dirname "$plain")" run.name="$(basename "$plain")"
[ -f "$spec/report.json" ] || awenc demo run.out_dir="$(dirname "$spec")" run.name="$(basename "$spec")"
grid() {  # grid OUT NAME ENCODER SECRET
  awenc robustness --config configs/robustness/ablation.yaml run.out_dir="$1" run.name="$2" encoder="$3" secret="$4"
}
for release in plain:"$plain" specific:"$spec"; do
  demo="${release#*:}"
  grid "$out" "${release%%:*}" "$demo/embed/encoder.safetensors" "$demo/watermark/secret.safetensors"
done
for seed in ${DRAWS:-}; do
  d="$out/draw$seed"
  [ -f "$d/watermark/secret.safetensors" ] || awenc watermark --config "$plain/watermark/config.yaml" run.seed="$seed" \
      run.out_dir="$d" run.name=watermark
  for release in plain:"$plain" specific:"$spec"; do
    name="${release%%:*}"
    [ -f "$d/embed_$name/encoder.safetensors" ] || awenc embed --config "${release#*:}/embed/config.yaml" \
        secret="$d/watermark" run.out_dir="$d" run.name="embed_$name"
    grid "$d" "$name" "$d/embed_$name/encoder.safetensors" "$d/watermark/secret.safetensors"
  done
done
"$PY" - "$out" ${DRAWS:-} <<'PYEOF'
import csv, sys
out, draws = sys.argv[1], sys.argv[2:]
keys = {"weights": "p_permutation", "probabilities": "p_permutation_blackbox_score", "labels": "p_permutation_blackbox_label"}
rows = {name: list(csv.DictReader(open(f"{out}/{name}/robustness.csv"))) for name in ("plain", "specific")}
print("| derivative | theft (plain / specific) | " + " | ".join(f"p {a} (plain / specific)" for a in keys) + " |")
print("|---|---|" + "---|" * len(keys))
for a, b in zip(rows["plain"], rows["specific"]):
    d = "none" if a["attack"] == "none" else f"{a['attack']}@{float(a['strength']):g}"
    theft = "/".join("yes" if r["theft"] == "True" else "no" for r in (a, b))
    print(f"| {d} | {theft} | " + " | ".join(f"{float(a[k]):.3g} / {float(b[k]):.3g}" for k in keys.values()) + " |")
print()
print("| release | thefts | " + " | ".join(f"{a} at p = 0.05" for a in keys) + " |")
print("|---|---|" + "---|" * len(keys))
for name, rs in rows.items():
    thefts = [r for r in rs if r["theft"] == "True"]
    cells = [f"{sum(float(r[k]) <= 0.05 + 1e-12 for r in thefts)}/{len(thefts)}" for k in keys.values()]
    print(f"| {name} | {len(thefts)} | " + " | ".join(cells) + " |")
for seed in draws:  # the other secrets: the same counts, one line per release
    for name in ("plain", "specific"):
        thefts = [r for r in csv.DictReader(open(f"{out}/draw{seed}/{name}/robustness.csv")) if r["theft"] == "True"]
        cells = [f"{sum(float(r[k]) <= 0.05 + 1e-12 for r in thefts)}/{len(thefts)}" for k in keys.values()]
        print(f"| {name}, draw {seed} | {len(thefts)} | " + " | ".join(cells) + " |")
PYEOF
