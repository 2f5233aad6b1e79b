#!/usr/bin/env bash
# GPU checks, in one call of under 8 minutes: every GPU suite at full size on the visible GPUs.
#
#   0. health what throughput cannot show about the ImageNet SimCLR recipe: peak GPU memory at its per-GPU batch
#             (512 images x 2 views, 224 px, bf16 + channels_last; the largest batch that fits if that does not),
#             SyncBN under DDP against one BatchNorm over the global batch (needs 2 GPUs), and that its loss falls
#             over 300 steps of its step (ResNet-50, 224 px, the project's fit, a pool of generated images)
#   1. step   the project's training step (fit, views made in the step) against a plain step on premade views
#   2. e2e    `awenc pretrain` launched as a user does (real loader) against the same plain step, through
#             accelerate launch three ways: one process (configs/accelerate/1gpu.yaml), DDP
#             (configs/accelerate/8gpu.yaml) and DeepSpeed ZeRO-2 (configs/accelerate/8gpu_zero2.yaml, SGD: the
#             project refuses LARS under ZeRO); ResNet-50 at 224 px, bf16 + channels_last, one process per GPU
#   3. cost   device-seconds of watermarking as a fraction of the pre-training it protects
# (`loader` and `verify` are CPU suites: the loader's CPU cost per core and verification's CPU seconds; not here.)
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR]            # -> benchmarks/results/<card name>/{health,step,e2e,cost}.{json,md}
#   bash benchmarks/gpu_checks.sh --dry-run [OUT_DIR]  # the same sequence on the CPU at tiny sizes (--quick: tiny
#                                                      # models, a few steps), default OUT_DIR a new temporary folder
#   bash benchmarks/gpu_checks.sh --prepare            # on a machine that reaches PyPI: fetch the wheels a bare GPU
#                                                      # machine lacks (omegaconf; DeepSpeed, built from its source
#                                                      # archive, and its dependencies, for cp312) into benchmarks/.wheels/
#                                                      # (git-ignored: carry that folder to the GPU machine)
#
# Needs torch with CUDA (not for --dry-run), torchvision, accelerate, safetensors, PyYAML, tqdm, numpy, pillow;
# what is missing of omegaconf / DeepSpeed is installed from benchmarks/.wheels/ into a temporary folder. Without
# DeepSpeed the ZeRO-2 run is skipped (its row says `not installed`). The package is used from this checkout
# (PYTHONPATH); nothing is installed system-wide. After the suites the files are validated against the schema, and
# every part must have written its rows: exit 1 if a suite file is missing or invalid, a row `failed` (a health
# check that does not hold), or a health check was not run for want of time.
#
# Environment:
#   PYTHON          interpreter (default: python3)
#   BENCH_HEALTH_S, BENCH_STEP_S, BENCH_E2E_S, BENCH_COST_S
#                   per-suite budgets in seconds (default 100, 120, 160, 40; 420 in all): rows not started by then are recorded
#                   as skipped; a suite is killed 45 s after its budget (its JSON, rewritten after every row,
#                   keeps the rows measured so far)
#   BENCH_DEADLINE_S  the whole sequence's limit (default 450): a suite never runs past it
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=benchmarks/.wheels
PY="${PYTHON:-python3}"
say() { echo "gpu_checks: $*" >&2; }

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$WHEELS"
  # binary wheels for the GPU machine's Python 3.12; no dependencies (torch, numpy... are there already)
  "$PY" -m pip download --no-deps -q -d "$WHEELS" --only-binary=:all: --python-version 3.12 --implementation cp \
      --abi cp312 --abi abi3 --abi none --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
      "omegaconf==2.4.0" hjson einops msgpack ninja py-cpuinfo "pydantic==2.14.4" "pydantic-core==2.50.5" \
      annotated-types typing-inspection || { say "pip download failed"; exit 2; }
  # DeepSpeed is published as a source archive only: build its (pure-Python, no ops) wheel here
  "$PY" -m pip wheel --no-deps -q -w "$WHEELS" "deepspeed==0.19.8" || { say "building the DeepSpeed wheel failed"; exit 2; }
  ls -l "$WHEELS"
  exit 0
fi

DRY=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY=1
  shift
  export CUDA_VISIBLE_DEVICES=""  # the CPU, even on a GPU machine
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

# ------------------------------------------------------------ dependencies
missing="$("$PY" - <<'EOF'
import importlib.util
need = ["torch", "torchvision", "accelerate", "safetensors", "yaml", "tqdm", "numpy", "PIL", "omegaconf"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)"
# wheels of benchmarks/.wheels whose module is not importable here (nothing already installed is shadowed)
to_install="$("$PY" - "$WHEELS" <<'EOF'
import importlib.util, pathlib, sys
module = {"omegaconf": "omegaconf", "deepspeed": "deepspeed", "hjson": "hjson", "einops": "einops", "msgpack": "msgpack",
          "ninja": "ninja", "py_cpuinfo": "cpuinfo", "pydantic": "pydantic", "pydantic_core": "pydantic_core",
          "annotated_types": "annotated_types", "typing_inspection": "typing_inspection"}
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    m = module.get(whl.name.split("-")[0].lower())
    if m and importlib.util.find_spec(m) is None:
        print(whl)
