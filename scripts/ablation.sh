#!/usr/bin/env bash
# The robust-watermark ablation at demo scale (issue #11; results in results/robust/):
#   plain AWEncoder | + transform robustness (eot) | + derivative rehearsal (rehearsal) | both
#   (and eot_mixed / both_mixed: half of the marked images of both stages left untransformed, p_identity 0.5;
#    shadow, <variant>_shadow: plain's or that variant's secret and calibration, embedded with stage 2's shadow
#    student, shadow.weight=1 shadow.refresh=70 (a new shadow every 10 of stage 2's 40 epochs); <variant>_shadow_long:
#    one shadow for all 40 epochs (refresh 0, as long-trained as the pirate's 30-epoch student); <variant>_shadow_arch:
#    a shadow of the other architecture (tiny_resnet, as distill_arch's student); <variant>_shadow_w3: weight 3;
#    rehearsal30 / both_mixed30: rehearsal / both_mixed with a 30-epoch
#    student among the surrogates and 4 references; rehearsal30arch: and one of the other architecture;
#    rehearsal_refs4: rehearsal with 4 references; both_refs4 / both_mixed_refs4: both / both_mixed with 4 references;
#    rehearsal_refs8: rehearsal with 8 references; rehearsal_ens: rehearsal_refs4 with three students (10, 10 and 30 epochs);
#    rehearsal_ens8: rehearsal_ens with 8 references; rehearsal_ens_arch: rehearsal_ens with the other architecture's
#    30-epoch student too, and 4 references of that architecture beside f0's; rehearsal_ens_eps24: rehearsal_ens
#    with a perturbation budget of 24/255 instead of 16/255)
# on the demo's f0, with the demo's stage-1/stage-2 settings, one attack grid (configs/robustness/ablation.yaml),
# and for each variant a calibration of its own secret on the same null population (the committed one,
# runs/calibration/population, plus attacked copies by the adaptive attacks: configs/sweep/null/digits_adaptive.yaml).
#
# Needs: bash scripts/demo.sh (runs/demo) and the null population (runs/calibration/population: the committed
# calibration's command in results/calibration/README.md). Every step reuses what is already complete.
#   bash scripts/ablation.sh [variant ...]      # default: plain eot rehearsal both
# ABLATION_NULLS=60 calibrates on twice the null population instead (configs/sweep/null/digits_adaptive10.yaml:
# 60 families, 30 held out; results/robust/nulls60/), into calibration60/, robustness60/ and table60/; the secrets
# and watermarked encoders are the same.
set -euo pipefail
cd "$(dirname "$0")/.."
awenc=.venv/bin/awenc
out=runs/ablation
eot='robust.transforms=[jpeg,resize,crop,noise,blur]'
mixed='robust.p_identity=0.5'
rehearsal_of() { echo "rehearsal.surrogates=[$1,prune_finetune:0.5,finetune_full:0.001] rehearsal.references=$2"; }
rehearse=$(rehearsal_of distill:10 2)
# the pirate's own student length (30 epochs) rehearsed, against twice the references (results/robust/rehearsal30/)
rehearse30=$(rehearsal_of distill:30 4)
# and a 30-epoch student of the other architecture beside it; and rehearsal's 10-epoch student with 4 references
# (results/robust/nulls60/)
rehearse30arch=$(rehearsal_of distill:30,distill_arch:30 4)
rehearse_refs4=$(rehearsal_of distill:10 4)
# more references (quieter strangers, so a lower threshold), or more students (a mark that transfers to unseen ones)
rehearse_refs8=$(rehearsal_of distill:10 8)
rehearse_ens=$(rehearsal_of distill:10,distill:10,distill:30 4)
rehearse_ens8=$(rehearsal_of distill:10,distill:10,distill:30 8)
rehearse_ens_arch="$(rehearsal_of distill:10,distill:10,distill:30,distill_arch:30 4) rehearsal.reference_archs=[tiny_resnet:16]"
# a larger perturbation budget (24/255 instead of the demo's 16/255): does a stronger mark reach the students?
eps24='generation.eps=0.09411764705882353'
shadow_of() {  # stage 2's shadow switches of a shadow row: <base>_shadow[_long|_arch|_w3]
  case "$1" in
    '') echo "shadow.weight=1 shadow.refresh=70" ;;
    _long) echo "shadow.weight=1 shadow.refresh=0" ;;
    _arch) echo "shadow.weight=1 shadow.refresh=70 shadow.arch=tiny_resnet" ;;  # f0 is the demo's tiny net
    _w3) echo "shadow.weight=3 shadow.refresh=70" ;;
    *) echo "ablation: unknown shadow row '_shadow$1' (one of: _shadow, _shadow_long, _shadow_arch, _shadow_w3)" >&2
       return 2 ;;
  esac
}
case "${ABLATION_NULLS:-30}" in
  30) nulls=configs/sweep/null/digits_adaptive.yaml; tag= ;;
  60) nulls=configs/sweep/null/digits_adaptive10.yaml; tag=60 ;;
  *) echo "ablation: ABLATION_NULLS must be 30 or 60 (null families), not '$ABLATION_NULLS'" >&2; exit 2 ;;
