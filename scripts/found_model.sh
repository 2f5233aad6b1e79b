#!/usr/bin/env bash
# The walkthrough of docs/in-the-wild.md, end to end on the demo's artifacts:
#   bash scripts/demo.sh                                               # runs/demo (f0, secret, watermarked encoder)
#   .venv/bin/awenc calibrate --config configs/sweep/null/digits.yaml  # runs/calibration, bound to the secret
#   bash scripts/found_model.sh                                        # runs/found
# 1. The pirate's weights: the watermarked encoder re-saved by plain PyTorch in the pirate's own conventions
#    (a training checkpoint, DDP's "module." prefix, fp16, a classifier head), imported and verified white-box.
# 2. The pirate's product: a 2-class task (even vs odd digits) on those weights behind an API this project did
#    not write (docs/examples/pirate_api.py: its own JSON layout, one image per request, an API key), verified
#    black-box in label mode through an adapter with 100 queries, then replayed from the evidence bundle alone.
set -euo pipefail
cd "$(dirname "$0")/.."
A=.venv/bin/awenc
W=runs/found
PORT="${PORT:-8765}"
rm -rf "$W" && mkdir -p "$W"

echo "== 1. the pirate's checkpoint, written by plain PyTorch"
.venv/bin/python - <<'EOF'
import torch
from safetensors.torch import load_file

torch.manual_seed(0)
stolen = {k.removeprefix("backbone."): v for k, v in load_file("runs/demo/embed/encoder.safetensors").items()}
state = {f"module.{k}": v.half() for k, v in stolen.items()}             # DDP prefix, fp16
dim = max(v.shape[0] for k, v in stolen.items() if v.ndim == 4)           # the last conv's channels
state["module.fc.weight"] = torch.randn(2, dim).half()                   # the pirate's head
state["module.fc.bias"] = torch.zeros(2).half()
torch.save({"model": state, "epoch": 99, "optimizer": {"lr": 0.1}}, "runs/found/pirate_checkpoint.pt")
EOF
$A import "$W/pirate_checkpoint.pt" --arch tiny --input-size 16 --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5 --out "$W/imported"
$A verify --mode whitebox suspect="$W/imported" secret=runs/demo/watermark run.out_dir="$W" run.name=v_weights

echo "== 2. the pirate's API: a 2-class task behind a foreign JSON API"
$A downstream encoder="$W/imported" classes=2 run.out_dir="$W" run.name=pirate_task
export PIRATE_API_KEY="walkthrough-$RANDOM$RANDOM"
.venv/bin/python docs/examples/pirate_api.py "$W/pirate_task" --port "$PORT" > "$W/pirate_api.log" 2>&1 &
api=$!
trap 'kill $api 2>/dev/null || true' EXIT
for _ in $(seq 50); do grep -q "pirate API on" "$W/pirate_api.log" 2>/dev/null && break; sleep 0.2; done
$A verify --mode blackbox_label --endpoint "http://127.0.0.1:$PORT" secret=runs/demo/watermark \
  verify.adapter=docs/examples/pirate_api.yaml verify.classes=2 run.out_dir="$W" run.name=v_api
kill $api; wait $api || true
cat "$W/pirate_api.log"

echo "== 3. anyone holding the secret re-checks the claim from the bundle alone"
$A verify --replay "$W/v_api" --published-sha256 runs/demo/embed
