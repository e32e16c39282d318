#!/usr/bin/env bash
# The GPU suite: every GPU figure this project reports, in one call of at most ~9.5 minutes on
# one H200. Writes JSON lines (results.jsonl), one log per stage and a Markdown summary
# (summary.md) to OUT_DIR.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR            # on a GPU machine
#   bash benchmarks/gpu_suite.sh OUT_DIR --quick    # tiny shapes on CPU (the test suite runs it)
#
# Stages, in order of importance (each under its own time limit, all under SUITE_BUDGET_S,
# default 560 s; one that fails or times out is reported and the rest run; one that no longer
# fits the budget is reported as skipped):
#   kernel      benchmarks/fused_topk_check.py --speed: the fused score + top-k Triton kernel
#               against torch.topk (every score, bf16 and fp32, k = 1..64, sizes off the tiles,
#               barred codes, ties, the layer's two paths: same codes and gradients), then its
#               speed against the score matmul alone and the PyTorch path. --quick: the same
#               checks on tiny shapes under Triton's interpreter on CPU (skipped without Triton)
#   layer       benchmarks/codebook_layer.py --backend both --profile: each layer shape, fused and
#               PyTorch selection, bf16, against the score matmul alone and matmul + top-k, with
#               a torch.profiler breakdown of one forward + backward by kernel
#   train_step  benchmarks/train_step.py: a Pythia-410M-shaped GPT-NeoX (random weights) with
#               attention-head codebooks (10,000 codes, k=8), bf16 under DeepSpeed on one GPU:
#               plain (no codebooks), codebook (fused), plain and codebook under activation
#               checkpointing, codebook with PyTorch selection; step time, ratio to plain (goal
#               <= 1.3), tokens/s, MFU, peak memory
#   fsm         benchmarks/fsm_local.py: the FSM default (configs/fsm.yaml) trained on the GPU by
#               the project's one loop, then its analysis (training results with the new kernel)
#
# Needs, beyond what the GPU image ships (torch, transformers, triton, safetensors, numpy,
# pyyaml, pyarrow, matplotlib, psutil): deepspeed and its pure-Python needs hjson, pydantic,
# pydantic-core, annotated-types, typing-inspection, carried as wheels (the machine has no
# package index): benchmarks/gpu_wheels.sh builds them into .whl/ here. Ray and MLflow are not
# needed: the stages run the library's loop in-process (codebook.training.local).
# PYTHON (default python3) is the interpreter; the repository is put on sys.path by each script.
set -uo pipefail

OUT="${1:?usage: gpu_suite.sh OUT_DIR [--quick]}"
QUICK="${2:-}"
PY="${PYTHON:-python3}"
HERE="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
BUDGET="${SUITE_BUDGET_S:-560}"
mkdir -p "${OUT}"
: >"${OUT}/results.jsonl"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
SUITE_START=${SECONDS}

if [[ "${QUICK}" == "--quick" ]]; then
  KERNEL_ARGS=(--device cpu --quick)
  LAYER_ARGS=(--quick --device cpu --repeats 2 --profile)
  STEP_ARGS=(--quick --device cpu)
  FSM_ARGS=(--quick --device cpu --max-pairs 50)
  LIMITS=(180 150 240 300)
  BUDGET="${SUITE_BUDGET_S:-900}"  # CPU, often shared: the smoke test's limits are loose
else
  KERNEL_ARGS=(--device cuda --speed)
  LAYER_ARGS=(--device cuda --backend both --profile)
  STEP_ARGS=(--device cuda)
  FSM_ARGS=(--device cuda)
  LIMITS=(150 120 240 200)
fi

# record NAME STATUS SECONDS: a stage's status line in results.jsonl
record() {
  "${PY}" -c 'import json, sys; print(json.dumps({"stage": sys.argv[1], "status": sys.argv[2], "seconds": int(sys.argv[3])}))' \
    "$1" "$2" "$3" >>"${OUT}/results.jsonl"
  echo "[gpu_suite] $1: $2 in $3s" >&2
}

# run_stage NAME LIMIT_S COMMAND...: log to OUT/NAME.log; JSON lines to results.jsonl, tagged.
run_stage() {
  local name="$1" limit="$2"
  shift 2
  local left=$((BUDGET - (SECONDS - SUITE_START)))
  if ((left < 30)); then
    record "${name}" "skipped (suite budget spent)" 0
    return
  fi
  ((limit > left)) && limit=${left}
  local started=${SECONDS}
  timeout --kill-after=10 "${limit}" "$@" >"${OUT}/${name}.log" 2>&1
  local rc=$?
  "${PY}" - "${OUT}" "${name}" <<'EOF'
import json, sys
out, name = sys.argv[1], sys.argv[2]
with open(f"{out}/results.jsonl", "a") as fh:
    for line in open(f"{out}/{name}.log", errors="replace"):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                fh.write(json.dumps({"stage": name, **json.loads(line)}) + "\n")
            except ValueError:
                pass
EOF
  local status="ok"
  ((rc != 0)) && status="failed rc=${rc}"
  ((rc == 124 || rc == 137)) && status="timeout"
  record "${name}" "${status}" "$((SECONDS - started))"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "no nvidia-smi"
  "${PY}" -c "import torch; print('torch', torch.__version__)"
  "${PY}" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "no triton"
  "${PY}" -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>/dev/null \
    || echo "no deepspeed"; } >"${OUT}/machine.txt" 2>&1

