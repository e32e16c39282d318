"""The FSM experiment trained in this process (no Ray, no MLflow), then its analysis.

``pipelines/fsm.py`` runs the same loop under Ray Train and logs to MLflow; this script is for a
machine that has neither (the GPU suite) and times both halves. It trains ``--config``
(default ``configs/fsm.yaml``, the full default) with ``codebook.training.local.train_local`` on
the best device, loads the last checkpoint with ``CodebookModel.from_pretrained`` and runs
``codebook.analysis.fsm.run_fsm_analysis``. The last line printed is one JSON object: the
report's headline numbers plus ``train_s``, ``analysis_s``, ``steps_per_s``, ``device`` and
``dtype``; the full report is written to ``--out`` (default: the run folder) as
``fsm_report.json``.

Usage::

    python benchmarks/fsm_local.py [--quick] [--device cuda] [--out DIR] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from codebook.training.config import load_config  # noqa: E402
from codebook.training.local import train_local  # noqa: E402

QUICK = [  # pipelines/fsm.py --quick's settings, shorter: a smoke test
    "data.fsm={num_states: 24, num_edges: 4, base: 10, seed: 42, trajectory_states: 24}",
    "model.from_config.hidden_size=64", "model.from_config.num_hidden_layers=2",
    "model.from_config.intermediate_size=256", "codebook.num_codes=128",
    "codebook.start_step=20", "run.max_steps=40", "run.eval_every=40",
    "run.checkpoint_every=40", "run.log_every=10", "data.eval_blocks=64",
]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "fsm.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="folder for fsm_report.json (default: run folder)")
    p.add_argument("--max-pairs", type=int, default=2000)
    args = p.parse_args(argv)

    from codebook import CodebookModel
    from codebook.analysis.fsm import run_fsm_analysis
    from codebook.data.fsm import TokFSM

    storage = tempfile.mkdtemp(prefix="fsm-local-")
    overrides = (QUICK if args.quick else []) + [f"run.storage_path={storage}",
                                                 "run.name=fsm-local"] + args.set
    cfg = load_config(args.config, overrides)
    device = torch.device(args.device)
    started = time.perf_counter()
    summary = train_local(cfg, device=device)
    train_s = time.perf_counter() - started
    print(json.dumps({"stage": "trained", "train_s": round(train_s, 1),
                      "final_eval_loss": summary["final_eval_loss"]}), flush=True)

    fsm = TokFSM(cfg.data.fsm)
    model = CodebookModel.from_pretrained(summary["model"]).to(device).eval()
    eval_tokens = torch.from_numpy(fsm.eval_set(cfg.data.eval_blocks))
    t0 = time.perf_counter()
    report = run_fsm_analysis(model, fsm, eval_tokens, max_pairs=args.max_pairs,
                              seed=cfg.run.seed)
    analysis_s = time.perf_counter() - t0
    bf16 = cfg.deepspeed.uses_bf16(device.type)
    report.update({"train_s": round(train_s, 1), "analysis_s": round(analysis_s, 1),
                   "steps": summary["steps"], "steps_per_s": round(summary["steps"] / train_s, 2),
                   "final_eval_loss": summary["final_eval_loss"], "device": device.type,
                   "dtype": "bf16" if bf16 else "fp32", "quick": args.quick})
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    out = args.out or cfg.run_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "fsm_report.json").write_text(json.dumps(report, indent=2))
    headline = {k: v for k, v in report.items()
                if isinstance(v, int | float | str | bool) or v is None}
    print(json.dumps(headline), flush=True)
    return report


if __name__ == "__main__":
    main()
