"""Sweeps for real: Ray Tune trials that are Ray Train runs, ASHA, MLflow parent/children, resume.

One 4-trial FSM sweep runs as ``python tuning/sweep.py`` in a subprocess, is killed (SIGKILL to
its process group) once a trial has finished, and is completed with ``--resume``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from train_helpers import REPO

from codebook.errors import ConfigError
from codebook.training.config import load_config
from tuning.spec import load_spec
from tuning.sweep import main as sweep_main

pytestmark = pytest.mark.slow

SHIPPED = REPO / "configs" / "sweeps" / "fsm_k_codes.yaml"
MAX_STEPS = 16


def sweep_file(tmp_path: Path, name: str = "t", **changes) -> Path:
    """The shipped FSM sweep, shrunk: k x lr where lr 1e-6 is clearly worse (ASHA's prey)."""
    data = yaml.safe_load(SHIPPED.read_text())
    data["name"] = name
    data["overrides"] += [f"run.storage_path={tmp_path / 'runs'}",
                          f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                          f"run.max_steps={MAX_STEPS}", "deepspeed.enabled=false"]
    # Grid order: the first key varies fastest, so the two tiny-lr trials come last and meet
    # ASHA's rung at step 8 after two good trials have set the bar.
    # ASHA keeps the second trial at the step-8 rung only if it is no worse than the first:
    # 64 codes (eval loss 2.105 at step 8) come before 32 (lower), so both good trials go on.
    data["search"] = {"codebook.num_codes": {"grid": [64, 32]},
                      "optim.lr": {"grid": [1.0e-2, 1.0e-6]}}
    data["scheduler"] = {"asha": {"grace_period": 8, "reduction_factor": 2,
                                  "max_t": MAX_STEPS}}
    data.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def sweep_cmd(path: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "tuning" / "sweep.py"), "--config", str(path), *extra]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


def session_alive(sid: int) -> list[int]:
    """Processes of the driver's session: Ray workers get their own process group, not session."""
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    return [int(p) for p, s in (line.split() for line in out.splitlines()) if int(s) == sid]


