"""Hyperparameter sweeps with Ray Tune over the one training loop; every trial in MLflow.

    python tuning/sweep.py --config configs/sweeps/fsm_k_codes.yaml
    python tuning/sweep.py --config configs/sweeps/fsm_k_codes.yaml --resume   # after a crash

Each trial is the training job of ``pipelines/train.py`` (``codebook.ray_glue.train.fit``: a
Ray Train ``TorchTrainer`` with its own workers) inside a Tune function trainable; ASHA stops
poor trials early on the metric the loop reports at each checkpoint. The sweep lives in
``<run.storage_path>/<sweep name>/`` (``tune/`` Tune's experiment, ``runs/`` one Ray Train run
per trial, the summary table, plots and ``best_config.yaml``). MLflow gets one parent run for
the sweep and one child run per trial.

The last line printed is a JSON summary: ``trials``, ``best_config`` (the best trial's searched
values), ``best_eval_loss``, ``best_config_path``, ``mlflow_parent_run_id``, ``sweep_dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or a Ray job

import yaml  # noqa: E402

from codebook.errors import ConfigError  # noqa: E402
from tuning.spec import SweepSpec, load_spec, trial_config  # noqa: E402

PARENT_ID_FILE = "mlflow_parent_run_id"
SPEC_COPY = "sweep.yaml"
ASHA_STATE = "asha_rungs.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="sweep YAML file (configs/sweeps/*.yaml)")
    p.add_argument("--name", help="sweep name (default: name: in the file, else its file name)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep; finished trials are not rerun")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        spec = load_spec(args.config, name=args.name)
        prepare_sweep_dir(spec, args.resume)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    print(f"sweep {spec.name}: {spec.sweep_dir}", flush=True)
    from codebook.ray_glue.session import ray_session

    # Save Tune's experiment state often: a killed driver then loses little on --resume.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    started = time.perf_counter()
    try:
        with ray_session():
            max_concurrent = check_resources(spec)
            parent_id = open_parent_run(spec, args.resume)
            results = run_tuner(spec, parent_id, max_concurrent, args.resume)
            unfinished = len(results) - results.num_terminated - results.num_errors
            rows = collect_rows(spec, results) if not unfinished else []
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    if unfinished:  # interrupted (Ctrl-C): the parent run stays open for --resume
        sys.exit(f"sweep {spec.name} interrupted with {unfinished} trials unfinished; "
                 f"continue it with: python tuning/sweep.py --config {args.config} --resume"
                 + (f" --name {args.name}" if args.name else ""))
    summary = finish_sweep(spec, parent_id, rows)
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary, default=str), flush=True)
    return summary


# ---------------------------------------------------------------------- before any trial
def prepare_sweep_dir(spec: SweepSpec, resume: bool) -> None:
    """A new sweep gets a new folder (never overwritten); --resume needs the same sweep file."""
    d = spec.sweep_dir
    if not resume:
        if d.exists():
            raise ConfigError("name", f"sweep folder {d} already exists",
                              "pass --resume to continue that sweep, or pick a new name "
                              "(name: in the sweep file, or --name)")
        d.mkdir(parents=True)
        shutil.copyfile(spec.path, d / SPEC_COPY)
        spec.write_frozen_base()
        spec.runs_dir.mkdir()
        return
    if not (d / SPEC_COPY).is_file() or not spec.frozen_base.is_file():
        raise ConfigError("--resume", f"no sweep named {spec.name} in {spec.storage_root}",
                          "run without --resume to start it, or give the sweep's name")
    saved = yaml.safe_load((d / SPEC_COPY).read_text())
    if saved != spec.raw:
        raise ConfigError("--config", f"{spec.path} differs from the file sweep {spec.name} "
                          f"started with ({d / SPEC_COPY})",
                          "resume with the original file, or start a new sweep with another name")


def check_resources(spec: SweepSpec) -> int:
    """Fail before Tune waits forever for resources no node has; returns max concurrency."""
    import ray

    total = ray.cluster_resources()
    r = spec.resources
    gpus = total.get("GPU", 0)
    use_gpu = r.use_gpu if r.use_gpu is not None else gpus >= 1
    cpus = r.trial_cpu + r.num_workers * r.cpus_per_worker
    if cpus > total.get("CPU", 0):
        raise ConfigError("resources_per_trial", f"a trial needs {r.trial_cpu:g} + "
                          f"{r.num_workers} x {r.cpus_per_worker:g} = {cpus:g} CPUs but the "
                          f"cluster has {total.get('CPU', 0):g}",
                          "lower num_workers or cpus_per_worker (fractions are fine)")
    if use_gpu and r.num_workers > gpus:
        raise ConfigError("resources_per_trial", f"a trial needs {r.num_workers} GPUs "
                          f"(one per worker) but the cluster has {gpus:g}",
                          "lower num_workers or add GPU nodes")
    if spec.max_concurrent_trials is not None:
        return spec.max_concurrent_trials
    return max(1, int(gpus // r.num_workers)) if use_gpu else 1


def open_parent_run(spec: SweepSpec, resume: bool) -> str:
    """The sweep's MLflow parent run (reopened on --resume)."""
    from codebook.tracking import start_run

    id_file = spec.sweep_dir / PARENT_ID_FILE
    old = id_file.read_text().strip() if resume and id_file.is_file() else None
    run_id = start_run(spec.tracking_uri, spec.experiment, spec.name, spec.to_params(),
                       {"sweep": spec.name, "sweep_dir": str(spec.sweep_dir)}, run_id=old)
    id_file.write_text(run_id)
    return run_id


