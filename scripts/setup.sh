#!/usr/bin/env bash
# Install codebook into ./.venv from scratch (idempotent).
#
# On machines without a GPU this pins the CPU build of torch first: a plain `pip install torch`
# (or any package asking for it) would otherwise pull a multi-GB CUDA build. On GPU machines set
# TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0") to the CUDA build you want.
set -euo pipefail

REPO_ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${REPO_ROOT}"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-${REPO_ROOT}/.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [[ ! -x "${VENV}/bin/python" ]]; then
  "${PYTHON}" -m venv "${VENV}"
fi
PIP=("${VENV}/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
"${VENV}/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" install -q "${TORCH_SPEC}"
"${PIP[@]}" install -q -e ".[dev]"
"${VENV}/bin/python" -c "import codebook, torch, ray, deepspeed, mlflow; print('codebook installed:', 'torch', torch.__version__, 'ray', ray.__version__)"

# The code browser's tests drive a real headless Chromium: Debian's chromium + chromium-driver.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if command -v apt-get >/dev/null; then
    SUDO=""
    [[ "$(id -u)" -ne 0 ]] && command -v sudo >/dev/null && SUDO="sudo"
    echo "installing chromium + chromium-driver (Debian) for the browser tests"
    ${SUDO} apt-get update -q >/dev/null || true
    DEBIAN_FRONTEND=noninteractive ${SUDO} apt-get install -y -q chromium chromium-driver \
      >/dev/null || echo "WARNING: could not install chromium; tests/test_browser.py will fail"
  else
    echo "WARNING: no apt-get: install chromium and chromedriver for tests/test_browser.py"
  fi
fi
