#!/usr/bin/env bash
# Issue #11, the secret-permutation test per derivative (results in results/robust/permutation/):
# the ablation's attack grid (configs/robustness/ablation.yaml) on the plain demo watermark and on the
# transform-robust variants (eot, eot_mixed), each secret with the demo plan's J = 19 alternatives, which
# `awenc robustness` now ranks the owner's secret among on every derivative (margin-free, exact under H0;
# resolution 1/20). No calibration is needed for that test; the margin-based columns of these runs use the plan's
# default margins and are not the ablation's calibrated numbers (results/robust/ablation.md has those).
#
# Needs: bash scripts/demo.sh (runs/demo). Every step reuses what is already complete.
#   bash scripts/permutation.sh [variant ...]      # default: plain eot eot_mixed
set -euo pipefail
cd "$(dirname "$0")/.."
awenc=.venv/bin/awenc
out=runs/permutation
eot='robust.transforms=[jpeg,resize,crop,noise,blur]'
variants=("${@:-plain eot eot_mixed}")
# shellcheck disable=SC2206
variants=(${variants[*]})
[ -f runs/demo/embed/encoder.safetensors ] || { echo "permutation: run 'bash scripts/demo.sh' first" >&2; exit 2; }
# runs/demo is the plain row and the stage configs of the others: `awenc demo` embeds its recipe by default (#27)
.venv/bin/python scripts/plain_demo.py runs/demo || exit 2

for v in "${variants[@]}"; do
  case "$v" in
    plain) flags=() ;;
    eot) flags=("$eot") ;;
    eot_mixed) flags=("$eot" "robust.p_identity=0.5") ;;
    *) echo "permutation: unknown variant '$v' (plain, eot, eot_mixed)" >&2; exit 2 ;;
  esac
  if [ "$v" = plain ]; then
    wm=runs/demo/watermark; emb=runs/demo/embed
  else
    wm=$out/$v/watermark; emb=$out/$v/embed
    [ -f "$wm/secret.safetensors" ] || $awenc watermark --config runs/demo/watermark/config.yaml \
      run.out_dir=$out/$v run.name=watermark "${flags[@]}"
    [ -f "$emb/encoder.safetensors" ] || $awenc embed --config runs/demo/embed/config.yaml \
      run.out_dir=$out/$v run.name=embed secret=$wm/secret.safetensors "${flags[@]}"
  fi
  $awenc robustness --config configs/robustness/ablation.yaml run.out_dir=$out/$v run.name=robustness \
    encoder=$emb/encoder.safetensors secret=$wm/secret.safetensors
done
