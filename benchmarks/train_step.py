"""Training-step cost of codebooks on a Pythia-410M-shaped model, against the plain model.

Runs the project's one training loop (``codebook.training.local.train_local``: the real
``train``, engine and model wrapping; no Ray, no MLflow) in this process, on random tokens:

* ``plain``: the model with its codebooks never switched on (``codebook.start_step`` past the
  end), the baseline, measured in the same run;
* ``codebook``: attention-head codebooks on every layer from step 0 (10,000 codes, k=8, the
  ``configs/pythia410m_wikitext.yaml`` settings), scored in ``score_chunk_tokens`` chunks;
* ``codebook_bigchunk`` (GPU only): the same with 65,536-row score chunks.

The model is GPT-NeoX with Pythia-410M's shape (24 layers, d_model 1024, 16 heads, MLP 4096,
vocabulary 50,304, rotary 25%) built from a config with random weights (no hub). Under
DeepSpeed (ZeRO-0, one device; bf16 on GPU, fp32 on CPU), AdamW, no activation checkpointing.

One JSON line per variant: ``step_ms`` (median over the loop's log windows after warm-up, from
its ``tokens_per_s``), ``tokens_per_s``, ``ratio_to_plain`` (``step_ms / plain step_ms``, the
target being <= 1.5), ``model_tflops_per_s`` and ``mfu`` (model FLOPs: 6 x non-embedding-lookup
parameters + 12 x layers x d_model x context per token, the plain model's, against
``--peak-tflops``: 989 for an H100/H200 SXM's dense bf16 datasheet figure; the codebook scoring
is extra work and is not counted), ``peak_mem_gib`` (``torch.cuda.max_memory_allocated``, GPU
only) and the shapes.

Usage::

    python benchmarks/train_step.py [--device cuda] [--steps 30] [--quick]

``--quick``: a 2-layer d64 model, 6 steps, on CPU: a smoke test, not a measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codebook.training.config import load_config  # noqa: E402
from codebook.training.local import train_local  # noqa: E402
from codebook.training.loop import LoopData  # noqa: E402

PYTHIA_410M = {"vocab_size": 50304, "hidden_size": 1024, "num_hidden_layers": 24,
               "num_attention_heads": 16, "intermediate_size": 4096,
               "max_position_embeddings": 2048, "rotary_pct": 0.25}
TINY = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 256, "max_position_embeddings": 256, "rotary_pct": 0.25}


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


def run_variant(name: str, shape: dict, args, storage: Path, device: torch.device) -> dict:
    on = name != "plain"
    sets = {
        "run.name": name, "run.storage_path": str(storage), "run.max_steps": args.steps,
        "run.log_every": args.window, "run.eval_every": 10**9, "run.checkpoint_every": 0,
        "model.from_config": json.dumps({"model_type": "gpt_neox", **shape}),
        "codebook.sites": "[attn_heads]", "codebook.num_codes": args.num_codes,
        "codebook.k": args.k, "codebook.start_step": 0 if on else 10**9,
        "codebook.kmeans_init_batches": 4 if on else 0,
        "codebook.score_chunk_tokens": 65536 if name == "codebook_bigchunk" else 4096,
        "optim.batch_size": args.batch, "optim.lr": 1e-4, "deepspeed.zero_stage": 0,
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()] + args.set)
    data = LoopData(train=random_batches(shape["vocab_size"], args.batch, args.seq),
                    eval=lambda: [])
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    summary = train_local(cfg, data, device)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if "tokens_per_s" in r and r["step"] > args.window]
    tokens_per_step = args.batch * args.seq
    step_ms = statistics.median(tokens_per_step / r["tokens_per_s"] * 1e3 for r in windows)
    flops = model_flops_per_token(shape, args.seq) * tokens_per_step
    row = {
        "variant": name, "device": device.type, "step_ms": round(step_ms, 2),
        "tokens_per_s": round(tokens_per_step / step_ms * 1e3, 1),
        "model_tflops_per_s": round(flops / step_ms / 1e9, 2),
        "mfu": round(flops / step_ms / 1e9 / args.peak_tflops, 4),
        "windows_ms": [round(tokens_per_step / r["tokens_per_s"] * 1e3, 2) for r in windows],
        "final_loss": summary["final_train_loss"], "wall_s": round(wall, 1),
        "batch": args.batch, "seq": args.seq, "steps": args.steps,
        "num_codes": args.num_codes if on else 0, "k": args.k if on else 0,
        "layers": shape["num_hidden_layers"], "d_model": shape["hidden_size"],
        "dtype": "bf16" if device.type == "cuda" else "fp32",
        "score_chunk_tokens": sets["codebook.score_chunk_tokens"] if on else None,
    }
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        row["gpu"] = torch.cuda.get_device_name(device)
    del summary
    gc.collect()
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--window", type=int, default=5, help="log window (steps)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--num-codes", type=int, default=10000)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every variant (e.g. deepspeed.bf16=true)")
    args = p.parse_args(argv)
    shape = PYTHIA_410M
    if args.quick:
        shape = TINY
        args.steps, args.window, args.batch, args.seq = 6, 2, 2, 64
        args.num_codes, args.k = 128, 4
    device = torch.device(args.device)
    variants = ["plain", "codebook"] + (["codebook_bigchunk"] if device.type == "cuda" else [])
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-step-") as storage:
        for name in variants:
            row = run_variant(name, shape, args, Path(storage), device)
            if rows:
                row["ratio_to_plain"] = round(row["step_ms"] / rows[0]["step_ms"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
