"""Ray glue for the one training loop: Ray Train workers, Ray Data corpora, MLflow run, resume.

``pipelines/train.py``, ``pipelines/fsm.py`` and the sweep trials all call ``fit``; the loop
itself lives in ``codebook.training.loop`` and knows nothing of Ray.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from codebook.checkpoint import (
    checkpoint_dirs,
    choose_resume,
    latest_intact_checkpoint,
    skipped_message,
)
from codebook.errors import DETERMINISTIC_ERRORS, ConfigError, TrainingDiverged
from codebook.tracking import MLflowLogger, finish_run, start_run
from codebook.training.config import TrainConfig, build
from codebook.training.loop import HF_DIR, STATE_FILE, LoopData, Workers, train

MLFLOW_ID_FILE = "mlflow_run_id"


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

        keep = ("train/loss", "train/lm_loss", "train/recon_loss", "eval/loss", "eval/accuracy",
                "train/codebook/dead_code_fraction", "tokens_per_s")
        payload = {k.replace("/", "_"): metrics[k] for k in keep if k in metrics}
        payload["step"] = step
        ray.train.report(payload, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))


def worker_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` for ``TorchTrainer``: set up data and reporter, run the loop."""
    import ray.train
    import ray.train.torch

    cfg: TrainConfig = build(TrainConfig, config["config"], "")
    ctx = ray.train.get_context()
    workers = Workers(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())
    logger = None
    if workers.rank == 0 and config.get("mlflow_run_id"):
        logger = MLflowLogger(config["tracking_uri"], config["mlflow_run_id"])
    reporter = RayReporter(logger)
    data = _loop_data(cfg, workers)
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


