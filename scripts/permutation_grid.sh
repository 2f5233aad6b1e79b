#!/usr/bin/env bash
# The robustness grid's derivatives under the permutation tests that decide (#27, results/permutation_grid/): the
# demo's release three ways (plain AWEncoder; stage 2's specificity term holding the alternatives at f0's response;
# the same term holding them at their controls', `specific.suppress=1`, the demo's default) attacked by
# configs/robustness/ablation.yaml (19 derivatives, one seed), each verified against the demo secret's J = 19
# alternatives in three accesses: weights, the pirate's probabilities, its labels. Prints, per release, the
# permutation p of every derivative and, per access, how many thefts reach p = 1/(J + 1) = 0.05 (the demo's alpha).
#
#   bash scripts/permutation_grid.sh [PLAIN_DEMO] [SPECIFIC_DEMO] [OUT_DIR]
#   # defaults: runs/demo (`awenc demo specific.weight=0`), runs/demo_spec (`awenc demo specific.suppress=0`, 8 on 32),
#   # runs/permutation_grid; the suppress release is embedded from SPECIFIC_DEMO's stage-2 config with
#   # specific.suppress=1 (what `awenc demo` ran then), from the same f0 and secret
# (PYTHON: the interpreter, default .venv/bin/python; DRAWS="1 2": also other secrets on the same f0, stage 1 run
#  again with run.seed=1, 2, each embedded the three ways from the demos' stage-2 configs and attacked the same way,
#  into OUT_DIR/draw<seed>/; the counts are then printed per draw and in all.) About 2 minutes a grid and 1.5-2.5
#  an embedding on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
plain="${1:-runs/demo}"
spec="${2:-runs/demo_spec}"
out="${3:-runs/permutation_grid}"
PY="${PYTHON:-.venv/bin/python}"
awenc() { "$PY" -m dist_awenc "$@"; }
"$PY" scripts/plain_demo.py "$plain" || exit 2
[ -f "$plain/report.json" ] || awenc demo specific.weight=0 run.out_dir="$(dirname "$plain")" run.name="$(basename "$plain")"
# 8 alternatives on 32 images a step: the demo's setting when these tables were made (4 on 16 since 2026-12-07)
[ -f "$spec/report.json" ] || awenc demo specific.suppress=0 specific.secrets=8 specific.images=32 \
    run.out_dir="$(dirname "$spec")" run.name="$(basename "$spec")"
grid() {  # grid OUT NAME ENCODER SECRET
  awenc robustness --config configs/robustness/ablation.yaml run.out_dir="$1" run.name="$2" encoder="$3" secret="$4"
}
suppressed() {  # suppressed OUT SECRET_DIR: the suppress release of that secret, embedded once
  [ -f "$1/embed_suppress/encoder.safetensors" ] || awenc embed --config "$spec/embed/config.yaml" specific.suppress=1 \
      secret="$2" run.out_dir="$1" run.name=embed_suppress
}
for release in plain:"$plain" specific:"$spec"; do
  demo="${release#*:}"
  grid "$out" "${release%%:*}" "$demo/embed/encoder.safetensors" "$demo/watermark/secret.safetensors"
done
suppressed "$out" "$spec/watermark"
grid "$out" suppress "$out/embed_suppress/encoder.safetensors" "$spec/watermark/secret.safetensors"
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
  suppressed "$d" "$d/watermark"
  grid "$d" suppress "$d/embed_suppress/encoder.safetensors" "$d/watermark/secret.safetensors"
done
"$PY" - "$out" ${DRAWS:-} <<'PYEOF'
import csv, sys
out, draws = sys.argv[1], sys.argv[2:]
keys = {"weights": "p_permutation", "probabilities": "p_permutation_blackbox_score", "labels": "p_permutation_blackbox_label"}
releases = ("plain", "specific", "suppress")
rows = {name: list(csv.DictReader(open(f"{out}/{name}/robustness.csv"))) for name in releases}
print("| derivative | theft (" + " / ".join(releases) + ") | "
      + " | ".join(f"p {a} (" + " / ".join(releases) + ")" for a in keys) + " |")
print("|---|---|" + "---|" * len(keys))
for group in zip(*rows.values()):
    a = group[0]
    d = "none" if a["attack"] == "none" else f"{a['attack']}@{float(a['strength']):g}"
    theft = "/".join("yes" if r["theft"] == "True" else "no" for r in group)
    print(f"| {d} | {theft} | " + " | ".join(" / ".join(f"{float(r[k]):.3g}" for r in group) for k in keys.values()) + " |")
print()
print("| release | thefts | " + " | ".join(f"{a} at p = 0.05" for a in keys) + " | the release itself: p "
      + " / ".join(keys) + " |")
print("|---|---|" + "---|" * (len(keys) + 1))
total = {name: [0] * (len(keys) + 1) for name in releases}
for label, folder in [("the demo's secret", out)] + [(f"draw {s}", f"{out}/draw{s}") for s in draws]:
    for name in releases:
        rs = list(csv.DictReader(open(f"{folder}/{name}/robustness.csv")))
        thefts = [r for r in rs if r["theft"] == "True"]
        hits = [sum(float(r[k]) <= 0.05 + 1e-12 for r in thefts) for k in keys.values()]
        total[name] = [t + x for t, x in zip(total[name], [len(thefts), *hits])]
        release = next(r for r in rs if r["attack"] == "none")
        print(f"| {name}, {label} | {len(thefts)} | " + " | ".join(f"{h}/{len(thefts)}" for h in hits) + " | "
              + " / ".join(f"{float(release[k]):.3g}" for k in keys.values()) + " |")
if draws:
    for name, (n, *hits) in total.items():
        print(f"| **{name}, {1 + len(draws)} secrets** | {n} | " + " | ".join(f"**{h}/{n} ({h / n:.2f})**" for h in hits)
              + " | |")
PYEOF
