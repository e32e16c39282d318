"""Ray Train around the one training loop: the worker, its reporter, failure handling, ``fit``.

``pipelines/train.py``, ``pipelines/fsm.py`` and the sweep trials all call ``fit``; the loop
itself lives in ``codebook.training.loop`` and knows nothing of Ray.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from codebook.checkpoint import (
    checkpoint_dirs,
    choose_resume,
    latest_intact_checkpoint,
    skipped_message,
)
from codebook.errors import DETERMINISTIC_ERRORS, ConfigError, TrainingDiverged
from codebook.ray_glue.data import text_datasets, worker_loop_data
from codebook.tracking import MLflowLogger, finish_run, start_run
from codebook.training.config import TrainConfig, build
from codebook.training.loop import HF_DIR, STATE_FILE, Workers, train
from codebook.training.metric_names import reported

MLFLOW_ID_FILE = "mlflow_run_id"
TORCH_THREADS_METRIC = "system/torch_threads"
# Ray Train V2 patches ``print`` in its workers to also log each line, and since a Ray worker's
# sys.stdout is not sys.__stdout__ it prints the line as well: the driver got every line of
# the worker's stdout twice (once from its .out, once from its .err). Ray Train propagates
# this variable from the driver to its controller and workers.
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"


# ---------------------------------------------------------------------- worker side
class RayReporter:
    """Metrics to MLflow from rank 0; checkpoints to Ray Train from every rank."""

    def __init__(self, logger: MLflowLogger | None):
        self.logger = logger

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.logger is not None:
            self.logger.log(step, metrics)

    def checkpoint(self, step: int, metrics: dict[str, float], directory: Path) -> None:
        import ray.train

        payload = {**reported(metrics), "step": step}
        ray.train.report(payload, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))


def worker_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` for ``TorchTrainer``: set up data and reporter, run the loop."""
    import ray.train
    import ray.train.torch
    import torch

    cfg: TrainConfig = build(TrainConfig, config["config"], "")
    ctx = ray.train.get_context()
    workers = Workers(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())
    logger = None
    if workers.rank == 0 and config.get("mlflow_run_id"):
        logger = MLflowLogger(config["tracking_uri"], config["mlflow_run_id"])
        # torch threads in the training thread, to compare with an in-process run
        logger.log(0, {TORCH_THREADS_METRIC: float(torch.get_num_threads())})
    reporter = RayReporter(logger)
    data = worker_loop_data(cfg, workers)
    # After a worker failure Ray Train hands back the latest reported checkpoint; on a --resume
    # of an interrupted job (same run.name and storage) Ray Train V2 restores it too. Otherwise
    # fall back to the checkpoint the driver found. Each is verified: the newest intact wins.
    checkpoint = resume_checkpoint(ray.train.get_checkpoint(), config.get("resume_from"),
                                   cfg.run_dir, workers.rank == 0)
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as resume_dir:
        if resume_dir and workers.rank == 0:
            print(f"resuming from {checkpoint.path}", flush=True)
        train(cfg, data, reporter, workers, Path(resume_dir) if resume_dir else None,
              config.get("mlflow_run_id"))


def resume_checkpoint(checkpoint: Any, resume_from: str | None, run_dir: Path,
                      report: bool) -> Any:
    """The checkpoint a worker resumes from: Ray Train's own (``get_checkpoint``), the driver's
    pick or another of the run's, whichever is newest and intact (damaged ones are named on
    stdout when ``report``). A checkpoint on remote storage is taken as Ray gives it."""
    import pyarrow.fs
    import ray.train

    if checkpoint is not None and not isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return checkpoint
    picked, damaged = choose_resume([checkpoint.path if checkpoint else None, resume_from,
                                     *checkpoint_dirs(run_dir)])
    for path, why in damaged if report else []:
        print(skipped_message(path, why, picked), flush=True)
    if picked is None and damaged:
        raise ConfigError("--resume", f"no intact checkpoint under {run_dir}",
                          "start a new run (another run.name, without --resume)")
    return ray.train.Checkpoint(str(picked)) if picked else None


# ---------------------------------------------------------------------- failures
def project_error(err: BaseException) -> Exception | None:
    """The project error (ConfigError, TrainingDiverged) a failed Ray Train run carries, if any:
    in the workers' failures, or anywhere in the exception's cause chain."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DETERMINISTIC_ERRORS):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "controller_failure", None)]
        todo += list(getattr(e, "worker_failures", {}).values())
    return None


def _with_checkpoint_path(err: TrainingDiverged, run_dir: Path) -> TrainingDiverged:
    """Name the last good checkpoint by its folder rather than its step."""
    step = int(err.last_good_checkpoint.split()[-1]) if err.last_good_checkpoint else None
    for state in run_dir.glob(f"*/{STATE_FILE}"):
        try:
            if json.loads(state.read_text()).get("step") == step:
                return TrainingDiverged(err.step, err.nonfinite_steps, str(state.parent))
        except (OSError, ValueError):
            continue
    return err


try:
    from ray.train import UserCallback as _UserCallback
except ImportError:  # Ray Train V1
    _UserCallback = object


class StopOnDeterministicError(_UserCallback):
    """Ray Train retries a failed worker group ``max_failures`` times; a bad config or a
    diverged loss fails the same way every time, so raise it at once instead."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for error in worker_exceptions.values():
            cause = project_error(error)
            if cause is not None:
                raise cause


