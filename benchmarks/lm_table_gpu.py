"""The LM table in one process, for a GPU box without Ray or MLflow (the GPU image has torch,
transformers and triton only): the same runner as ``pipelines/lm_table.py`` with the one
training loop run here (``codebook.training.local.train_local``) instead of under Ray Train.

    python benchmarks/lm_table_gpu.py --config configs/lm_table/smollm2_gpu.yaml --out OUT
    python benchmarks/lm_table_gpu.py --config configs/lm_table/smollm2_gpu.yaml --quick \
        --device cpu --out OUT                      # the same call on tiny shapes, on a CPU

Writes the table (``table.md``, ``table.json``, ``loss_vs_k.png``) to OUT and prints one JSON
line per row with its training tokens/s, then the summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (a CPU rehearsal)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    import torch

    from codebook.lm_table.quick import quick_overrides
    from codebook.lm_table.runner import prepare, run
    from codebook.training.local import train_local

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    extra = quick_overrides(args.out / "quick-data") if args.quick else []
    plan = prepare(args.config, ["mlflow=false", *args.set], extra, args.out)

    def fit(tc, resume: bool, parent: str | None) -> dict:
        started = time.perf_counter()
        summary = train_local(tc, device=device, resume=resume)
        print(json.dumps({"run": tc.run.name, "steps": summary["steps"],
                          "tokens": summary["tokens"],
                          "tokens_per_s": summary["tokens"] / (time.perf_counter() - started),
                          "final_train_loss": summary["final_train_loss"]}), flush=True)
        return summary

    summary = run(plan, fit, device=device)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
