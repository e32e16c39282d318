"""The training pipeline for real: Ray Train workers, DeepSpeed ZeRO, MLflow, checkpoints."""

from __future__ import annotations

import threading
import time

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from train_helpers import FSM_CONFIG, tiny_overrides

from codebook import CodebookModel
from codebook.errors import ConfigError
from codebook.ray_glue.train import fit
from codebook.training.config import load_config
from codebook.training.loop import STATE_FILE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    from codebook.ray_glue.session import init_local

    init_local(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def history(cfg, run_id: str, key: str) -> list[tuple[int, float]]:
    client = MlflowClient(cfg.tracking_uri())
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def runs_in(cfg) -> list:
    client = MlflowClient(cfg.tracking_uri())
    return client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])


def codebooks_on(cfg, run_id: str, start: int) -> None:
    """The run trained with its codebooks: k-means ran at ``start`` and every logged step from
    then on has a positive reconstruction loss (a plain transformer logs 0)."""
    assert [s for s, _ in history(cfg, run_id, "codebook/kmeans_init_s")] == [start]
    recon = history(cfg, run_id, "train/recon_loss")
    assert recon and all(v > 0 for s, v in recon if s > start)
    assert all(v == 0 for s, v in recon if s <= start)


def test_zero2_two_workers_learn_log_to_mlflow_and_save_hf_checkpoint(local_ray, tmp_path):
    cfg = load_config(FSM_CONFIG, tiny_overrides(
        tmp_path, "zero2", **{"deepspeed.zero_stage": 2, "run.num_workers": 2,
                              "run.max_steps": 12, "codebook.commit_weight": 0.25,
                              "codebook.start_step": 2, "codebook.kmeans_init_batches": 1,
                              "codebook.dead_code_steps": 3}))
    summary = fit(cfg)
    assert summary["steps"] == 12
    run_id = summary["mlflow_run_id"]
    loss = history(cfg, run_id, "train/loss")
    assert loss[0][0] == 1 and loss[-1][0] == 12
    assert loss[-1][1] < max(v for s, v in loss if s > 2)  # learns with the codebooks on
    codebooks_on(cfg, run_id, start=2)
    assert history(cfg, run_id, "eval/loss")
    assert history(cfg, run_id, "train/mlp_1/dead_code_fraction")
    replaced = history(cfg, run_id, "train/codebook/replaced_codes")
    assert sum(v for _, v in replaced) > 0  # dead-code replacement ran (every 3 steps)
    run = MlflowClient(cfg.tracking_uri()).get_run(summary["mlflow_run_id"])
    assert run.data.params["deepspeed.zero_stage"] == "2" and run.info.status == "FINISHED"
    assert run.data.tags["ray_job_id"]
    model = CodebookModel.from_pretrained(summary["model"]).eval()
    assert model.codebook_config == cfg.codebook
    ids = torch.randint(0, 11, (2, 25))
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_zero3_checkpoint_saves_and_resumes(local_ray, tmp_path):
    over = {"deepspeed.zero_stage": 3, "run.num_workers": 2, "run.checkpoint_every": 4,
            "codebook.start_step": 2, "codebook.kmeans_init_batches": 1,
            "codebook.dead_code_steps": 3, "codebook.k": 3, "codebook.k_min": 1,
            "codebook.combine": "mean",
            "codebook.k_schedule_steps": 6,
            # lr independent of max_steps, so 4 steps + 4 resumed is the same run as 8 steps
            "optim.schedule": "constant"}
    first = fit(load_config(FSM_CONFIG, tiny_overrides(tmp_path, "zero3", **over,
                                                       **{"run.max_steps": 4})))
    saved = CodebookModel.from_pretrained(first["model"])
    assert sum(p.numel() for p in saved.parameters()) > 0
    cfg = load_config(FSM_CONFIG, tiny_overrides(tmp_path, "zero3", **over,
                                                 **{"run.max_steps": 8}))
    with pytest.raises(ConfigError, match="--resume"):
        fit(cfg)  # never silently overwrite a finished run
    second = fit(cfg, resume=True)
    assert second["steps"] == 8 and second["mlflow_run_id"] == first["mlflow_run_id"]
    steps = [s for s, _ in history(cfg, second["mlflow_run_id"], "train/loss")]
    assert steps == [1, 2, 4, 6, 8]  # the resumed part continues at step 5, logging 6 and 8
    assert len(runs_in(cfg)) == 1
    codebooks_on(cfg, second["mlflow_run_id"], start=2)
    # The resumed run restored the codebook state (codes, steps_unused, the k schedule's step):
    # it ends exactly where an uninterrupted run of 8 steps ends.
    straight = fit(load_config(FSM_CONFIG, tiny_overrides(tmp_path, "zero3-straight", **over,
                                                          **{"run.max_steps": 8})))
    resumed = codebook_state(second["model"])
    uninterrupted = codebook_state(straight["model"])
    assert resumed["k"] == uninterrupted["k"] == {1}
    assert saved.k_in_force == 2  # step 4 of the schedule 3 -> 1 over 6 steps
    for key, value in uninterrupted["tensors"].items():
        torch.testing.assert_close(resumed["tensors"][key], value, rtol=1e-4, atol=1e-5)
    assert any(k.endswith("steps_unused") for k in uninterrupted["tensors"])


