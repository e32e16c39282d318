"""MLflow helpers: one run per job, resumable, logged from the driver and rank 0."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def default_tracking_uri(explicit: str | None, folder: str | Path) -> str:
    """The MLflow store: ``explicit``, else ``$MLFLOW_TRACKING_URI``, else a sqlite file
    ``mlflow.db`` in ``folder`` (the run storage, the code store, the output folder)."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path(folder).resolve() / 'mlflow.db'}"


class MLflowLogger:
    """Logs metrics to an existing MLflow run by id (usable from any process, e.g. rank 0)."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # NaN and inf are logged as they are: a diverging run must be visible.
        batch = [Metric(_clean(k), float(v), now, step) for k, v in metrics.items()
                 if v is not None]
        for i in range(0, len(batch), 900):  # MLflow caps a batch at 1000 metrics
            self.client.log_batch(self.run_id, metrics=batch[i : i + 900])


def start_run(tracking_uri: str, experiment: str, run_name: str, params: dict[str, str],
              tags: dict[str, str], run_id: str | None = None) -> str:
    """Create (or, with ``run_id``, reopen) a run; returns its id. Params logged once."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "resumed", "true")
        return run_id
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    items = list(params.items())
    from mlflow.entities import Param

    for i in range(0, len(items), 90):
        client.log_batch(run.info.run_id,
                         params=[Param(k, v[:6000]) for k, v in items[i : i + 90]])
    return run.info.run_id


def log_artifacts(tracking_uri: str, run_id: str, path: Path, name: str) -> None:
    """Attach a folder or file to a run under ``name``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if Path(path).is_dir():
        client.log_artifacts(run_id, str(path), artifact_path=name)
    elif Path(path).is_file():
        client.log_artifact(run_id, str(path), artifact_path=name)


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED",
               artifacts: dict[str, Path] | None = None) -> None:
    """Attach artifact folders/files and close the run."""
    from mlflow.tracking import MlflowClient

    for name, path in (artifacts or {}).items():
        log_artifacts(tracking_uri, run_id, path, name)
    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


def _clean(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def get_run(tracking_uri: str, run_id: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri).get_run(run_id)
