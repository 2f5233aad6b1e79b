#!/usr/bin/env bash
# GPU throughput checks: the `step`, `e2e` and `cost` suites at full size on one GPU, 6 to 8 minutes.
#
#   bash benchmarks/gpu_checks.sh             # -> benchmarks/results/<card name>/{step,e2e,cost}.{json,md}
#   bash benchmarks/gpu_checks.sh OUT_DIR     # elsewhere
#   bash benchmarks/gpu_checks.sh --prepare   # on a machine that reaches PyPI: fetch the pure-Python wheels
#                                             # a bare GPU machine lacks into benchmarks/.wheels/ (git-ignored;
#                                             # carry that folder to the GPU machine)
#
# Needs torch with CUDA, torchvision, accelerate, safetensors, PyYAML, tqdm, numpy, pillow; omegaconf
# (missing on the project's GPU machines) is installed from benchmarks/.wheels/ into a temporary folder.
# The package is used from this checkout (PYTHONPATH), nothing is installed system-wide.
#
# Environment:
#   PYTHON         interpreter (default: python3)
#   BENCH_SUITES   suites to run, in order (default: "step e2e cost")
#   BENCH_STEP_S, BENCH_E2E_S, BENCH_COST_S
#                  per-suite budgets in seconds (default 210, 120, 60): rows not started by then are
#                  recorded as skipped; each suite is also killed 90 s after its budget (the rows
#                  measured so far stay in its JSON, which is rewritten after every row)
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=benchmarks/.wheels
PY="${PYTHON:-python3}"
say() { echo "gpu_checks: $*" >&2; }

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$WHEELS"
  "$PY" -m pip download --no-deps -q -d "$WHEELS" "omegaconf==2.4.0" || { say "pip download failed"; exit 2; }
  ls -l "$WHEELS"
  exit 0
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
if [ -n "$missing" ]; then
  if [ "$missing" = "omegaconf" ] && ls "$WHEELS"/omegaconf-*.whl >/dev/null 2>&1; then
    site="$(mktemp -d)/site"
    "$PY" -m pip install -q --no-index --no-deps --target "$site" "$WHEELS"/omegaconf-*.whl \
      || { say "installing $WHEELS/omegaconf-*.whl failed"; exit 2; }
    export PYTHONPATH="$PYTHONPATH:$site"
    say "omegaconf from $WHEELS (in $site)"
  else
    say "missing Python modules: $missing"
    say "omegaconf: run 'bash benchmarks/gpu_checks.sh --prepare' where PyPI is reachable and bring benchmarks/.wheels along"
    exit 2
  fi
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { say "no CUDA device visible to torch"; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2

slug="$("$PY" -c "from benchmarks.common import device_slug, pick_device; print(device_slug(pick_device()))")"
out="${1:-benchmarks/results/$slug}"
mkdir -p "$out"
say "results -> $out"

# ------------------------------------------------------------ suites
rc=0
for suite in ${BENCH_SUITES:-step e2e cost}; do
  case "$suite" in
    step) budget="${BENCH_STEP_S:-210}" ;;
    e2e) budget="${BENCH_E2E_S:-120}" ;;
    cost) budget="${BENCH_COST_S:-60}" ;;
    *) budget=300 ;;
  esac
  hard=$((budget + 90))
  say "$suite (budget ${budget}s, killed after ${hard}s)"
  start=$SECONDS
  timeout --signal=INT --kill-after=20 "$hard" "$PY" -m benchmarks "$suite" --out "$out" --max-seconds "$budget"
  code=$?
  say "$suite: exit $code after $((SECONDS - start))s"
  [ "$code" -eq 0 ] || rc=1
done

"$PY" -m benchmarks validate "$out" || rc=1
for f in "$out"/*.md; do echo; cat "$f"; done
exit $rc