# ---------------------------------------------------------------------- driver side
def check_placeable(cfg: TrainConfig) -> bool:
    """Fail before any worker starts if the cluster can never place the workers."""
    import ray

    total = ray.cluster_resources()
    use_gpu = cfg.run.use_gpu if cfg.run.use_gpu is not None else total.get("GPU", 0) >= 1
    n = cfg.run.num_workers
    if use_gpu and n > total.get("GPU", 0):
        raise ConfigError("run.num_workers", f"{n} GPU workers but the cluster has "
                          f"{total.get('GPU', 0):g} GPUs", "lower --num-workers or add GPU nodes")
    need = n * cfg.run.cpus_per_worker
    if need > total.get("CPU", 0):
        raise ConfigError("run.num_workers", f"{n} workers x {cfg.run.cpus_per_worker:g} CPUs "
                          f"= {need:g} CPUs but the cluster has {total.get('CPU', 0):g}",
                          "lower --num-workers or run.cpus_per_worker, or add nodes")
    return bool(use_gpu)


RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's checkpoints


def set_aside_stale_snapshot(run_dir: Path) -> Path | None:
    """Rename Ray Train's checkpoint list in ``run_dir`` to ``*.stale`` when a checkpoint it
    names is gone (deleted, or lost in a crash): Ray's controller would fail on it before any
    worker starts. The resume does not need it: :func:`fit` picks the newest intact checkpoint
    itself and hands it to the workers. Returns the new path, or None if nothing was stale."""
    snapshot = run_dir / RAY_SNAPSHOT_FILE
    if not snapshot.is_file():
        return None
    try:
        names = _checkpoint_dir_names(json.loads(snapshot.read_text()))
        missing = sorted(n for n in names if not (run_dir / n).is_dir())
    except (OSError, ValueError):
        missing = ["unreadable"]
    if not missing:
        return None
    aside = snapshot.with_suffix(".json.stale")
    os.replace(snapshot, aside)
    print(f"{snapshot}: names checkpoints that are gone ({', '.join(missing)}); "
          f"set aside as {aside.name}, resuming from the newest intact checkpoint", flush=True)
    return aside


def _checkpoint_dir_names(node: Any) -> set[str]:
    """Every ``checkpoint_dir_name`` value anywhere in a parsed Ray snapshot."""
    if isinstance(node, dict):
        found = {node["checkpoint_dir_name"]} if isinstance(
            node.get("checkpoint_dir_name"), str) else set()
        return found.union(*(_checkpoint_dir_names(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_checkpoint_dir_names(v) for v in node))
    return set()


def fit(cfg: TrainConfig, resume: bool = False, callbacks: list | None = None,
        mlflow_parent_run_id: str | None = None) -> dict[str, Any]:
    """Run the training job on the current Ray cluster; returns the JSON summary."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    if not cfg.run.checkpoint_every:
        raise ConfigError("run.checkpoint_every", "0 (no checkpoints) leaves the job no model",
                          "set a number of steps (0 is for in-process benchmarks only)")
    run_dir = cfg.run_dir
    previous, damaged = latest_intact_checkpoint(run_dir)
    if resume and previous is None:
        found = "; ".join(f"{d.name}: {why}" for d, why in damaged)
        raise ConfigError("--resume", f"no intact checkpoint under {run_dir}"
                          + (f" (damaged: {found})" if found else ""),
                          "run without --resume, or give the run.name of an earlier run")
    if not resume and (previous is not None or damaged):
        raise ConfigError("run.name", f"{run_dir} already holds checkpoints of a run",
                          "pass --resume to continue it, or choose another run.name")
    for path, why in damaged:
        print(skipped_message(path, why, previous), flush=True)
    set_aside_stale_snapshot(run_dir)
    use_gpu = check_placeable(cfg)
    datasets = text_datasets(cfg) if cfg.data.source != "fsm" else None
    tracking_uri = cfg.tracking_uri()
    run_dir.mkdir(parents=True, exist_ok=True)
    id_file = run_dir / MLFLOW_ID_FILE
    old_id = id_file.read_text().strip() if resume and id_file.is_file() else None
    tags = {"ray_job_id": os.environ.get("RAY_JOB_ID") or ray.get_runtime_context().get_job_id(),
            "run_name": cfg.run.name, "storage": str(run_dir)}
    if mlflow_parent_run_id:
        tags["mlflow.parentRunId"] = mlflow_parent_run_id
    run_id = start_run(tracking_uri, cfg.mlflow.experiment, cfg.run.name, cfg.flat_params(),
                       tags, run_id=old_id)
    id_file.write_text(run_id)
    os.environ.setdefault(PRINT_PATCH_ENV, "0")  # each worker line once (see PRINT_PATCH_ENV)
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"config": cfg.to_dict(), "mlflow_run_id": run_id,
                           "tracking_uri": tracking_uri,
                           "resume_from": str(previous) if previous else None},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=str(cfg.storage_path),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[StopOnDeterministicError(), *(callbacks or [])]),
        datasets=datasets,
    )
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as err:
        finish_run(tracking_uri, run_id, status="FAILED")
        cause = project_error(err)
        if cause is None:
            raise
        if isinstance(cause, TrainingDiverged):
            cause = _with_checkpoint_path(cause, run_dir)
        raise cause from err
    ckpt = Path(result.checkpoint.path)
    state = json.loads((ckpt / STATE_FILE).read_text())
    metrics = result.metrics or {}
    finish_run(tracking_uri, run_id,
               artifacts={"model": ckpt / HF_DIR} if cfg.mlflow.log_model else None)
    return {
        "mlflow_run_id": run_id,
        "steps": state["step"],
        "final_train_loss": metrics.get("train_loss"),
        "final_eval_loss": metrics.get("eval_loss"),
        "dead_code_fraction": metrics.get("train_codebook_dead_code_fraction"),
        "checkpoint": str(ckpt),
        "model": str(ckpt / HF_DIR),
        "wall_s": round(time.perf_counter() - started, 1),
    }
