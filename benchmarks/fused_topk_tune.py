"""Tile sizes for the fused score + top-k kernel, searched on the device, then the training step
with the winner.

The kernel's autotuner (``codebook.kernels.fused_topk``) only tries a few (BLOCK_M, BLOCK_N,
warps, stages) configurations, chosen without a GPU. This script times a grid of them at the
Pythia-410M per-head shape (8,192 tokens x 16 heads x 64 dims, 10,000 codes, bf16, cosine) for
each ``--k``, checks that every configuration picks the same codes as the tuned default, and
prints one JSON line per configuration and a summary per k (the best against the tuned default
and the score matmul alone, measured in the same run). With ``--step`` it then runs
``benchmarks/train_step.py``'s plain and codebook variants with the best configuration added to
the autotuner's list, so the step's ratio to plain is measured with it.

    python benchmarks/fused_topk_tune.py [--k 8] [--budget-s 120] [--step]
    python benchmarks/fused_topk_tune.py --device cpu      # the interpreter: the code path only

On CPU it runs under Triton's interpreter on a tiny shape (no timing): the smoke test.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--k", type=int, nargs="+", default=[8])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--budget-s", type=float, default=120.0,
                   help="stop trying configurations after this long (per k)")
    p.add_argument("--step", action="store_true",
                   help="then the training step (plain, codebook) with the best tiles")
    p.add_argument("--step-args", default="--steps 20 --window 5",
                   help="extra arguments for train_step.py")
    return p.parse_args(argv)


ARGS = parse_args()

import torch  # noqa: E402

DEVICE = torch.device(ARGS.device or ("cuda" if torch.cuda.is_available() else "cpu"))
if DEVICE.type == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import codebook.kernels.fused_topk as fk  # noqa: E402

GRID = {"BLOCK_M": [32, 64, 128], "BLOCK_N": [32, 64, 128], "num_warps": [4, 8],
        "num_stages": [2, 3]}


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    """Median wall ms of ``fn`` after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def configs() -> list[dict[str, int]]:
    """The grid, the autotuner's own configurations first."""
    own = [dict(zip(GRID, c, strict=True)) for c in fk._CONFIGS_LOW]
    grid = [dict(zip(GRID, c, strict=True)) for c in itertools.product(*GRID.values())]
    return own + [c for c in grid if c not in own]


def tune(k: int) -> dict | None:
    """Time every configuration for ``k``; the summary line (None if nothing ran)."""
    n, g, d, c = (8192, 16, 64, 10000) if DEVICE.type == "cuda" else (40, 2, 16, 100)
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(n, g, d, generator=gen).to(DEVICE, torch.bfloat16)
    codes = torch.randn(g, c, d, generator=gen).to(DEVICE, torch.bfloat16)
    default_ids = fk.fused_topk(x, codes, k, "cosine")[0]  # the autotuner's choice
    repeats = ARGS.repeats if DEVICE.type == "cuda" else 1
    default_ms = timed(lambda: fk.fused_topk(x, codes, k, "cosine"), repeats)
    matmul_ms = timed(lambda: torch.bmm(x.transpose(0, 1), codes.transpose(1, 2)), repeats)
    grid = configs() if DEVICE.type == "cuda" else configs()[:2]
    deadline = time.perf_counter() + ARGS.budget_s
    rows = []
    for cfg in grid:
        if time.perf_counter() > deadline:
            break
        row = {"tune": "fused_topk", "k": k, **cfg}
        try:
            ids = fk.fused_topk(x, codes, k, "cosine", blocks=cfg)[0]
            row["same_ids"] = round(float((ids == default_ids).all(-1).float().mean()), 6)
            row["ms"] = round(timed(lambda cfg=cfg: fk.fused_topk(x, codes, k, "cosine",
                                                                   blocks=cfg), repeats), 4)
        except Exception as err:  # out of shared memory or registers: not a candidate
            row["error"] = f"{type(err).__name__}: {str(err)[:120]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    ok = [r for r in rows if "ms" in r and r["same_ids"] >= 0.999]
    if not ok:
        return None
    best = min(ok, key=lambda r: r["ms"])
    summary = {"tune_summary": "fused_topk", "k": k, "tokens": n, "groups": g, "group_dim": d,
               "num_codes": c, "tried": len(rows), "of": len(grid),
               "best": {key: best[key] for key in GRID}, "best_ms": best["ms"],
               "default_ms": round(default_ms, 4), "matmul_ms": round(matmul_ms, 4),
               "best_vs_default": round(best["ms"] / default_ms, 3),
               "best_ratio_to_matmul": round(best["ms"] / matmul_ms, 3),
               "default_ratio_to_matmul": round(default_ms / matmul_ms, 3)}
    print(json.dumps(summary), flush=True)
    return summary


def main() -> None:
    summaries = [s for k in ARGS.k if (s := tune(k)) is not None]
    if not ARGS.step or DEVICE.type != "cuda" or not summaries:
        return
    best = summaries[0]["best"]
    tiles = (best["BLOCK_M"], best["BLOCK_N"], best["num_warps"], best["num_stages"])
    fk._tuned_low = fk._tuned([tiles, *(t for t in fk._CONFIGS_LOW if t != tiles)])
    print(json.dumps({"step_with_tiles": list(tiles)}), flush=True)
    import train_step

    train_step.main(["--variants", "plain,codebook", *ARGS.step_args.split()])


if __name__ == "__main__":
    main()
