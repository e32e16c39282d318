"""The README's cluster path for real: `ray start --head`, `ray job submit`, tear-down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import REPO, tiny_overrides

pytestmark = pytest.mark.slow


def test_ray_job_submit_to_a_local_head_runs_the_training_job(tmp_path):
    env = {k: v for k, v in os.environ.items()  # nothing of an in-process Ray of this session
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(DASHBOARD_PORT="8365", RAY_PORT="6479", NUM_CPUS="2", START_TIMEOUT="150",
               SUBMISSION_ID=f"codebook-test-{os.getpid()}")
    script = str(REPO / "cluster" / "local_head.sh")
    try:
        subprocess.run(["bash", script, "start"], env=env, check=True, timeout=200)
        sets = tiny_overrides(tmp_path, "submitted", **{"run.max_steps": 6,
                                                        "codebook.start_step": 2,
                                                        "codebook.kmeans_init_batches": 1})
        args = ["--config", "configs/fsm.yaml", "--max-steps", "6"]
        for item in sets:
            args += ["--set", item]
        done = subprocess.run(["bash", script, "submit", *args], env=env, timeout=600,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        summary = json.loads([line for line in done.stdout.splitlines()
                              if line.startswith('{"mlflow_run_id"')][-1])
        assert summary["steps"] == 6
        from mlflow.tracking import MlflowClient  # the job trained with its codebooks on

        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        recon = client.get_metric_history(summary["mlflow_run_id"], "train/recon_loss")
        assert [m.value > 0 for m in recon if m.step > 2] == [True, True]  # steps 4 and 6
        assert client.get_metric_history(summary["mlflow_run_id"], "codebook/kmeans_init_s")
        assert (tmp_path / "submitted").is_dir()
        ray_cli = str(Path(sys.executable).parent / "ray")
        status = subprocess.run([ray_cli, "job", "status", "--address", "http://127.0.0.1:8365",
                                 env["SUBMISSION_ID"]], env=env, capture_output=True, text=True,
                                timeout=60)
        assert "succeeded" in (status.stdout + status.stderr).lower()
    finally:
        subprocess.run(["bash", script, "stop"], env=env, timeout=120)
