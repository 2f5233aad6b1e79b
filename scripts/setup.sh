#!/usr/bin/env bash
# Create .venv and install dist_awenc into it (editable), with torch first.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh dev      + test tools
# torch 2.14.1 / torchvision 0.29.1 are the versions this project is tested with;
# set AWENC_TORCH="" to keep whatever torch the environment already has.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
torch_spec="${AWENC_TORCH-torch==2.14.1 torchvision==0.29.1}"
if [ -n "$torch_spec" ]; then
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q $torch_spec
fi
if [ -n "$extras" ]; then
  .venv/bin/python -m pip install -q -e ".[$extras]"
else
  .venv/bin/python -m pip install -q -e .
fi
echo "dist_awenc installed in $(pwd)/.venv"
