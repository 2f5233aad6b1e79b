#!/usr/bin/env bash
# Set up and run the demo: the whole method on scikit-learn's digits, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/awenc demo "$@"
