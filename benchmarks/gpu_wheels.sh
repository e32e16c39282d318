#!/usr/bin/env bash
# The wheels benchmarks/gpu_suite.sh needs beyond the GPU image (Python 3.12, no package index
# there): DeepSpeed (built here as a pure-Python wheel, its ops compile on first use) and its
# pure-Python needs the image lacks. Run it here, where pip reaches PyPI; the versions are this
# venv's, so the GPU runs what the tests ran.
#
#   bash benchmarks/gpu_wheels.sh [DIR]     # default DIR: .whl in the repository
#
# Then, once: `echo /.whl/ >> .git/info/exclude` (so the wheels are never committed), and in the
# device call: carry [".whl"] and begin the command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail

REPO="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-${REPO}/.whl}"
PY="${PYTHON:-${REPO}/.venv/bin/python}"
mkdir -p "${OUT}"

version() { "${PY}" -c "import importlib.metadata as m; print(m.version('$1'))"; }

PURE=()
for name in hjson pydantic pydantic-core annotated-types typing-inspection; do
  PURE+=("${name}==$(version "${name}")")
done
"${PY}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d "${OUT}" "${PURE[@]}"
# DeepSpeed has no wheel on PyPI: build one (setup.py imports torch: no build isolation).
DS_BUILD_OPS=0 "${PY}" -m pip wheel -q --no-deps --no-build-isolation -w "${OUT}" \
  "deepspeed==$(version deepspeed)"
ls -l "${OUT}"
du -sh "${OUT}"