if "${PY}" -c "import triton" 2>/dev/null; then
  run_stage kernel "${LIMITS[0]}" "${PY}" "${HERE}/fused_topk_check.py" "${KERNEL_ARGS[@]}"
else
  record kernel "skipped (no triton)" 0
fi
run_stage layer "${LIMITS[1]}" "${PY}" "${HERE}/codebook_layer.py" "${LAYER_ARGS[@]}"
run_stage train_step "${LIMITS[2]}" "${PY}" "${HERE}/train_step.py" "${STEP_ARGS[@]}"
run_stage fsm "${LIMITS[3]}" "${PY}" "${HERE}/fsm_local.py" "${FSM_ARGS[@]}" --out "${OUT}/fsm"

"${PY}" - "${OUT}" <<'EOF'
import json, sys
out = sys.argv[1]
rows = [json.loads(line) for line in open(f"{out}/results.jsonl")]
machine = open(f"{out}/machine.txt").read().strip().replace("\n", "; ")
lines = [f"# GPU suite\n\nMachine: {machine}\n", "| stage | status | seconds |", "|---|---|---|"]
lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} |" for r in rows if "status" in r]
checks = [r for r in rows if r["stage"] == "kernel" and "check" in r]
if checks:
    bad = [r["check"] for r in checks if not r.get("ok")]
    lines += ["", "## Fused score + top-k: correctness against torch.topk", "",
              f"{len(checks) - len(bad)} of {len(checks)} cases ok"
              + (f"; failed: {', '.join(bad)}" if bad else ""), "",
              "| case | score | dtype | k | exact rows | equivalent rows | ok |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['check']} | {r['score']} | {r['dtype']} | {r.get('k', '-')} | "
              f"{r.get('exact_rows', r.get('same_ids_rows'))} | "
              f"{r.get('equivalent_rows', r.get('same_out_and_grads'))} | {r['ok']} |"
              for r in checks]
speed = [r for r in rows if r["stage"] == "kernel" and "speed" in r]
if speed:
    lines += ["", "## Fused score + top-k: speed", "",
              "| tokens x groups x dim | codes | k | dtype | fused ms | matmul ms | ratio | "
              "PyTorch path ms | matmul + topk ms |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['tokens']} x {r['groups']} x {r['group_dim']} | {r['num_codes']} | "
              f"{r['k']} | {r['dtype']} | {r['fused_ms']} | {r['matmul_ms']} | "
              f"{r['ratio_to_matmul']} | {r['torch_path_ms']} | {r['matmul_topk_ms']} |"
              for r in speed]
layer = [r for r in rows if r["stage"] == "layer" and "fwd_bwd_ms" in r]
if layer:
    lines += ["", "## Codebook layer (forward + backward) against its floors", "",
              "| shape | select | dtype | fwd+bwd ms | matmul ms | matmul + topk ms | "
              "ratio to matmul | ratio to matmul + topk | peak MiB |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.get('name', '')} ({r['tokens']} x {r['dim']}, {r['groups']} groups, "
              f"{r['num_codes']} codes, k={r['k']}) | {r.get('select', '-')} | "
              f"{r.get('dtype', '-')} | {r['fwd_bwd_ms']:.3f} | {r.get('matmul_ms', '-')} | "
              f"{r['matmul_topk_ms']:.3f} | {r.get('ratio_to_matmul', '-')} | "
              f"{r['ratio_to_floor']:.2f} | {r['peak_mem_mb']:.0f} |" for r in layer]
profiles = [r for r in rows if r["stage"] == "layer" and "profile" in r]
for p in profiles:
    lines += ["", f"### Profile: {p['profile']} (one forward + backward, {p['sort']}, "
              f"total {p['total_ms']} ms)", "", "| kernel / operator | ms | calls |",
              "|---|---|---|"]
    lines += [f"| `{name}` | {ms} | {calls} |" for name, ms, calls in p["top"][:10]]
steps = [r for r in rows if r["stage"] == "train_step" and "step_ms" in r]
if steps:
    lines += ["", "## Training step", "",
              "| variant | select | checkpointing | dtype | step ms | ratio to plain (baseline) | "
              "tokens/s | MFU | peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r.get('select') or '-'} | {r.get('checkpointing')} | "
              f"{r['dtype']} | {r['step_ms']} | {r.get('ratio_to_plain', 1.0)} "
              f"({r.get('baseline', '-')}) | {r['tokens_per_s']:.0f} | {r.get('mfu', '-')} | "
              f"{r.get('peak_mem_gib', '-')} |" for r in steps]
fsm = [r for r in rows if r["stage"] == "fsm" and "first_transition_accuracy" in r]
if fsm:
    r = fsm[-1]
    keys = ["first_transition_accuracy", "code_precision_mean", "neuron_precision_mean",
            "intervention_success_rate", "final_eval_loss", "steps", "train_s", "steps_per_s",
            "analysis_s", "dtype"]
    lines += ["", "## FSM default, trained and analysed on this device", "",
              "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
              "| " + " | ".join(str(round(r[k], 4) if isinstance(r.get(k), float) else r.get(k))
                                for k in keys) + " |"]
open(f"{out}/summary.md", "w").write("\n".join(lines) + "\n")
print(open(f"{out}/summary.md").read())
EOF