esac
# ABLATION_SEED=k runs the grid at seed k instead of 0 (robustness<tag>_seed<k>/, table<tag>_seed<k>/); the secrets,
# watermarked encoders and calibrations are the same
seed=${ABLATION_SEED:-0}
[[ $seed =~ ^[0-9]+$ ]] || { echo "ablation: ABLATION_SEED must be a non-negative integer, not '$seed'" >&2; exit 2; }
rob=robustness$tag; table=table$tag
[ "$seed" = 0 ] || { rob=${rob}_seed$seed; table=${table}_seed$seed; }
known=(plain eot rehearsal rehearsal30 rehearsal30arch rehearsal_refs4 rehearsal_refs8 rehearsal_ens rehearsal_ens8
       rehearsal_ens_arch rehearsal_ens_eps24 both both_refs4 eot_mixed both_mixed both_mixed30 both_mixed_refs4 shadow rehearsal_refs4_shadow
       rehearsal_refs8_shadow rehearsal_ens_shadow rehearsal_ens_shadow_long rehearsal_ens_shadow_arch
       rehearsal_ens_shadow_w3 rehearsal_ens_eps24_shadow eot_mixed_shadow both_mixed_shadow both_mixed30_shadow)  # the table's rows, in this order
variants=("${@:-plain eot rehearsal both}")
# runs/demo is the plain row and the stage configs of every other row: `awenc demo` embeds its recipe by default (#27)
.venv/bin/python scripts/plain_demo.py runs/demo || exit 2
# shellcheck disable=SC2206
variants=(${variants[*]})

flags_of() {  # the stage-1/stage-2 switches of a variant without its shadow
  case "$1" in
    plain) flags=() ;;
    eot) flags=("$eot") ;;
    # shellcheck disable=SC2206
    rehearsal) flags=($rehearse) ;;
    # shellcheck disable=SC2206
    rehearsal30) flags=($rehearse30) ;;
    # shellcheck disable=SC2206
    rehearsal30arch) flags=($rehearse30arch) ;;
    # shellcheck disable=SC2206
    rehearsal_refs4) flags=($rehearse_refs4) ;;
    # shellcheck disable=SC2206
    rehearsal_refs8) flags=($rehearse_refs8) ;;
    # shellcheck disable=SC2206
    rehearsal_ens) flags=($rehearse_ens) ;;
    # shellcheck disable=SC2206
    rehearsal_ens8) flags=($rehearse_ens8) ;;
    # shellcheck disable=SC2206
    rehearsal_ens_arch) flags=($rehearse_ens_arch) ;;
    # shellcheck disable=SC2206
    rehearsal_ens_eps24) flags=($rehearse_ens "$eps24") ;;
    # shellcheck disable=SC2206
    both) flags=("$eot" $rehearse) ;;
    # shellcheck disable=SC2206
    both_refs4) flags=("$eot" $rehearse_refs4) ;;
    eot_mixed) flags=("$eot" "$mixed") ;;
    # shellcheck disable=SC2206
    both_mixed) flags=("$eot" "$mixed" $rehearse) ;;
    # shellcheck disable=SC2206
    both_mixed30) flags=("$eot" "$mixed" $rehearse30) ;;
    # shellcheck disable=SC2206
    both_mixed_refs4) flags=("$eot" "$mixed" $rehearse_refs4) ;;
    *) echo "ablation: unknown variant '$v' (one of: ${known[*]}; or <variant>_shadow[_long|_arch|_w3])" >&2
       exit 2 ;;
  esac
}

