"""Training-step cost of codebooks against the plain model, measured in the same run.

Runs the project's one training loop (``codebook.training.local.train_local``: the real
``train``, engine and model wrapping; no Ray, no MLflow) in this process, once per variant:

* ``plain``: the model with no codebooks at all (``codebook.sites=[]``: no code parameters, no
  optimizer state for them), the baseline;
* ``plain_ckpt``: the same with activation checkpointing (GPU; the baseline of ``codebook_ckpt``);
* ``plain_phase`` (``--preset fsm``): codebooks attached but not yet switched on
  (``codebook.start_step`` past the end), as in the FSM run's first phase;
* ``codebook``: codebooks on from step 0 (k-means initialised), selection as the layer picks it
  (the fused Triton kernel on a GPU with Triton, PyTorch otherwise);
* ``codebook_ckpt``: the same under activation checkpointing (HF, non-reentrant), whose
  recompute reuses the forward pass's codes (``codebook.layer.reuse_selections``);
* ``codebook_torch`` (GPU): ``codebook`` with the PyTorch selection (the fused kernel off), the
  "before" of the kernel.

Presets: ``pythia410m`` (default): GPT-NeoX with Pythia-410M's shape (24 layers, d_model 1024,
16 heads, MLP 4096, vocabulary 50,304, rotary 25%) from a config with random weights, random
tokens, batch 8 x 1024, attention-head codebooks on every layer (10,000 codes, k=8, the
``configs/pythia410m_wikitext.yaml`` settings), under DeepSpeed (ZeRO-0; bf16 on GPU, fp32 on
CPU), AdamW. ``fsm``: the FSM default (``configs/fsm.yaml``: its model, codebooks, optimizer,
DeepSpeed and TokFSM batches) on this machine.

One JSON line per variant: ``step_ms`` (median over the loop's log windows after the first, from
its ``tokens_per_s``), ``tokens_per_s``, ``ratio_to_plain`` (``step_ms / plain step_ms``; for
``*_ckpt``, against ``plain_ckpt`` where it ran), ``tokens_per_s_vs_plain`` (its inverse),
with ``--preset fsm`` also ``tokens_per_s_vs_plain_phase`` (the FSM target: codebook phase
>= 0.45x the plain phase), ``model_tflops_per_s`` and ``mfu`` (pythia410m: model FLOPs, 6 x
non-embedding-lookup parameters + 12 x layers x d_model x context per token, the plain model's,
against ``--peak-tflops``; the codebook scoring is extra work and is not counted),
``peak_mem_gib`` (GPU) and the shapes. On CPU also ``cpu_step_ms``: this process's CPU time per
step over the same windows (with ``--threads 1``, what a step costs whatever other jobs take of
a shared machine's wall clock), with ``cpu_ratio_to_plain`` and
``cpu_tokens_per_s_vs_plain_phase``.

Usage::

    python benchmarks/train_step.py [--device cuda] [--preset pythia410m|fsm] [--steps 30]
        [--variants plain,codebook,...] [--threads N] [--quick]

``--quick``: a 2-layer d64 model, 6 steps, on CPU: a smoke test, not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import codebook.layer  # noqa: E402
from codebook.training.config import load_config  # noqa: E402
from codebook.training.local import FolderReporter, train_local  # noqa: E402
from codebook.training.loop import LoopData  # noqa: E402

PYTHIA_410M = {"vocab_size": 50304, "hidden_size": 1024, "num_hidden_layers": 24,
               "num_attention_heads": 16, "intermediate_size": 4096,
               "max_position_embeddings": 2048, "rotary_pct": 0.25}
TINY = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 256, "max_position_embeddings": 256, "rotary_pct": 0.25}
FSM_CONFIG = REPO / "configs" / "fsm.yaml"

try:
    from codebook.kernels import triton_available
except ImportError:  # a checkout from before the fused kernel (to measure the code it replaced)
    def triton_available() -> bool:
        return False
GPU_VARIANTS = ["plain", "codebook", "plain_ckpt", "codebook_ckpt", "codebook_torch"]
CPU_VARIANTS = ["plain", "codebook", "codebook_ckpt"]
FSM_VARIANTS = ["plain", "plain_phase", "codebook"]


def random_batches(vocab: int, batch: int, seq: int, seed: int = 0):
    """Endless batches of uniform random tokens (made on the host, like a real loader)."""
    gen = torch.Generator().manual_seed(seed)

    def batches(start: int):
        while True:
            yield {"input_ids": torch.randint(0, vocab, (batch, seq), generator=gen)}

    return batches


def model_flops_per_token(shape: dict, seq: int) -> float:
    """6N + 12 L d T (PaLM appendix B), N without the input embedding lookup."""
    d, layers, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    per_layer = 4 * d * d + 2 * d * shape["intermediate_size"]  # qkv+out, MLP up+down
    n = layers * per_layer + d * vocab  # + the unembedding matmul
    return 6 * n + 12 * layers * d * seq


def variant_settings(name: str, args) -> dict:
    """The config overrides that make variant ``name``."""
    sets: dict = {}
    if name.startswith("plain") and name != "plain_phase":
        sets["codebook.sites"] = "[]"
    if name == "plain_phase":
        sets.update({"codebook.start_step": 10**9, "codebook.kmeans_init_batches": 0})
    if name.startswith("codebook"):
        sets["codebook.start_step"] = 0
        if args.preset != "fsm":
            sets["codebook.kmeans_init_batches"] = 4
    if name.endswith("_ckpt"):
        sets["model.gradient_checkpointing"] = "true"
    return sets


def run_variant(name: str, shape: dict | None, args, storage: Path,
                device: torch.device) -> dict:
    sets = {"run.name": name, "run.storage_path": str(storage), "run.max_steps": args.steps,
            "run.log_every": args.window, "run.eval_every": 10**9, "run.checkpoint_every": 0}
    if args.preset == "fsm":
        config = str(FSM_CONFIG)
        if args.quick:
            sets.update({"optim.batch_size": 8, "model.from_config.num_hidden_layers": 2,
                         "codebook.num_codes": 256})
        data = None  # the config's TokFSM batches
    else:
        config = None
        sets.update({
            "model.from_config": json.dumps({"model_type": "gpt_neox", **shape}),
            "codebook.sites": "[attn_heads]", "codebook.num_codes": args.num_codes,
            "codebook.k": args.k, "optim.batch_size": args.batch, "optim.lr": 1e-4,
            "deepspeed.zero_stage": 0,
        })
        data = LoopData(train=random_batches(shape["vocab_size"], args.batch, args.seq),
                        eval=lambda: [])
    sets.update(variant_settings(name, args))
    cfg = load_config(config, [f"{k}={v}" for k, v in sets.items()] + args.set)
    codebook.layer.DEFAULT_SELECT_BACKEND = "torch" if name == "codebook_torch" else "auto"
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the loop's progress; stdout: JSON
            summary = train_local(cfg, data, device, reporter := CpuTimeReporter(cfg.run_dir))
    finally:
        codebook.layer.DEFAULT_SELECT_BACKEND = "auto"
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if "tokens_per_s" in r and r["step"] > args.window]
    cpu_ms = reporter.cpu_step_ms(args.window)
    tokens_per_step = summary["tokens"] // summary["steps"]
    step_ms = statistics.median(tokens_per_step / r["tokens_per_s"] * 1e3 for r in windows)
    on = bool(cfg.codebook.sites) and name != "plain_phase"
    row = {
        "variant": name, "preset": args.preset, "device": device.type,
        "step_ms": round(step_ms, 2), "tokens_per_s": round(tokens_per_step / step_ms * 1e3, 1),
        "windows_ms": [round(tokens_per_step / r["tokens_per_s"] * 1e3, 2) for r in windows],
        "cpu_step_ms": round(statistics.median(cpu_ms), 2) if cpu_ms else None,
        "cpu_windows_ms": [round(v, 2) for v in cpu_ms],
        "final_loss": summary["final_train_loss"], "wall_s": round(wall, 1),
        "batch": cfg.optim.batch_size, "tokens_per_step": tokens_per_step, "steps": args.steps,
        "sites": list(cfg.codebook.sites) if on else [],
        "num_codes": cfg.codebook.num_codes if on else 0, "k": cfg.codebook.k if on else 0,
        "checkpointing": cfg.model.gradient_checkpointing,
        "select": ("torch" if name == "codebook_torch" or device.type != "cuda"
                   or not triton_available() else "fused") if on else None,
        "dtype": "bf16" if cfg.deepspeed.uses_bf16(device.type) else "fp32",
        "threads": torch.get_num_threads(),
    }
    if shape is not None:
        flops = model_flops_per_token(shape, args.seq) * tokens_per_step
        row.update(model_tflops_per_s=round(flops / step_ms / 1e9, 2),
                   mfu=round(flops / step_ms / 1e9 / args.peak_tflops, 4),
                   layers=shape["num_hidden_layers"], d_model=shape["hidden_size"],
                   seq=args.seq)
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        row["gpu"] = torch.cuda.get_device_name(device)
    del summary
    gc.collect()
    return row


class CpuTimeReporter(FolderReporter):
    """The loop's folder reporter, also noting this process's CPU time at every log: on a
    shared CPU machine a window's CPU seconds per step (with one thread) are what the step
    costs, whatever other jobs took of the wall clock."""

    def __init__(self, run_dir: Path):
        super().__init__(run_dir)
        self.marks: list[tuple[int, float]] = []

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if "tokens_per_s" in metrics:
            self.marks.append((step, time.process_time()))
        super().log(step, metrics)

    def cpu_step_ms(self, first_window: int) -> list[float]:
        """CPU ms per step of each log window that ends after ``first_window``."""
        return [(t1 - t0) / (s1 - s0) * 1e3
                for (s0, t0), (s1, t1) in zip(self.marks, self.marks[1:], strict=False)
                if s1 > first_window and s1 > s0]


def add_ratios(rows: list[dict]) -> None:
    by_name = {r["variant"]: r for r in rows}
    for r in rows:
        base = by_name.get("plain_ckpt") if r["variant"].endswith("_ckpt") else None
        base = base or by_name.get("plain")
        if base is not None and r is not base:
            r["ratio_to_plain"] = round(r["step_ms"] / base["step_ms"], 3)
            r["tokens_per_s_vs_plain"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
            r["baseline"] = base["variant"]
            if r.get("cpu_step_ms") and base.get("cpu_step_ms"):
                r["cpu_ratio_to_plain"] = round(r["cpu_step_ms"] / base["cpu_step_ms"], 3)
        phase = by_name.get("plain_phase")
        if phase is not None and r["variant"].startswith("codebook"):
            r["tokens_per_s_vs_plain_phase"] = round(r["tokens_per_s"] / phase["tokens_per_s"],
                                                     3)
            if r.get("cpu_step_ms") and phase.get("cpu_step_ms"):
                r["cpu_tokens_per_s_vs_plain_phase"] = round(
                    phase["cpu_step_ms"] / r["cpu_step_ms"], 3)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=["pythia410m", "fsm"], default="pythia410m")
    p.add_argument("--variants", default=None, help="comma-separated (default: per device)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--window", type=int, default=5, help="log window (steps)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--num-codes", type=int, default=10000)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every variant (e.g. deepspeed.bf16=true)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = None if args.preset == "fsm" else PYTHIA_410M
    if args.quick:
        args.steps, args.window = 6, 2
        if shape is not None:
            shape = TINY
            args.batch, args.seq, args.num_codes, args.k = 2, 64, 128, 4
    if args.variants:
        variants = args.variants.split(",")
    elif args.preset == "fsm":
        variants = FSM_VARIANTS
    else:
        variants = GPU_VARIANTS if device.type == "cuda" else CPU_VARIANTS
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-step-") as storage:
        for name in variants:
            rows.append(run_variant(name, shape, args, Path(storage), device))
            add_ratios(rows)
            print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