def block_batches(shard: Any, batch_size: int, shuffle_buffer: int, seed: int,
                  start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless training batches from a Ray Data iterator, epoch after epoch, skipping the
    first ``start`` (what a resumed run already consumed).

    With ``shuffle_buffer`` > 0 each epoch goes through a local shuffle buffer seeded by
    ``seed`` and the epoch number, so a resume replays the same order; 0 keeps corpus order.
    """
    seen, epoch = 0, 0
    while True:  # every rank sees the same number of batches (equal split)
        kwargs = {"local_shuffle_buffer_size": shuffle_buffer,
                  "local_shuffle_seed": seed + 1000 * epoch} if shuffle_buffer else {}
        for b in shard.iter_torch_batches(batch_size=batch_size, dtypes=torch.long,
                                          drop_last=True, **kwargs):
            seen += 1
            if seen > start:
                yield {"input_ids": b["input_ids"]}
        epoch += 1


def _loop_data(cfg: TrainConfig, workers: Workers) -> LoopData:
    bs = cfg.optim.batch_size
    if cfg.data.source == "fsm":
        from codebook.training.local import fsm_loop_data

        return fsm_loop_data(cfg, workers)
    import ray.train

    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval")

    def train_batches(start: int):
        return block_batches(train_shard, bs, cfg.data.shuffle_buffer,
                             cfg.run.seed + workers.rank, start)

    def eval_batches():
        for b in eval_shard.iter_torch_batches(batch_size=bs, dtypes=torch.long):
            yield {"input_ids": b["input_ids"]}

    return LoopData(train=train_batches, eval=eval_batches)


# ---------------------------------------------------------------------- driver side
def text_datasets(cfg: TrainConfig) -> dict[str, Any]:
    """Ray Data: read, tokenise and pack the corpus into blocks; split off held-out blocks."""
    import ray.data

    from codebook.data.text import expand_paths

    d = cfg.data
    tokenizer = cfg.model.tokenizer or cfg.model.name_or_path
    # A fixed order keeps the held-out split the same across runs and resumes.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    if d.source == "parquet":
        ds = ray.data.read_parquet(expand_paths(d.paths, (".parquet",))).select_columns(
            [d.text_column])
    elif d.source == "text":  # one document per file
        files = expand_paths(d.paths, (".txt", ".md", ".text"))
        ds = ray.data.read_binary_files(files).map(_file_to_document)
    else:
        ds = _hf_dataset(cfg)
        column = d.text_column
        ds = ds.filter(lambda row: bool(str(row[column]).strip()))  # WikiText: blank lines
    ds = ds.map_batches(
        _Packer, fn_constructor_kwargs={"tokenizer": tokenizer, "block_size": d.block_size,
                                        "column": d.text_column if d.source != "text" else "text"},
        batch_format="pandas", batch_size=256,
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5,
    )
    if d.max_blocks:
        ds = ds.limit(d.max_blocks + d.eval_blocks)
    eval_ds, train_ds = ds.split_at_indices([d.eval_blocks])
    need = cfg.optim.batch_size * cfg.run.num_workers
    if train_ds.count() < need:
        where = "data.hf_dataset" if d.source == "hf" else "data.paths"
        raise ConfigError(where, f"the corpus gives fewer than {need} training blocks "
                          f"after the {d.eval_blocks} held-out ones (one batch per worker)",
                          "add text, or lower data.eval_blocks / optim.batch_size")
    return {"train": train_ds, "eval": eval_ds}


def _hf_dataset(cfg: TrainConfig) -> Any:
    """``datasets.load_dataset`` on the driver, its text column handed to Ray Data.

    Errors (no ``datasets`` package, a dataset that is not there or not in the offline cache,
    a wrong split or text column) become ConfigErrors before any worker starts.
    """
    import ray.data

    d = cfg.data
    try:
        import datasets as hf_datasets
    except ImportError as err:
        raise ConfigError("data.source", "source 'hf' needs the Hugging Face datasets package",
                          "pip install -e .[hf] (or use data.source=parquet/text with "
                          "data.paths)") from err
    name, data_files = _hf_location(d.hf_dataset, d.hf_data_files,
                                    _packaged_builders())
    try:
        hf = hf_datasets.load_dataset(name, d.hf_config, split=d.hf_split, data_files=data_files)
    except Exception as err:  # any failure here is about the data settings
        if isinstance(err, ValueError) and "split" in str(err).lower():
            raise ConfigError("data.hf_split", f"{d.hf_split!r} in {name}: "
                              f"{str(err).rstrip('.')}",
                              "set data.hf_split to one of the dataset's splits") from err
        # Not found locally or on the hub, the hub unreachable, or HF_DATASETS_OFFLINE=1
        # without a copy in the datasets cache.
        raise ConfigError("data.hf_dataset", f"cannot load {name!r} (config {d.hf_config}, "
                          f"split {d.hf_split}, data files {data_files}): "
                          f"{type(err).__name__}: {str(err).rstrip('.')}",
                          "give a local folder of .parquet/.txt/.json/.csv files, a builder "
                          "such as parquet with data.hf_data_files, or a hub dataset that is "
                          "reachable or already in the datasets cache (offline: "
                          "HF_DATASETS_OFFLINE=1)") from err
    if isinstance(hf, hf_datasets.DatasetDict | hf_datasets.IterableDatasetDict):
        raise ConfigError("data.hf_split", f"got {d.hf_split!r}", "name one split, e.g. train")
    if d.text_column not in (hf.column_names or []):
        raise ConfigError("data.text_column", f"{d.text_column!r} is not a column of {name} "
                          f"(columns: {hf.column_names})", "set data.text_column to one of them")
    # Not ray.data.from_huggingface: for a dataset that is not transformed it reloads it and
    # asks huggingface.co for Parquet URLs (a network call, even for local folders and with
    # HF_DATASETS_OFFLINE=1). The text column as Arrow is what from_huggingface falls back to.
    table = hf.select_columns([d.text_column]).with_format("arrow")[:]
    rows = 50_000  # several blocks for a large corpus, so tokenising streams
    return ray.data.from_arrow([table.slice(i, rows) for i in range(0, max(len(table), 1), rows)])


def _packaged_builders() -> set[str]:
    """Builder names ``load_dataset`` takes with data files: parquet, text, json, csv, ..."""
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

        return set(_PACKAGED_DATASETS_MODULES)
    except ImportError:  # a private name; these are the documented ones
        return {"csv", "json", "parquet", "text", "arrow", "pandas", "imagefolder"}


def _hf_location(name: str, data_files: list[str] | None,
                 builders: set[str]) -> tuple[str, list[str] | None]:
    """Absolute paths for a local dataset folder and local data files (read on the driver).

    Data files given with a builder name (``parquet``) are relative to the cwd; with a local
    folder, relative to that folder (as ``load_dataset`` reads them); with a hub dataset,
    relative to its repository, so those stay as they are.
    """
    folder = Path(name).expanduser()
    is_local = name not in builders and folder.exists()
    if is_local:
        name = str(folder.resolve())
    if data_files is None or not (is_local or name in builders):
        return name, data_files
    base = Path(name) if is_local else Path.cwd()
    files = [f if "://" in f else str((base / Path(f).expanduser()).absolute())
             for f in data_files]
    for f in files:
        if "://" not in f and not any(c in f for c in "*?[") and not Path(f).exists():
            raise ConfigError("data.hf_data_files", f"{f} does not exist",
                              f"check the path (relative to {base})")
    return name, files


def _file_to_document(row: dict[str, Any]) -> dict[str, str]:
    return {"text": row["bytes"].decode("utf-8", errors="replace")}


class _Packer:
    def __init__(self, tokenizer: str, block_size: int, column: str):
        from codebook.data.text import load_tokenizer

        self.tokenizer, self.block_size, self.column = load_tokenizer(tokenizer), block_size, column

    def __call__(self, batch):
        import pandas as pd

        from codebook.data.text import pack_batch

        blocks = pack_batch(batch[self.column].astype(str).tolist(), self.tokenizer,
                            self.block_size)
        return pd.DataFrame({"input_ids": list(blocks)})


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


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint under a run folder (``latest_intact_checkpoint``)."""
    return latest_intact_checkpoint(run_dir)[0]


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
        "checkpoint": str(ckpt),
        "model": str(ckpt / HF_DIR),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def init_ray() -> bool:
    """Join the cluster in RAY_ADDRESS (as under ``ray job submit``) or start a local one.

    Returns False when Ray was already initialised in this process (the caller then leaves it
    running), True when this call connected.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return True
    # A new local cluster for this process (RAY_ADDRESS=auto joins a running one). Its
    # dashboard address is pinned for the workers: Ray Train's PlacementGroupCleaner finds
    # the cluster through the state API and, with another Ray instance on the machine,
    # cannot tell which is ours.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    os.environ[_OWNED_API_ADDRESS] = "1"
    ray.init(address="local", dashboard_host="127.0.0.1", dashboard_port=port)
    return True


_OWNED_API_ADDRESS = "CODEBOOK_SET_RAY_API_SERVER_ADDRESS"


def shutdown_ray() -> None:
    """Stop this process's Ray and forget the API address ``init_ray`` pinned for it, so a
    later ``ray`` CLI call or cluster in this process does not talk to the dead dashboard."""
    import ray

    ray.shutdown()
    if os.environ.pop(_OWNED_API_ADDRESS, None):
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
