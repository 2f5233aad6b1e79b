#!/usr/bin/env bash
# The secret-permutation test at J = 999 (alpha = 1e-3) on the demo's f0: stage 1 makes 1000 candidate secrets and
# draws the owner's, stage 2 embeds it with the demo's settings, and the watermarked encoder, the clean f0 and the
# demo's independent encoder are verified white-box against the 999 alternatives. Writes runs/j999/ and prints the
# summary table of results/permutation_j999/README.md (CPU-minutes from `time`).
#
#   bash scripts/permutation_j999.sh [DEMO_DIR] [OUT_DIR]   # defaults: runs/demo (plain AWEncoder: made by
#   `awenc demo specific.weight=0` if absent, refused if made with the specificity term), runs/j999
#   (PYTHON: the interpreter, default .venv/bin/python; EMBED_FLAGS: extra stage-2 overrides, e.g.
#    "specific.weight=10 specific.secrets=8" with EMBED_NAME=embed_specific; GRID=1: then attack that encoder with
#    the robustness grid, configs/robustness/ablation.yaml, about 11 minutes, and print its permutation p per derivative)
#
# About 35 minutes of stage 1 on a quiet 2-core machine (1000 secrets, 16 at a time), under a minute of embedding,
# and 2-3 minutes of verification per suspect (two forward passes of 256 images per secret).
set -euo pipefail
cd "$(dirname "$0")/.."
demo="${1:-runs/demo}"
out="${2:-runs/j999}"
PY="${PYTHON:-.venv/bin/python}"
awenc() { "$PY" -m dist_awenc "$@"; }
"$PY" scripts/plain_demo.py "$demo" || exit 2
[ -f "$demo/report.json" ] || awenc demo specific.weight=0 run.out_dir="$(dirname "$demo")" run.name="$(basename "$demo")"
mkdir -p "$out"
[ -f "$out/watermark/secret.safetensors" ] || { time awenc watermark --config "$demo/watermark/config.yaml" \
    plan.alternatives=999 plan.alpha=0.001 run.out_dir="$out" run.name=watermark; } 2> >(tee "$out/watermark.time" >&2)
emb="${EMBED_NAME:-embed}"
# shellcheck disable=SC2086
[ -f "$out/$emb/encoder.safetensors" ] || awenc embed --config "$demo/embed/config.yaml" \
    encoder="$demo/f0" secret="$out/watermark" run.out_dir="$out" run.name="$emb" ${EMBED_FLAGS:-}
for suspect in "$emb":"$out/$emb" f0:"$demo/f0" independent:"$demo/independent"; do
  name="${suspect%%:*}"
  [ -f "$out/verify_$name/verdict.json" ] || { time awenc verify --mode whitebox suspect="${suspect#*:}" \
      secret="$out/watermark" run.out_dir="$out" run.name="verify_$name"; } 2> >(tee "$out/verify_$name.time" >&2)
done
"$PY" - "$out" "$emb" <<'EOF'
import json, sys
out, emb = sys.argv[1:3]
print("| suspect | permutation p (smallest 0.001) | owner's statistic | alternatives mean / sd / max | owner z | decision at 1e-3 |")
print("|---|---|---|---|---|---|")
for name in (emb, "f0", "independent"):
    v = json.load(open(f"{out}/verify_{name}/verdict.json"))
    t = next(x for x in v["tests"] if x["mode"] == "whitebox_permutation")
    d = t["details"]
    z = "n/a" if d["owner_z"] is None else f"{d['owner_z']:.2f}"
    print(f"| {name} | {t['p_value']:.4g} | {d['owner_statistic']:+.4f} | {d['alternatives_mean']:+.4f} / "
          f"{d['alternatives_sd']:.4f} / {d['alternatives_max']:+.4f} | {z} | "
          f"{'ownership evidence' if v['overall']['decision'] else 'no evidence'} |")
EOF
[ "${GRID:-0}" = 1 ] || exit 0
grid="robustness${emb#embed}"
[ -f "$out/$grid/robustness.csv" ] || { time awenc robustness --config configs/robustness/ablation.yaml \
    run.out_dir="$out" run.name="$grid" encoder="$out/$emb/encoder.safetensors" secret="$out/watermark/secret.safetensors"; } \
    2> >(tee "$out/$grid.time" >&2)
"$PY" - "$out/$grid/robustness.csv" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print("| derivative | theft | permutation p (J = 999) | decides at 1e-3 |")
print("|---|---|---|---|")
for r in rows:
    p = float(r["p_permutation"])
    print(f"| {r['attack']}@{float(r['strength']):g} | {'yes' if r['theft'] == 'True' else 'no'} | {p:.3g} | {'yes' if p <= 1e-3 else 'no'} |")
EOF
