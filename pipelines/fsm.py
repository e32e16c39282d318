"""The finite-state-machine experiment end to end: train, then codes vs neurons and interventions.

    python pipelines/fsm.py            # the full default (configs/fsm.yaml)
    python pipelines/fsm.py --quick    # a few-minute version with a smaller FSM and model
    python pipelines/fsm.py --model RUN/checkpoint_.../hf   # analyse a trained model again

Training is ``pipelines/train.py``'s job (same loop, same Ray Train pipeline); the analysis is
``codebook.analysis.fsm``. The report (JSON, also the last line printed), plots and the FSM
itself are written to the run folder and logged to the run's MLflow record.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or a Ray job

from codebook.checkpoint import resolve_local, verify_train_model  # noqa: E402
from codebook.errors import ConfigError  # noqa: E402
from codebook.training.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUICK = [  # a smaller FSM and model: the whole pipeline in a few minutes on 2 cores
    "data.fsm={num_states: 24, num_edges: 4, base: 10, seed: 42, trajectory_states: 24}",
    "model.from_config.hidden_size=64", "model.from_config.num_hidden_layers=2",
    "model.from_config.intermediate_size=256", "codebook.num_codes=128",
    "codebook.start_step=150", "run.max_steps=250", "run.eval_every=250",
    "run.checkpoint_every=250", "run.log_every=50", "data.eval_blocks=128",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "fsm.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quick", action="store_true", help="small FSM and model, a few minutes")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--eval-sequences", type=int, default=None,
                   help="held-out sequences for the analysis (default: data.eval_blocks)")
    p.add_argument("--max-pairs", type=int, default=2000,
                   help="(a, b) state pairs for the interventions")
    p.add_argument("--model", type=Path,
                   help="skip training: analyse this trained checkpoint (its run's "
                        "analysis/fsm.json gives the FSM, else the config's data.fsm)")
    p.add_argument("--out", type=Path, help="with --model: the report folder "
                   "(default: analysis-<time> in the checkpoint's run folder)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    overrides = (QUICK if args.quick else []) + args.set
    try:
        cfg = load_config(args.config, overrides, **{"run.num_workers": args.num_workers})
        if cfg.data.source != "fsm":
            raise ConfigError("data.source", f"got {cfg.data.source!r}", "the FSM needs 'fsm'")
        if args.model is not None:  # analyse a trained model: check it before any work
            args.model = Path(resolve_local(str(args.model)))
        else:
            cfg.resolve_run_name("fsm-quick" if args.quick else "fsm", resume=False)
            verify_train_model(cfg.model.name_or_path, cfg.model.gguf_file)  # before Ray
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    from codebook.data.fsm import TokFSM
    from codebook.ray_glue.session import ray_session
    from codebook.ray_glue.train import fit

    if args.model is not None:
        return analyse_only(args, cfg)
    fsm = TokFSM(cfg.data.fsm)
    out_dir = cfg.run_dir / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    fsm.save(out_dir / "fsm.json")
    with ray_session():
        started = time.perf_counter()
        summary = fit(cfg)
    extra = {"train_minutes": round((time.perf_counter() - started) / 60, 2),
             "steps": summary["steps"], "final_eval_loss": summary["final_eval_loss"],
             "mlflow_run_id": summary["mlflow_run_id"], "checkpoint": summary["checkpoint"],
             "quick": args.quick}
    return analyse(summary["model"], fsm, cfg, args, out_dir, summary["steps"], extra)


def analyse_only(args: argparse.Namespace, cfg) -> dict:
    """``--model``: the analysis alone, logged to a new MLflow run."""
    from codebook.data.fsm import TokFSM
    from codebook.tracking import start_run

    model_dir = args.model
    saved = next((p for p in (model_dir.parent.parent / "analysis" / "fsm.json",
                              model_dir.parent / "analysis" / "fsm.json") if p.is_file()), None)
    fsm = TokFSM.load(saved) if saved else TokFSM(cfg.data.fsm)
    out_dir = args.out or model_dir.parent.parent / time.strftime("analysis-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    fsm.save(out_dir / "fsm.json")
    run_id = start_run(cfg.tracking_uri(), cfg.mlflow.experiment, "fsm-analysis",
                       {"model": str(model_dir), "fsm": str(saved or "config")}, {})
    extra = {"mlflow_run_id": run_id, "checkpoint": str(model_dir), "quick": args.quick}
    return analyse(model_dir, fsm, cfg, args, out_dir, 0, extra)


def analyse(model_path, fsm, cfg, args: argparse.Namespace, out_dir: Path, step: int,
            extra: dict) -> dict:
    """Run the analysis on a saved model; write, plot, log to MLflow and print the report."""
    import torch

    from codebook.analysis.fsm import run_fsm_analysis
    from codebook.analysis.plots import plot_code_vs_neuron_precision, plot_intervention_by_site
    from codebook.io import atomic_write
    from codebook.resolve import load_trained_model
    from codebook.tracking import MLflowLogger, finish_run, log_artifacts

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = load_trained_model(str(model_path))
    eval_tokens = torch.from_numpy(fsm.eval_set(args.eval_sequences or cfg.data.eval_blocks))
    t0 = time.perf_counter()
    report = run_fsm_analysis(model, fsm, eval_tokens, max_pairs=args.max_pairs,
                              seed=cfg.run.seed)
    report.update({"analysis_minutes": round((time.perf_counter() - t0) / 60, 2), **extra})
    with atomic_write(out_dir / "report.json") as fh:
        json.dump(report, fh, indent=2)
    plot_code_vs_neuron_precision(report, out_dir / "code_vs_neuron_precision.png")
    plot_intervention_by_site(report, out_dir / "intervention_by_site.png")
    headline = {k: v for k, v in report.items() if isinstance(v, int | float) and v is not None}
    run_id = report["mlflow_run_id"]
    MLflowLogger(cfg.tracking_uri(), run_id).log(
        step, {f"fsm/{k}": float(v) for k, v in headline.items()})
    log_artifacts(cfg.tracking_uri(), run_id, out_dir, "fsm_analysis")
    if args.model is not None:
        finish_run(cfg.tracking_uri(), run_id)
    compact = {k: v for k, v in report.items() if k != "per_state"}
    print(json.dumps(compact), flush=True)
    return report


if __name__ == "__main__":
    main()