def kill_session(sid: int) -> None:
    """SIGKILL the driver's process group; Ray's processes follow (they die with the raylet)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, signal.SIGKILL)
    deadline = time.time() + 30
    while session_alive(sid) and time.time() < deadline:
        time.sleep(0.5)
    for pid in session_alive(sid):  # stragglers of this test's own cluster only
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def children(client, parent_id: str) -> list:
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'")


def test_sweep_asha_mlflow_best_config_and_resume_after_kill(tmp_path):
    from mlflow.tracking import MlflowClient

    path = sweep_file(tmp_path)
    spec = load_spec(path)
    client = MlflowClient(spec.tracking_uri)
    log = tmp_path / "first.log"
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(sweep_cmd(path), cwd=REPO, env=clean_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    done_before_kill: list = []
    try:
        id_file = spec.sweep_dir / "mlflow_parent_run_id"
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if id_file.is_file():
                done_before_kill = [r for r in children(client, id_file.read_text().strip())
                                    if r.info.status == "FINISHED"]
                if done_before_kill:
                    break
            time.sleep(1)
        assert proc.poll() is None, f"the sweep ended on its own:\n{log.read_text()[-3000:]}"
        assert done_before_kill, f"no trial finished in time:\n{log.read_text()[-3000:]}"
    finally:
        kill_session(proc.pid)
        proc.wait()
    killed_at = time.perf_counter() - t0
    assert "best_config" not in log.read_text()

    # Never overwrite an existing sweep (fails before Ray starts, so run it in-process).
    with pytest.raises(SystemExit, match="already exists.*--resume"):
        sweep_main(["--config", str(path)])

    with open(tmp_path / "resumed.log", "w") as err:
        resumed = subprocess.Popen(sweep_cmd(path, "--resume"), cwd=REPO, env=clean_env(),
                                   stdout=subprocess.PIPE, stderr=err, text=True,
                                   start_new_session=True)
    try:
        stdout, _ = resumed.communicate(timeout=400)
    finally:
        kill_session(resumed.pid)
    total = time.perf_counter() - t0
    errors = (tmp_path / "resumed.log").read_text()[-3000:]
    assert resumed.returncode == 0, stdout[-2000:] + errors
    summary = json.loads(stdout.strip().splitlines()[-1])
    print(f"killed after {killed_at:.0f}s, finished after {total:.0f}s")

    # 4 trials; ASHA stopped at least one tiny-lr trial at its first rung.
    trials = summary["trials"]
    assert len(trials) == 4
    status = {t["trial_id"]: t["status"] for t in trials}
    stopped = [t for t in trials if t["status"] == "stopped_early"]
    assert stopped and all(t["params"]["optim.lr"] == 1.0e-6 for t in stopped)
    assert all(t["steps"] < MAX_STEPS for t in stopped)
    assert all(t["steps"] == MAX_STEPS for t in trials if t["status"] == "finished")
    assert summary["best_config"]["optim.lr"] == 1.0e-2
    assert summary["best_eval_loss"] == min(t["eval_loss"] for t in trials)

    # MLflow: one parent, one child per trial (none duplicated by the resume), with metrics.
    parent_id = summary["mlflow_parent_run_id"]
    kids = children(client, parent_id)
    assert len(kids) == 4
    assert {k.info.run_id for k in kids} == {t["mlflow_run_id"] for t in trials}
    for kid in kids:
        assert "eval/loss" in kid.data.metrics and "codebook.k" in kid.data.params
        assert kid.data.tags["checkpoint"]
        expected = "KILLED" if status[kid.data.tags["sweep.trial_id"]] == "stopped_early" \
            else "FINISHED"
        assert kid.info.status == expected
    # The trial that had finished before the kill was not rerun.
    first = client.get_run(done_before_kill[0].info.run_id)
    assert "resumed" not in first.data.tags and first.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(first.info.run_id, "eval/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == MAX_STEPS
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials"] == 4
    logged = {a.path for a in client.list_artifacts(parent_id, "summary")}
    assert logged == {"summary/summary.csv", "summary/summary.parquet"}
    assert len(client.list_artifacts(parent_id, "plots")) == 3
    assert client.list_artifacts(parent_id, "best_config")

    # The best config is a ready-to-run training config.
    best = load_config(summary["best_config_path"])
    assert best.codebook.num_codes == summary["best_config"]["codebook.num_codes"]
    assert best.optim.lr == summary["best_config"]["optim.lr"]
    assert best.run.max_steps == MAX_STEPS and best.run.name is None
    table = Path(summary["sweep_dir"]) / "summary.csv"
    assert len(table.read_text().strip().splitlines()) == 5


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"searchh": {}}, "searchh", "unknown key"),
        ({"search": {"codebook.k": {"normal": [1, 2]}}}, "search.codebook.k",
         "unknown distribution"),
        ({"search": {"codebook.k": {"grid": []}}}, "search.codebook.k.grid", "empty"),
        ({"search": {"optim.lr": {"loguniform": [0, 1.0e-2]}}}, "search.optim.lr.loguniform",
         "not positive"),
        ({"search": {"optim.lr": {"uniform": [1.0e-2, 1.0e-4]}}}, "search.optim.lr.uniform",
         "not below"),
        ({"search": {"optim.learning_rate": {"grid": [0.1]}}}, "search.optim.learning_rate",
         "unknown key"),
        ({"search": {"codebook.k": {"grid": [1, 5000]}}}, "search.codebook.k",
         "larger than num_codes"),
        ({"search": {"codebook.k": {"grid": [1, 48]},  # each value alone is fine, 48 > 32 not
                     "codebook.num_codes": {"choice": [64, 32]}}}, "search", "combination"),
        ({"search": {"run.name": {"grid": ["a"]}}}, "search.run.name", "set by the sweep"),
        ({"scheduler": {"hyperband": {}}}, "scheduler", "unknown scheduler"),
        ({"scheduler": {"asha": {"grace_period": 16}}}, "scheduler.asha.grace_period",
         "no rung"),
        ({"metric": "eval_los"}, "metric", "eval_loss"),
        ({"resources_per_trial": {"gpus": 1}}, "resources_per_trial.gpus", "unknown key"),
    ],
)
def test_malformed_sweep_is_rejected_before_any_trial(tmp_path, change, field, words):
    path = sweep_file(tmp_path, **change)
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    assert err.value.field == field and words in str(err.value), str(err.value)


def test_cli_reports_config_error_before_anything_starts(tmp_path):
    path = sweep_file(tmp_path, search={"codebook.k": {"grid": []}})
    with pytest.raises(SystemExit, match="config error: search.codebook.k.grid: empty list"):
        sweep_main(["--config", str(path)])
    assert not (tmp_path / "runs").exists()  # no sweep folder, no Ray, no MLflow


def test_shipped_sweeps_parse():
    spec = load_spec(SHIPPED)
    assert len(spec.search) == 2 and spec.scheduler.kind == "asha"
    assert spec.resources.cpus_per_worker < 0.5 and spec.resources.trial_cpu <= 0.01
    gpu = REPO / "configs" / "sweeps" / "pythia410m_k.yaml"
    if (REPO / "configs" / "pythia410m_wikitext.yaml").is_file():
        spec = load_spec(gpu)
        assert spec.search["codebook.k"].args == [8, 16, 64]
        assert spec.resources.use_gpu and spec.resources.num_workers == 8
    else:
        assert yaml.safe_load(gpu.read_text())["search"]