def codebook_state(model_dir: str) -> dict:
    from safetensors.torch import load_file

    model = CodebookModel.from_pretrained(model_dir)
    return {"k": {layer.k for layer in model.codebooks.values()},
            "tensors": load_file(f"{model_dir}/codebooks.safetensors")}


def test_bad_input_fails_before_workers_start(local_ray, tmp_path):
    too_many = load_config(FSM_CONFIG, tiny_overrides(tmp_path, "big", **{"run.num_workers": 64}))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="cluster has"):
        fit(too_many)
    assert time.perf_counter() - t0 < 10
    with pytest.raises(ConfigError, match="no intact checkpoint"):
        fit(load_config(FSM_CONFIG, tiny_overrides(tmp_path, "fresh")), resume=True)


def test_worker_config_error_reaches_the_driver_as_itself(local_ray, tmp_path):
    """A ConfigError raised inside a Ray Train worker comes back as the same error (it
    survives pickling) and is not retried."""
    cfg = load_config(FSM_CONFIG, tiny_overrides(
        tmp_path, "badmodel", **{"model.from_config.model_type": "null", "run.max_failures": 3}))
    with pytest.raises(ConfigError, match="model.from_config.model_type: missing"):
        fit(cfg)


def test_divergence_stops_the_job_at_once_with_the_last_good_checkpoint(local_ray, tmp_path):
    from codebook.errors import TrainingDiverged

    cfg = load_config(FSM_CONFIG, tiny_overrides(
        tmp_path, "diverged", **{"codebook.start_step": 0, "run.max_steps": 40,
                                 "run.log_every": 1, "run.checkpoint_every": 1,
                                 "run.max_nonfinite_steps": 3, "optim.lr": 1e30,
                                 "run.max_failures": 2}))
    with pytest.raises(TrainingDiverged) as info:
        fit(cfg)
    assert info.value.last_good_checkpoint.startswith(str(cfg.run_dir))  # step 1's folder
    run = runs_in(cfg)[0]
    losses = history(cfg, run.info.run_id, "train/loss")
    steps = [s for s, _ in losses]
    assert steps == [1, 2, 3, 4]  # one attempt: a retry would log steps 1.. again
    assert all(v != v for _, v in losses[1:])  # NaN logged as it is
    assert run.info.status == "FAILED"


