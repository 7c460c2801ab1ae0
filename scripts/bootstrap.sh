#!/usr/bin/env bash
# Make a fresh Debian/Ubuntu machine ready for aule, then run one job:
#   scripts/bootstrap.sh demo   -> `aule demo`
#   scripts/bootstrap.sh test   -> the whole test suite (then, with no arguments and where lavapipe is
#                                  installed, the Vulkan tests again on lavapipe at subgroup size 4)
#   scripts/bootstrap.sh setup  -> only install
# Idempotent: every step checks first and installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
job=${1:-setup}; shift || true
venv=${AULE_VENV:-$root/.venv}
log() { echo "[bootstrap] $*" >&2; }
# pip's notes about this machine's empty local mirrors and setuptools' notices are noise here.
quiet_pip() { "$py" -m pip "$@" 2> >(grep -v -E "is ignored: it is neither|BuildBackendWarning|Please be careful|name as your package|with strategy, WheelFile|^\s*(!!|\*+|$)" >&2); }

sudo_cmd() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }

# --- system packages: Vulkan loader, lavapipe when no driver exists, validation layer -------------
need_pkgs=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
if command -v dpkg-query >/dev/null && command -v apt-get >/dev/null; then
  have_pkg libvulkan1 || need_pkgs+=(libvulkan1)
  # A machine with a vendor driver keeps it; lavapipe is added only when no ICD manifest exists.
  if ! compgen -G "/usr/share/vulkan/icd.d/*.json" >/dev/null && ! compgen -G "/etc/vulkan/icd.d/*.json" >/dev/null; then
    need_pkgs+=(mesa-vulkan-drivers)
  fi
  if [ "$job" = test ]; then
    have_pkg vulkan-validationlayers || need_pkgs+=(vulkan-validationlayers)
    # SPIRV-Cross: tests/test_portability.py translates every shader to Metal, MoltenVK's path.
    have_pkg spirv-cross || need_pkgs+=(spirv-cross)
  fi
  python3 -c 'import venv, ensurepip' 2>/dev/null || need_pkgs+=(python3-venv)
  if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing system packages: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    sudo_cmd apt-get update -qq
    sudo_cmd apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
  fi
else
  log "not a Debian/Ubuntu machine: install the Vulkan loader and a driver yourself"
fi

# --- Python environment -----------------------------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
  log "creating virtual environment $venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.aule-$job-$(cat pyproject.toml scripts/bootstrap.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  quiet_pip install -q --upgrade pip >/dev/null
  if [ "$job" = test ]; then
    # torch first and pinned: the CPU build. An unpinned torch would pull a multi-gigabyte CUDA build.
    "$py" -c 'import torch' 2>/dev/null || quiet_pip install -q "torch==${AULE_TORCH_VERSION:-2.13.0}"
    quiet_pip install -q -e ".[dev,torch]"
  else
    quiet_pip install -q -e .
  fi
  touch "$stamp"
fi

case "$job" in
  demo)  exec "$venv/bin/aule" demo "$@" ;;
  test)  export AULE_VALIDATION=${AULE_VALIDATION:-1}
         lavapipe=$(compgen -G "/usr/share/vulkan/icd.d/lvp_icd*.json" || compgen -G "/etc/vulkan/icd.d/lvp_icd*.json" || true)
         if [ $# -gt 0 ] || [ -z "$lavapipe" ]; then exec "$py" -m pytest -q "$@"; fi
         status=0
         "$py" -m pytest -q || status=$?
         # Lavapipe at 4 lanes instead of 8 (LP_NATIVE_VECTOR_WIDTH=128): the subgroup-dependent shader
         # paths, on the Vulkan-specific tests only. Its own cache folders: aule names its pipeline-cache
         # file by the driver's pipelineCacheUUID alone, which lavapipe reports the same at every width,
         # and Mesa's shader cache is kept apart too, so no 8-lane build can ever be picked up.
         lp_cache="${XDG_CACHE_HOME:-$HOME/.cache}/aule-lavapipe-128"
         log "Vulkan tests again on lavapipe at subgroup size 4"
         LP_NATIVE_VECTOR_WIDTH=128 AULE_VULKAN_DEVICE=llvmpipe AULE_CACHE_DIR="$lp_cache/aule" \
           MESA_SHADER_CACHE_DIR="$lp_cache/mesa" "$py" -m pytest -q tests/test_vulkan*.py tests/test_paged_vulkan.py \
           "tests/test_portability.py::test_lavapipe_reports_the_subgroup_its_vector_width_gives" \
           "tests/test_differential.py::test_dense_follows_the_rule[vulkan]" \
           "tests/test_differential.py::test_paged_follows_the_rule[vulkan]" || status=$?
         exit $status ;;
  setup) log "ready: $venv" ;;
  *) echo "usage: $0 demo|test|setup" >&2; exit 2 ;;
esac