base_of() {  # the variant whose secret a row uses: itself, or a shadow row's base (plain for shadow[_kind])
  case "$1" in
    shadow*) echo plain ;;
    *_shadow*) echo "${1%%_shadow*}" ;;
    *) echo "$1" ;;
  esac
}

for v in "${variants[@]}"; do
  base=$(base_of "$v")
  [ "$base" = "$v" ] || shadow=$(shadow_of "${v#*shadow}")
  flags_of "$base"
  cal=$out/$v/calibration$tag
  if [ "$base" != "$v" ]; then
    # stage 2 only: the base variant's secret (and so its calibration, which depends on the secret and the nulls only)
    wm=$out/$base/watermark; emb=$out/$v/embed; cal=$out/$base/calibration$tag
    [ -f "$cal/calibration.json" ] || { echo "ablation: run the $base variant first" >&2; exit 2; }
    embed_flags=()
    for f in "${flags[@]}"; do [[ $f == robust.* ]] && embed_flags+=("$f"); done
    # shellcheck disable=SC2086
    [ -f "$emb/encoder.safetensors" ] || $awenc embed --config runs/demo/embed/config.yaml \
      run.out_dir=$out/$v run.name=embed secret=$wm/secret.safetensors "${embed_flags[@]}" $shadow
  elif [ "$v" = plain ]; then
    # a copy of the demo's secret: calibrate binds a calibration to the secret it calibrated (secret.json)
    wm=$out/plain/watermark; emb=runs/demo/embed
    if [ ! -d "$wm" ]; then  # (without the demo's bound calibration: this copy is bound to the ablation's)
      mkdir -p $out/plain && cp -r runs/demo/watermark "$wm"
      .venv/bin/python -c "import json,sys; p=sys.argv[1]; r=json.load(open(p)); r.pop('calibration',None); json.dump(r,open(p,'w'),indent=2)" "$wm/secret.json"
    fi
  else
    wm=$out/$v/watermark; emb=$out/$v/embed
    embed_flags=()
    for f in "${flags[@]}"; do [[ $f == robust.* ]] && embed_flags+=("$f"); done
    [ -f "$wm/secret.safetensors" ] || $awenc watermark --config runs/demo/watermark/config.yaml \
      run.out_dir=$out/$v run.name=watermark "${flags[@]}"
    [ -f "$emb/encoder.safetensors" ] || $awenc embed --config runs/demo/embed/config.yaml \
      run.out_dir=$out/$v run.name=embed secret=$wm/secret.safetensors "${embed_flags[@]}"
  fi
  [ -f "$cal/calibration.json" ] || $awenc calibrate --config $nulls \
    run.out_dir=$out/$v run.name=calibration$tag secret=$wm/secret.safetensors population.root=runs/calibration/population
  # exploratory: verify refuses a threshold that let held-out null families through (the rehearsal variants' do);
  # the ablation measures every variant's thresholds as they are, and its table marks those
  $awenc robustness --config configs/robustness/ablation.yaml run.out_dir=$out/$v run.name=$rob "grid.seeds=[$seed]" \
    encoder=$emb/encoder.safetensors secret=$wm/secret.safetensors verify.calibration=$cal/calibration.json \
    verify.exploratory=true
done

args=()
for v in "${known[@]}"; do
  [ -f "$out/$v/$rob/robustness.json" ] || continue
  emb=$out/$v/embed
  [ "$v" = plain ] && emb=runs/demo/embed
  stages="[$out/$(base_of "$v")/watermark,$emb]"
  args+=("variants.$v.robustness=$out/$v/$rob" "variants.$v.stages=$stages")
done
$awenc ablation run.out_dir=$out run.name=$table clean=runs/demo/f0 "${args[@]}"
