#!/usr/bin/env bash
# The GPU suite: every GPU figure this project reports, in one call of at most ~8 minutes on one
# H200. Writes JSON lines (results.jsonl), one log per stage and a Markdown summary (summary.md)
# to OUT_DIR.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR            # on a GPU machine
#   bash benchmarks/gpu_suite.sh OUT_DIR --quick    # tiny shapes on CPU (the test suite runs it)
#
# Stages (each under its own time limit; one that fails or times out is reported, the rest run):
#   layer       benchmarks/codebook_layer.py --device cuda: both shapes, against matmul + top-k
#   train_step  benchmarks/train_step.py: a Pythia-410M-shaped GPT-NeoX (random weights) with
#               attention-head codebooks (10,000 codes, k=8), bf16 under DeepSpeed on one GPU:
#               step time against the plain model (goal <= 1.5x), tokens/s, MFU, peak memory
#   fsm         benchmarks/fsm_local.py: the FSM default (configs/fsm.yaml) trained on the GPU by
#               the project's one loop, then its analysis
#
# Needs, beyond what the GPU image ships (torch, transformers, safetensors, numpy, pyyaml,
# pyarrow, matplotlib, psutil): deepspeed and its pure-Python needs hjson, pydantic,
# pydantic-core, annotated-types, typing-inspection (carry them as wheels where the machine has
# no package index; deepspeed has no binary wheel on PyPI: `pip wheel --no-deps
# --no-build-isolation deepspeed==X` builds a pure-Python one). Ray and MLflow are not needed:
# the stages run the library's loop in-process (codebook.training.local).
# PYTHON (default python3) is the interpreter; the repository is put on sys.path by each script.
set -uo pipefail

OUT="${1:?usage: gpu_suite.sh OUT_DIR [--quick]}"
QUICK="${2:-}"
PY="${PYTHON:-python3}"
HERE="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "${OUT}"
: >"${OUT}/results.jsonl"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [[ "${QUICK}" == "--quick" ]]; then
  LAYER_ARGS=(--quick --device cpu --repeats 2)
  STEP_ARGS=(--quick --device cpu)
  FSM_ARGS=(--quick --device cpu --max-pairs 50)
  LIMITS=(120 120 180)
else
  LAYER_ARGS=(--device cuda)
  STEP_ARGS=(--device cuda)
  FSM_ARGS=(--device cuda)
  LIMITS=(90 200 300)
fi

# run_stage NAME LIMIT_S COMMAND...: log to OUT/NAME.log; JSON lines to results.jsonl, tagged.
run_stage() {
  local name="$1" limit="$2"
  shift 2
  local started=${SECONDS}
  timeout --kill-after=10 "${limit}" "$@" >"${OUT}/${name}.log" 2>&1
  local rc=$?
  "${PY}" - "${OUT}" "${name}" "${rc}" "$((SECONDS - started))" <<'EOF'
import json, sys
out, name, rc, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rows = []
for line in open(f"{out}/{name}.log", errors="replace"):
    line = line.strip()
    if line.startswith("{") and line.endswith("}"):
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
status = "ok" if rc == 0 else ("timeout" if rc in (124, 137) else f"failed rc={rc}")
with open(f"{out}/results.jsonl", "a") as fh:
    for row in rows:
        fh.write(json.dumps({"stage": name, **row}) + "\n")
    fh.write(json.dumps({"stage": name, "status": status, "seconds": seconds}) + "\n")
print(f"[gpu_suite] {name}: {status} in {seconds}s, {len(rows)} result lines", flush=True)
EOF
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "no nvidia-smi"; "${PY}" -c "import torch; print('torch', torch.__version__)"; } \
  >"${OUT}/machine.txt" 2>&1

run_stage layer "${LIMITS[0]}" "${PY}" "${HERE}/codebook_layer.py" "${LAYER_ARGS[@]}"
run_stage train_step "${LIMITS[1]}" "${PY}" "${HERE}/train_step.py" "${STEP_ARGS[@]}"
run_stage fsm "${LIMITS[2]}" "${PY}" "${HERE}/fsm_local.py" "${FSM_ARGS[@]}" --out "${OUT}/fsm"

"${PY}" - "${OUT}" <<'EOF'
import json, sys
out = sys.argv[1]
rows = [json.loads(line) for line in open(f"{out}/results.jsonl")]
machine = open(f"{out}/machine.txt").read().strip().replace("\n", "; ")
lines = [f"# GPU suite\n\nMachine: {machine}\n", "| stage | status | seconds |", "|---|---|---|"]
lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} |" for r in rows if "status" in r]
layer = [r for r in rows if r["stage"] == "layer" and "fwd_bwd_ms" in r]
if layer:
    lines += ["", "## Codebook layer (forward + backward) against matmul + top-k", "",
              "| tokens | dim | groups | codes | k | fwd+bwd ms | floor ms | ratio | peak MiB |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['tokens']} | {r['dim']} | {r['groups']} | {r['num_codes']} | {r['k']} | "
              f"{r['fwd_bwd_ms']:.3f} | {r['matmul_topk_ms']:.3f} | {r['ratio_to_floor']:.2f} | "
              f"{r['peak_mem_mb']:.0f} |" for r in layer]
steps = [r for r in rows if r["stage"] == "train_step" and "step_ms" in r]
if steps:
    lines += ["", "## Training step, Pythia-410M shape", "",
              "| variant | dtype | batch x seq | step ms | ratio to plain | tokens/s | "
              "model TFLOP/s | MFU | peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['dtype']} | {r['batch']} x {r['seq']} | {r['step_ms']} | "
              f"{r.get('ratio_to_plain', 1.0)} | {r['tokens_per_s']:.0f} | "
              f"{r['model_tflops_per_s']} | {r['mfu']} | {r.get('peak_mem_gib', '-')} |"
              for r in steps]
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