def test_losing_a_worker_node_restores_from_the_last_checkpoint(tmp_path):
    from ray.cluster_utils import Cluster

    ray.shutdown()  # leave the module's single-node Ray for a two-node cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        doomed = cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address)
        cfg = load_config(FSM_CONFIG, tiny_overrides(
            tmp_path, "ft", **{"run.max_steps": 600, "run.checkpoint_every": 20,
                               "run.log_every": 10, "run.eval_every": 100,
                               "run.cpus_per_worker": 1, "run.max_failures": 3,
                               "deepspeed.enabled": False, "codebook.start_step": 10,
                               "codebook.kmeans_init_batches": 2,
                               "codebook.dead_code_steps": 25}))
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(fit(cfg)))
        thread.start()
        run_dir = cfg.run_dir
        snapshot = run_dir / "checkpoint_manager_snapshot.json"

        def registered() -> bool:  # Ray Train knows a checkpoint (not just its files exist)
            try:
                return '"checkpoint_dir_name"' in snapshot.read_text()
            except OSError:
                return False

        deadline = time.time() + 240
        while not registered() and time.time() < deadline:
            time.sleep(0.5)
        assert list(run_dir.glob(f"*/{STATE_FILE}")) and registered(), "no checkpoint was written"
        cluster.add_node(num_cpus=1)
        cluster.remove_node(doomed)
        thread.join(timeout=400)
        assert result.get("steps") == 600
        steps = [s for s, _ in history(cfg, result["mlflow_run_id"], "train/loss")]
        resumed = [v for _, v in history(cfg, result["mlflow_run_id"],
                                         "train/resumed_from_step")]
        assert resumed, "the run never restarted"
        assert min(resumed) >= 20  # restored from a checkpoint, not from step 0
        assert steps[-1] == 600
        assert len(runs_in(cfg)) == 1
        # the codebooks were on, and the restart did not re-run k-means (state restored)
        assert {s for s, _ in history(cfg, result["mlflow_run_id"],
                                      "codebook/kmeans_init_s")} == {10}
        recon = history(cfg, result["mlflow_run_id"], "train/recon_loss")
        assert all(v > 0 for s, v in recon if s > 10)
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_killed_driver_resumes_to_the_same_final_step_count(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys

    from train_helpers import REPO

    name = "killed"
    sets = tiny_overrides(tmp_path, name, **{"run.max_steps": 400, "run.checkpoint_every": 20,
                                             "run.eval_every": 100, "run.log_every": 20,
                                             "deepspeed.enabled": False,
                                             "codebook.start_step": 10,
                                             "codebook.kmeans_init_batches": 2,
                                             "codebook.dead_code_steps": 25})
    args = [sys.executable, "pipelines/train.py", "--config", str(FSM_CONFIG)]
    for item in sets:
        args += ["--set", item]
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - closed below
    first = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    run_dir = tmp_path / name
    deadline = time.time() + 240
    while not list(run_dir.glob(f"*/{STATE_FILE}")) and time.time() < deadline:
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
    first.wait()
    log.close()
    assert list(run_dir.glob(f"*/{STATE_FILE}")), (tmp_path / "first.log").read_text()[-3000:]
    done = subprocess.run(args + ["--resume"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0 and "EADDRINUSE" in done.stdout + done.stderr:
        # Ray Train picks the process group's port, closes it and binds it again later; another
        # test on the other xdist worker can take it in between. That race is the machine's, not
        # the resume's: resume once more (the checkpoint is untouched by a failed start).
        done = subprocess.run(args + ["--resume"], cwd=REPO, capture_output=True, text=True,
                              timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # each progress line of the resumed job reaches the driver's output once (Ray Train's
    # print patch used to send a worker's prints to both its stdout and its stderr)
    import re

    progress = re.findall(r"step (\d+)/400 loss", done.stdout + done.stderr)
    assert progress and len(progress) == len(set(progress)), progress
    assert progress[-1] == "400"
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 400
    assert summary["mlflow_run_id"] == (run_dir / "mlflow_run_id").read_text().strip()
    cfg = load_config(FSM_CONFIG, sets)
    assert len(runs_in(cfg)) == 1
    steps = [s for s, _ in history(cfg, summary["mlflow_run_id"], "train/loss")]
    assert steps[-1] == 400 and steps[0] == 1
    codebooks_on(cfg, summary["mlflow_run_id"], start=10)
