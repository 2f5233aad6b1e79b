#!/usr/bin/env bash
# The demo's downstream models behind a pirate's serving path that re-encodes every upload as JPEG, verified black-box
# (score and label mode, each with its secret-permutation test) with the verifier's queries sent as PNG and as JPEG.
#   bash scripts/demo.sh                  # runs/demo (reused when complete)
#   bash scripts/serving_jpeg.sh          # runs/serving: one verification per row; prints the table
# DEMO (runs/demo), OUT (runs/serving), AWENC (.venv/bin/awenc) and PORT (8790) may be set; SERVER_Q ("none 90 75")
# and QUERY ("png jpeg90 jpeg95") choose the grid.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO="${DEMO:-runs/demo}"
OUT="${OUT:-runs/serving}"
AWENC="${AWENC:-.venv/bin/awenc}"
PORT="${PORT:-8790}"
SERVER_Q="${SERVER_Q:-none 90 75}"
QUERY="${QUERY:-png jpeg90 jpeg95}"
mkdir -p "$OUT/adapters"
for q in $QUERY; do  # the verifier's query encodings, as adapters
  case "$q" in
    png) cp configs/adapters/serve_png.yaml "$OUT/adapters/$q.yaml" ;;
    jpeg*) sed "s/^jpeg_quality: .*/jpeg_quality: ${q#jpeg}/" configs/adapters/serve_jpeg.yaml > "$OUT/adapters/$q.yaml" ;;
  esac
done
server=""
trap '[ -n "$server" ] && kill "$server" 2>/dev/null || true' EXIT
for model in watermarked clean; do
  for sq in $SERVER_Q; do
    for mode in blackbox_score blackbox_label; do
      flags=()
      [ "$sq" != none ] && flags+=(--jpeg-quality "$sq")
      [ "$mode" = blackbox_label ] && flags+=(--labels-only)  # label mode is the plan's primary for labels only
      log="$OUT/serve_${model}_${sq}_${mode}.log"
      $AWENC serve "$DEMO/downstream_$model/model.safetensors" --port "$PORT" ${flags[@]+"${flags[@]}"} > "$log" 2>&1 &
      server=$!
      for _ in $(seq 100); do grep -q "^serving" "$log" 2>/dev/null && break; sleep 0.2; done
      for q in $QUERY; do
        name="${model}_server-${sq}_${q}_${mode}"
        rm -rf "${OUT:?}/$name"
        $AWENC verify --mode "$mode" --endpoint "http://127.0.0.1:$PORT" secret="$DEMO/watermark" \
          verify.adapter="$OUT/adapters/$q.yaml" run.out_dir="$OUT" run.name="$name" > "$OUT/$name.log" 2>&1
        echo "$name: $(grep -c . "$OUT/$name/queries.jsonl") queries"
      done
      kill "$server"; wait "$server" 2>/dev/null || true; server=""
    done
  done
done
"${PYTHON:-.venv/bin/python}" - "$OUT" <<'PY'
import csv, json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = []
for f in sorted(out.glob("*/verdict.json")):
    model, server, query, mode = f.parent.name.split("_", 3)
    doc = json.loads(f.read_text())
    margin, perm = (doc["tests"] + [None])[:2]
    rows.append({"model": model, "server_jpeg": server.removeprefix("server-"), "queries": query, "mode": mode,
                 "margin_effect": margin["effect"], "margin_image_p": margin["image_p"],
                 "perm_p": perm and perm["p_value"], "perm_owner": perm and perm["details"]["owner_statistic"],
                 "perm_alt_max": perm and perm["details"]["alternatives_max"], "perm_z": perm and perm["details"]["owner_z"],
                 "decision": doc["decision"], "chain": doc["evidence"]["chain_sha256"][:12]})
with open(out / "serving.csv", "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
print("| model | server JPEG | queries | mode | effect (margin test) | image-level p | permutation p | owner / alternatives max (z) | verdict at 0.05 |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    z = f"{r['perm_z']:.2f}" if r["perm_z"] is not None else "n/a"
    print(f"| {r['model']} | {r['server_jpeg']} | {r['queries']} | {r['mode']} | {r['margin_effect']:+.4f} | "
          f"{r['margin_image_p']:.3g} | {r['perm_p']:.3g} | {r['perm_owner']:+.4f} / {r['perm_alt_max']:+.4f} ({z}) | "
          f"{'**ownership evidence**' if r['decision'] else 'no evidence'} |")
PY