# ---------------------------------------------------------------------- Tune
def build_scheduler(spec: SweepSpec):
    from ray.tune.schedulers import FIFOScheduler

    from tuning.trial import FinishingASHA

    s = spec.scheduler
    if s.kind == "fifo":
        return FIFOScheduler()
    return FinishingASHA(spec.max_steps_bound(), state_file=str(spec.sweep_dir / ASHA_STATE),
                         time_attr=s.time_attr, max_t=s.max_t, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)


def run_tuner(spec: SweepSpec, parent_id: str, max_concurrent: int, resume: bool):
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from tuning.trial import TrialEvents, codebook_trial, trial_dirname

    constants = {"name": spec.name, "base_config": str(spec.frozen_base),
                 "parent_run_id": parent_id}
    trainable = tune.with_resources(tune.with_parameters(codebook_trial, sweep=constants),
                                    {"CPU": spec.resources.trial_cpu})
    tune_dir = spec.tune_dir
    if resume and tune.Tuner.can_restore(str(tune_dir)):
        print(f"sweep {spec.name}: resuming {tune_dir}", flush=True)
        tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_errored=True)
    else:
        if resume:
            print(f"sweep {spec.name}: no Tune state saved yet, starting the trials", flush=True)
        tuner = tune.Tuner(
            trainable,
            param_space={k: d.to_tune() for k, d in spec.search.items()},
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, scheduler=build_scheduler(spec),
                # max_concurrent here: Tune ignores max_concurrent_trials when given a
                # BasicVariantGenerator.
                search_alg=BasicVariantGenerator(random_state=spec.seed,
                                                 max_concurrent=max_concurrent),
                num_samples=spec.num_samples,
                # No actor reuse: a trial ASHA stops must lose its actor, which takes the inner
                # TorchTrainer's controller and workers down with it (a reused actor keeps
                # training the stopped trial and the next one never starts).
                reuse_actors=False,
                trial_name_creator=trial_dirname, trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(
                name=tune_dir.name, storage_path=str(tune_dir.parent),
                failure_config=tune.FailureConfig(max_failures=0),
                callbacks=[TrialEvents()]),
        )
    return tuner.fit()


# ---------------------------------------------------------------------- after the trials
def collect_rows(spec: SweepSpec, results) -> list[dict[str, Any]]:
    """One summary row per trial, from Tune's results and the trial's run folder."""
    from codebook.checkpoint import latest_intact_checkpoint
    from codebook.ray_glue.train import MLFLOW_ID_FILE
    from tuning.trial import run_name

    rows = []
    for result in results:
        trial_id = Path(result.path).name
        values = {k: result.config.get(k) for k in spec.search}
        cfg = trial_config(spec.frozen_base, values, run_name(spec.name, trial_id))
        m = result.metrics or {}
        history = result.metrics_dataframe
        evals = (history[spec.metric].dropna().tolist()
                 if history is not None and spec.metric in history else [])
        step = m.get("step")
        if result.error is not None:
            status = "error"
        elif step is not None and step >= cfg.run.max_steps:
            status = "finished"
        else:
            status = "stopped_early"
        run_dir = cfg.run_dir
        ckpt = latest_intact_checkpoint(run_dir)[0] if run_dir.exists() else None
        id_file = run_dir / MLFLOW_ID_FILE
        best_seen = (min(evals) if spec.mode == "min" else max(evals)) if evals else None
        rows.append({
            "trial_id": trial_id, "status": status, **values,
            "k": cfg.codebook.k, "num_codes": cfg.codebook.num_codes,
            "sites": "+".join(cfg.codebook.sites), "lr": cfg.optim.lr,
            "max_steps": cfg.run.max_steps, "steps": step, "reports": len(evals),
            "eval_loss": m.get("eval_loss"), "eval_accuracy": m.get("eval_accuracy"),
            "train_loss": m.get("train_loss"),
            "dead_code_fraction": m.get("train_codebook_dead_code_fraction"),
            "tokens_per_s": m.get("tokens_per_s"),
            spec.metric: m.get(spec.metric), f"best_{spec.metric}": best_seen,
            "mlflow_run_id": id_file.read_text().strip() if id_file.is_file() else None,
            "run_dir": str(run_dir), "checkpoint": str(ckpt) if ckpt else None,
            "error": str(result.error).splitlines()[0][:300] if result.error else None,
        })
    return sorted(rows, key=lambda r: r["trial_id"])


