"""What runs inside Ray Tune: the trial trainable, the ASHA variant and small Tune hooks.

A trial is the training job of ``pipelines/train.py``: ``codebook.ray_glue.train.fit`` builds a
``TorchTrainer`` with its own Ray Train workers and runs it. This is the composition current Ray
recommends (a ``TorchTrainer`` can no longer be passed to ``Tuner``): a function trainable runs
``TorchTrainer(...).fit()`` with ``TuneReportCallback`` in the inner ``RunConfig(callbacks=...)``,
which forwards every ``ray.train.report`` of the training loop (one per checkpoint) to Tune.

Everything here is imported by name from pickles (``tuner.pkl``), so it must stay importable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from codebook.checkpoint import HF_DIR, STATE_FILE
from codebook.training.metric_names import reported
from tuning.spec import trial_config


def run_name(sweep: str, trial_id: str) -> str:
    """The trial's run.name: its Ray Train run folder and MLflow child run name."""
    return f"{sweep}-{trial_id}"


def trial_dirname(trial: Any) -> str:
    """Tune trial folder (and trial name) = the trial id, so results map back to runs."""
    return trial.trial_id


def checkpoint_step(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / STATE_FILE).read_text()).get("step", 0))


def codebook_trial(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """One trial: ``fit`` of the trial's training config, reporting to Tune at each checkpoint.

    ``config`` holds the sampled values (``{"codebook.k": 2, ...}``); ``sweep`` the constants:
    ``name``, ``base_config`` (the sweep's frozen base config), ``parent_run_id``.
    A trial that Tune restarts after the driver died (``--resume``) continues its Ray Train run
    from the newest checkpoint in its run folder; one that had already finished only reports
    its final metrics again.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from codebook.checkpoint import latest_intact_checkpoint
    from codebook.ray_glue.train import MLFLOW_ID_FILE, fit

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(sweep["base_config"], dict(config), run_name(sweep["name"], trial_id))
    run_dir = cfg.run_dir
    previous = latest_intact_checkpoint(run_dir)[0] if run_dir.exists() else None
    if previous is not None and checkpoint_step(previous) >= cfg.run.max_steps:
        _report_finished(cfg, run_dir / MLFLOW_ID_FILE, previous)
        return
    if previous is None:
        _drop_unfinished_child(cfg, run_dir / MLFLOW_ID_FILE)
    print(f"trial {trial_id}: {'resuming ' + str(previous) if previous else 'starting'} "
          f"{json.dumps(config, default=str)}", flush=True)
    fit(cfg, resume=previous is not None, callbacks=[TuneReportCallback()],
        mlflow_parent_run_id=sweep["parent_run_id"])


def _report_finished(cfg, id_file: Path, checkpoint: Path) -> None:
    """The run reached max_steps before the sweep was interrupted: report, don't retrain."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from codebook.tracking import finish_run

    step = checkpoint_step(checkpoint)
    metrics: dict[str, Any] = {"step": step, "checkpoint_path": str(checkpoint)}
    if id_file.is_file():
        run_id = id_file.read_text().strip()
        run = MlflowClient(cfg.tracking_uri()).get_run(run_id)
        metrics.update(reported(run.data.metrics))
        if run.info.status != "FINISHED":  # killed between the last checkpoint and finish_run
            artifacts = {"model": checkpoint / HF_DIR} if cfg.mlflow.log_model else None
            finish_run(cfg.tracking_uri(), run_id, artifacts=artifacts)
    print(f"trial {cfg.run.name}: already finished at step {step}, not rerun", flush=True)
    tune.report(metrics)


def _drop_unfinished_child(cfg, id_file: Path) -> None:
    """A restarted trial that never checkpointed starts over: delete its first MLflow child."""
    if not id_file.is_file():
        return
    from mlflow.tracking import MlflowClient

    MlflowClient(cfg.tracking_uri()).delete_run(id_file.read_text().strip())
    id_file.unlink()


class FinishingASHA(AsyncHyperBandScheduler):
    """ASHA that never stops a trial at its last report, and keeps its rungs across --resume.

    Stopping at the final report (a rung at max_t, or max_t itself) would kill the trial while
    ``fit`` is closing its MLflow run and logging its model; at that point there is nothing
    left to save, so the trial is let finish by itself.

    Tune does not save scheduler state with the experiment (``Tuner.restore`` brings back the
    scheduler as it was built), so the rungs (trial id -> metric at each milestone) are written
    to ``state_file`` after every decision and read back on first use: a resumed sweep judges
    its remaining trials against the ones that ran before the interruption.
    """

    def __init__(self, max_steps: int, state_file: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._default_max_steps = max_steps
        self._state_file = state_file
        self._state_loaded = False

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load_rungs()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load_rungs()
        action = super().on_trial_result(tune_controller, trial, result)
        final = trial.config.get("run.max_steps", self._default_max_steps)
        if action == TrialScheduler.STOP and result.get("step", 0) >= final:
            self._num_stopped -= 1
            action = TrialScheduler.CONTINUE
        self._save_rungs()
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._load_rungs()
        super().on_trial_complete(tune_controller, trial, result)
        self._save_rungs()

    def _load_rungs(self) -> None:
        if self._state_loaded:
            return
        self._state_loaded = True
        if not self._state_file or not Path(self._state_file).is_file():
            return
        saved = json.loads(Path(self._state_file).read_text())
        for bracket, rungs in zip(self._brackets, saved, strict=False):
            for (milestone, recorded), (saved_milestone, saved_recorded) in zip(
                    bracket._rungs, rungs, strict=False):
                if milestone == saved_milestone:
                    for trial_id, value in saved_recorded.items():
                        recorded.setdefault(trial_id, value)

    def _save_rungs(self) -> None:
        if not self._state_file:
            return
        data = [[[m, r] for m, r in bracket._rungs] for bracket in self._brackets]
        path = Path(self._state_file)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)


class TrialEvents(Callback):
    """One plain line per finished trial on the driver's stdout (logs, tests)."""

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        last = trial.last_result or {}
        print(f"sweep: trial {trial.trial_id} complete at step {last.get('step')} "
              f"eval_loss {last.get('eval_loss')}", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        print(f"sweep: trial {trial.trial_id} errored", flush=True)
