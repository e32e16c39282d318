"""Why the training-step benchmark's reconstruction loss grows: the activations drift, not the
codes.

``benchmarks/train_step.py`` trains a random-weight model on random tokens with the codebooks
and the model at the same learning rate (1e-4) and no commitment term; its codebook variant's
reconstruction loss grew from 111 to 9,242 in 30 steps on the H200. This script trains a
smaller model of the same kind (GPT-NeoX 4 x 256, attention-head codebooks, 1,024 codes, k=8,
k-means initialised, random tokens) the same way and varies one thing at a time:

- ``benchmark``: as ``train_step.py`` (lr 1e-4 for both);
- ``frozen_model``: the model's learning rate 0: only the codes learn;
- ``config_lrs``: ``configs/pythia410m_wikitext.yaml``'s ratio (codes 1e-3, model 0.1 x);
- ``config_lrs_commit``: that plus a commitment term of 0.05 (as ``configs/fsm.yaml``).

It prints one JSON line per setting with the reconstruction loss of the first and last log
window and their ratio (about 2 minutes per setting on one CPU thread).

    python benchmarks/recon_drift.py [--steps 30] [--device cpu] [--quick]

``--quick`` (the smoke test): a 2 x 64 model with 128 codes, 4 steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codebook.training.config import load_config  # noqa: E402
from codebook.training.local import FolderReporter, train_local  # noqa: E402
from codebook.training.loop import LoopData  # noqa: E402
from codebook.training.metric_names import TRAIN_RECON_LOSS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import random_batches  # noqa: E402

SHAPE = {"model_type": "gpt_neox", "vocab_size": 8192, "hidden_size": 256,
         "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024,
         "max_position_embeddings": 256, "rotary_pct": 0.25}
SETTINGS = {
    "benchmark": {"optim.lr": 1e-4, "optim.model_lr_factor": 1.0},
    "frozen_model": {"optim.lr": 1e-4, "optim.model_lr_factor": 0.0},
    "config_lrs": {"optim.lr": 1e-3, "optim.model_lr_factor": 0.1},
    "config_lrs_commit": {"optim.lr": 1e-3, "optim.model_lr_factor": 0.1,
                          "codebook.commit_weight": 0.05},
}


QUICK = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 256,
         "vocab_size": 512}


def run_setting(name: str, args: argparse.Namespace, storage: Path) -> dict:
    """Train one setting; its reconstruction loss at the first and last log window."""
    shape = {**SHAPE, **(QUICK if args.quick else {})}
    sets = {"run.name": name, "run.storage_path": str(storage), "run.max_steps": args.steps,
            "run.log_every": 2, "run.eval_every": 10**9, "run.checkpoint_every": 0,
            "model.from_config": json.dumps(shape), "codebook.sites": "[attn_heads]",
            "codebook.num_codes": 128 if args.quick else 1024, "codebook.k": 8,
            "codebook.kmeans_init_batches": 4, "optim.batch_size": 4,
            "deepspeed.enabled": "false", **SETTINGS[name]}
    cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()])
    data = LoopData(train=random_batches(shape["vocab_size"], 4, args.seq), eval=lambda: [])
    reporter = FolderReporter(cfg.run_dir)
    with contextlib.redirect_stdout(sys.stderr):
        train_local(cfg, data, torch.device(args.device), reporter)
    recon = [row[TRAIN_RECON_LOSS] for row in reporter.history if TRAIN_RECON_LOSS in row]
    return {"setting": name, **SETTINGS[name], "steps": args.steps,
            "recon_first": round(recon[0], 4), "recon_last": round(recon[-1], 4),
            "ratio": round(recon[-1] / recon[0], 3)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--quick", action="store_true", help="a tiny model, 4 steps (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seq = 4, 32
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="recon-drift-") as storage:
        for name in args.settings.split(","):
            rows.append(run_setting(name, args, Path(storage)))
            print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