def pick_best(spec: SweepSpec, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Best last-reported metric among trials that finished (else among all that reported)."""
    def ok(r):
        v = r.get(spec.metric)
        return v is not None and not (isinstance(v, float) and math.isnan(v))

    pool = [r for r in rows if r["status"] == "finished" and ok(r)] or [r for r in rows if ok(r)]
    if not pool:
        return None
    pick = min if spec.mode == "min" else max
    return pick(pool, key=lambda r: r[spec.metric])


def export_best_config(spec: SweepSpec, best: dict[str, Any]) -> Path:
    """The best trial's training config, ready for ``pipelines/train.py --config``."""
    from tuning.report import write_best_config

    values = {k: best[k] for k in spec.search}
    data = trial_config(spec.frozen_base, values).to_dict()
    data["run"]["name"] = None  # train.py names the run <file stem>-<timestamp>
    # Back to the user's places and resources (the trial's worker count stays: it sets the
    # global batch size the trial was tuned with).
    data["run"]["storage_path"] = spec.base.run.storage_path
    data["run"]["cpus_per_worker"] = spec.base.run.cpus_per_worker
    data["run"]["use_gpu"] = spec.base.run.use_gpu
    data["mlflow"]["tracking_uri"] = spec.base.mlflow.tracking_uri
    header = (f"Best trial of sweep {spec.name} ({spec.path.name}): {best['trial_id']}, "
              f"{spec.metric} {best[spec.metric]:.4f} at step {best['steps']}.\n"
              f"Searched values: {json.dumps(values, default=str)}\n"
              f"Run it: python pipelines/train.py --config {spec.sweep_dir / 'best_config.yaml'}")
    return write_best_config(data, spec.sweep_dir / "best_config.yaml", header)


def finish_sweep(spec: SweepSpec, parent_id: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Tag the children, write table/plots/best config, log them to the parent, close it."""
    from mlflow.tracking import MlflowClient

    from codebook.tracking import MLflowLogger, finish_run, log_artifacts
    from tuning.report import summary_table, write_plots, write_table

    client = MlflowClient(spec.tracking_uri)
    for row in rows:
        if not row["mlflow_run_id"]:
            continue
        run = client.get_run(row["mlflow_run_id"])
        client.set_tag(run.info.run_id, "sweep.trial_id", row["trial_id"])
        client.set_tag(run.info.run_id, "sweep.status", row["status"])
        if row["checkpoint"]:
            client.set_tag(run.info.run_id, "checkpoint", row["checkpoint"])
        # A trial ASHA stops dies inside fit: its run is left RUNNING, or FAILED when the
        # inner trainer raised on the way down. Either way it was killed on purpose.
        if row["status"] == "stopped_early" and run.info.status != "KILLED":
            client.set_terminated(run.info.run_id, "KILLED")
        elif row["status"] == "error" and run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "FAILED")

    d = spec.sweep_dir
    df = summary_table(rows)
    tables = write_table(df, d)
    write_plots(df, d / "plots", spec.metric)
    best = pick_best(spec, rows)
    best_path = export_best_config(spec, best) if best else None
    for path in tables:
        log_artifacts(spec.tracking_uri, parent_id, path, "summary")
    log_artifacts(spec.tracking_uri, parent_id, d / "plots", "plots")
    log_artifacts(spec.tracking_uri, parent_id, d / SPEC_COPY, "sweep")
    if best_path:
        log_artifacts(spec.tracking_uri, parent_id, best_path, "best_config")
    counts = {s: sum(r["status"] == s for r in rows)
              for s in ("finished", "stopped_early", "error")}
    metrics = {"trials": float(len(rows)), **{f"trials_{s}": float(n) for s, n in counts.items()}}
    if best:
        metrics[f"best_{spec.metric}"] = float(best[spec.metric])
        if best.get("eval_loss") is not None:
            metrics["best_eval_loss"] = float(best["eval_loss"])
        client.set_tag(parent_id, "best_trial", best["trial_id"])
    MLflowLogger(spec.tracking_uri, parent_id).log(0, metrics)
    finish_run(spec.tracking_uri, parent_id, status="FINISHED" if best else "FAILED")

    keep = ("trial_id", "status", "steps", spec.metric, "eval_loss", "mlflow_run_id",
            "checkpoint")
    return {
        "sweep": spec.name, "sweep_dir": str(d), "mlflow_parent_run_id": parent_id,
        "trials": [{**{k: r.get(k) for k in keep},
                    "params": {k: r.get(k) for k in spec.search}} for r in rows],
        "counts": counts,
        "best_trial": best["trial_id"] if best else None,
        "best_config": {k: best[k] for k in spec.search} if best else None,
        "best_eval_loss": best.get("eval_loss") if best else None,
        f"best_{spec.metric}": best.get(spec.metric) if best else None,
        "best_config_path": str(best_path) if best_path else None,
    }


if __name__ == "__main__":
    main()