EOF
)"
if [ -n "$to_install" ]; then
  site="$(mktemp -d)/site"
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --no-index --no-deps --target "$site" $to_install || { say "installing from $WHEELS failed"; exit 2; }
  export PYTHONPATH="$PYTHONPATH:$site"
  say "installed from $WHEELS into $site: $(echo $to_install | xargs -n1 basename | tr '\n' ' ')"
  missing="$(for m in $missing; do "$PY" -c "import $m" 2>/dev/null || echo "$m"; done | xargs)"
fi
if [ -n "$missing" ]; then
  say "missing Python modules: $missing"
  say "omegaconf: run 'bash benchmarks/gpu_checks.sh --prepare' where PyPI is reachable and bring benchmarks/.wheels along"
  exit 2
fi
"$PY" -c "import deepspeed, transformers" >/dev/null 2>&1 \
  || say "deepspeed (or transformers) not importable: the ZeRO-2 launch is skipped, its e2e row says 'not installed'"
if [ "$DRY" = 1 ]; then
  SIZE=(--quick)
  out="${1:-$(mktemp -d /tmp/awenc_gpu_checks_dry.XXXXXX)}"
  say "dry run on the CPU at --quick sizes (tiny models, a few steps)"
else
  SIZE=()
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { say "no CUDA device visible to torch (--dry-run runs on the CPU)"; exit 2; }
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2
  slug="$("$PY" -c "from benchmarks.common import device_slug, pick_device; print(device_slug(pick_device()))")"
  out="${1:-benchmarks/results/$slug}"
fi
mkdir -p "$out"
say "results -> $out"

# ------------------------------------------------------------ suites (the same command lines in both forms)
deadline="${BENCH_DEADLINE_S:-450}"
rc=0
run_part() {  # run_part SUITE BUDGET [suite options...]
  local suite=$1 budget=$2 left hard code start
  shift 2
  left=$((deadline - SECONDS))
  if [ "$left" -lt 30 ]; then
    say "$suite: not run, the sequence's deadline (${deadline}s) is reached"
    rc=1
    return
  fi
  hard=$((budget + 45))
  [ "$hard" -le "$left" ] || { hard=$left; budget=$((left > 60 ? left - 45 : left / 2)); }
  say "$suite (budget ${budget}s, killed after ${hard}s): python -m benchmarks $suite ${SIZE[*]+${SIZE[*]}} $*"
  start=$SECONDS
  timeout --signal=INT --kill-after=20 "$hard" "$PY" -m benchmarks "$suite" ${SIZE[@]+"${SIZE[@]}"} --out "$out" --max-seconds "$budget" "$@"
  code=$?
  say "$suite: exit $code after $((SECONDS - start))s"
  [ "$code" -eq 0 ] || rc=1
}
run_part health "${BENCH_HEALTH_S:-100}"
run_part step "${BENCH_STEP_S:-120}"
run_part e2e "${BENCH_E2E_S:-160}" --launchers single ddp zero2
run_part cost "${BENCH_COST_S:-40}"

# ------------------------------------------------------------ checks
"$PY" -m benchmarks validate "$out" || rc=1
"$PY" - "$out" <<'EOF' || rc=1
import json, pathlib, sys
out, bad = pathlib.Path(sys.argv[1]), []
for suite in ("health", "step", "e2e", "cost"):
    f = out / f"{suite}.json"
    if not f.exists():
        bad.append(f"{f}: missing (the suite did not start or was killed before its first row)")
        continue
    rows = json.loads(f.read_text())["rows"]
    bad += [f"{suite}: {r['name']}: failed: {r.get('note', '')}" for r in rows if r["status"] == "failed"]
    if not any(r["status"] == "ok" and r.get("kind") != "aux" for r in rows):
        bad.append(f"{suite}: no row measured")
    if suite == "health":  # every check ran, or says why it cannot run here (CPU, one GPU): never for want of time
        by = {r.get("check"): r for r in rows}
        bad += [f"health: no {c} row" for c in ("memory", "sync_bn", "loss") if c not in by]
        bad += [f"health: {c}: not run: {r['note']}" for c, r in by.items()
                if r["status"] == "skipped" and "budget" in r.get("note", "")]
    if suite == "e2e":
        launched = {r["settings"].get("launcher") for r in rows}
        bad += [f"e2e: no {k} row" for k in ("single", "ddp", "zero2") if k not in launched]
for b in bad:
    print(f"gpu_checks: {b}", file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
for f in "$out"/*.md; do echo; cat "$f"; done
say "$([ $rc -eq 0 ] && echo ok || echo FAILED) after ${SECONDS}s -> $out"
exit $rc
