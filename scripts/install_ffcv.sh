#!/usr/bin/env bash
# Install the optional FFCV loader: its system libraries, then ffcv==1.0.2.
#
#   scripts/install_ffcv.sh [VENV]        VENV defaults to .venv (made by scripts/setup.sh)
#
# FFCV compiles a C extension against OpenCV and libjpeg-turbo (found through
# pkg-config), so it needs their -dev packages first. On Debian/Ubuntu this
# script installs them with apt-get (as root, or through sudo); elsewhere,
# install the equivalents yourself (e.g. `conda install -c conda-forge opencv
# libjpeg-turbo pkg-config`) and run it with AWENC_SKIP_APT=1.
# Safe to run again: whatever is already installed is left as it is.
#
# Environment:
#   AWENC_SKIP_APT=1   do not touch system packages (they are installed otherwise)
#   AWENC_FFCV_SPEC    pip requirement to install (default ffcv==1.0.2)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"

venv="${1:-$repo/.venv}"
case "$venv" in /*) ;; *) venv="$(pwd)/$venv" ;; esac  # relative to the caller's directory
cd "$repo"
spec="${AWENC_FFCV_SPEC:-ffcv==1.0.2}"
apt_pkgs=(pkg-config libopencv-dev libturbojpeg0-dev)

say() { echo "install_ffcv: $*"; }
t0=$SECONDS
die() { echo "install_ffcv: error: $*" >&2; exit 1; }

py="$venv/bin/python"
[ -x "$py" ] || die "no Python at '$py'; create the environment first (scripts/setup.sh) or pass its folder: scripts/install_ffcv.sh /path/to/venv"

# ------------------------------------------------------------ already done?
if "$py" - "$spec" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
want = sys.argv[1].partition("==")[2]
have = version("ffcv")
import ffcv.loader, ffcv.writer  # the compiled extension loads
sys.exit(0 if not want or have == want else 1)
EOF
then
  say "ffcv ($spec) already installed in $venv and importable; nothing to do"
  exit 0
fi

# ------------------------------------------------------------ system libraries
missing_pkgs() {
  local p out=()
  for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || out+=("$p")
  done
  echo "${out[@]:-}"
}

if [ "${AWENC_SKIP_APT:-0}" = "1" ]; then
  say "AWENC_SKIP_APT=1: not installing system packages (${apt_pkgs[*]} or equivalents must be present)"
elif ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  say "no apt-get here: install OpenCV, libjpeg-turbo and pkg-config (with headers) yourself; trying pip anyway"
else
  todo="$(missing_pkgs)"
  if [ -z "$todo" ]; then
    say "system packages already installed: ${apt_pkgs[*]}"
  else
    sudo=""
    if [ "$(id -u)" != "0" ]; then
      command -v sudo >/dev/null 2>&1 || die "need root (or sudo) to apt-get install: $todo"
      sudo="sudo"
    fi
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    install_cmd() { $sudo apt-get install -y -q --no-install-recommends $todo; }
    # refresh the package lists only when they lack a candidate for one of the packages
    # (or the install fails with them as they are: stale lists point at removed files)
    need_update=0
    for p in $todo; do
      cand="$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2}')"
      if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then need_update=1; fi
    done
    if [ "$need_update" = "1" ]; then
      say "apt-get update (no candidate in the current lists)"
      $sudo apt-get update -q || die "apt-get update failed"
    else
      say "apt package lists have every package; skipping apt-get update"
    fi
    say "apt-get install $todo"
    t_apt=$SECONDS
    if ! install_cmd; then
      if [ "$need_update" = "0" ]; then
        say "install failed with the current lists; running apt-get update and retrying"
        $sudo apt-get update -q || die "apt-get update failed"
        install_cmd || die "apt-get install $todo failed"
      else
        die "apt-get install $todo failed"
      fi
    fi
    say "system packages installed in $((SECONDS - t_apt)) s"
  fi
fi

if command -v pkg-config >/dev/null 2>&1; then
  for mod in opencv4 libturbojpeg; do
    pkg-config --exists "$mod" || say "warning: pkg-config does not know '$mod'; the ffcv build may fail"
  done
fi

# ------------------------------------------------------------ ffcv itself
say "pip install $spec into $venv (compiles a C extension, about a minute)"
t_pip=$SECONDS
"$py" -m pip install -q "$spec" || die "pip install $spec failed (see the compiler output above: missing OpenCV/libjpeg-turbo headers?)"
"$py" -c "import ffcv.loader, ffcv.writer" || die "ffcv installed but does not import"
say "pip install took $((SECONDS - t_pip)) s"
say "done in $((SECONDS - t0)) s: $("$py" -c 'from importlib.metadata import version; print("ffcv", version("ffcv"))') in $venv"
