"""Damaged inputs get clear errors, and resume falls back past a damaged checkpoint.

Every case damages real files: saved models and training checkpoints written by the real code,
then truncated, cut short or deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import tiny_model
from corpus_helpers import save_tiny_codebook_model
from train_helpers import FSM_CONFIG, REPO, tiny_overrides

from codebook import CodebookModel
from codebook.checkpoint import (
    choose_resume,
    latest_intact_checkpoint,
    looks_local,
    skipped_message,
    verify_checkpoint,
    verify_model_dir,
)
from codebook.errors import ConfigError
from codebook.resolve import resolve_model
from codebook.training.config import load_config


def truncate(file: Path, keep: float | int = 0.5) -> None:
    """Cut ``file`` to a fraction of its size (float) or to a number of bytes (int)."""
    size = file.stat().st_size
    os.truncate(file, int(size * keep) if isinstance(keep, float) else keep)
    assert file.stat().st_size < size


def cut_json(file: Path) -> None:
    text = file.read_text()
    file.write_text(text[: len(text) // 2])


def delete(file: Path) -> None:
    file.unlink()


@pytest.fixture(scope="module")
def pristine_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "cb"
    save_tiny_codebook_model(folder, vocab_size=40, num_codes=16)
    return folder


@pytest.fixture
def saved_model(pristine_model, tmp_path) -> Path:
    """A fresh copy of a tiny saved codebook model, to damage."""
    return Path(shutil.copytree(pristine_model, tmp_path / "cb"))


@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory) -> Path:
    """A run folder with two real checkpoints (steps 2 and 4) of the plain PyTorch engine,
    written by the training loop without Ray."""
    from codebook.training.local import train_local

    storage = tmp_path_factory.mktemp("runs")
    cfg = load_config(FSM_CONFIG, tiny_overrides(storage, "plain", **{
        "run.max_steps": 4, "run.checkpoint_every": 2, "deepspeed.enabled": False}))
    train_local(cfg, device="cpu")
    return cfg.run_dir


@pytest.fixture
def run_dir(pristine_run, tmp_path) -> Path:
    """A fresh copy of the two-checkpoint run, to damage."""
    run = Path(shutil.copytree(pristine_run, tmp_path / "run"))
    assert [d.name for d in sorted(run.glob("checkpoint_*"))] == [
        "checkpoint_00000002", "checkpoint_00000004"]
    return run


# ---------------------------------------------------------------------- models
def test_a_missing_model_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match="no-such-model does not exist") as err:
        CodebookModel.from_pretrained(str(missing))
    assert err.value.field == "name_or_path" and "check the path" in err.value.fix
    with pytest.raises(ConfigError, match="no-such-model does not exist") as err:
        resolve_model(str(missing), tmp_path / "dl")
    assert err.value.field == "--model"
    # Names that can be Hub ids stay Hub ids; only paths count as local.
    assert not looks_local("EleutherAI/pythia-70m") and not looks_local("gpt2")
    assert looks_local("./model") and looks_local("runs/x/checkpoint_1") and looks_local("/m")


MODEL_DAMAGE: list[tuple[str, Callable[[Path], None], str]] = [
    ("codebooks.safetensors", truncate, "codebooks.safetensors is truncated"),
    ("codebooks.safetensors", lambda f: truncate(f, 20), "codebooks.safetensors is truncated"),
    ("codebooks.safetensors", delete, "codebooks.safetensors is missing"),
    ("model.safetensors", truncate, "model.safetensors is truncated"),
    ("codebook_config.json", cut_json, "codebook_config.json is cut short"),
    ("config.json", cut_json, "config.json is cut short"),
]


@pytest.mark.parametrize(("name", "damage", "message"), MODEL_DAMAGE,
                         ids=["codebooks-data", "codebooks-header", "codebooks-deleted",
                              "model-data", "codebook-config", "hf-config"])
def test_a_damaged_saved_model_names_the_file(saved_model, tmp_path, name, damage, message):
    CodebookModel.from_pretrained(saved_model)  # intact: loads
    damage(saved_model / name)
    with pytest.raises(ConfigError, match=message) as err:
        CodebookModel.from_pretrained(saved_model)
    assert str(saved_model / name) in str(err.value) and err.value.fix
    with pytest.raises(ConfigError, match=message) as err:
        resolve_model(str(saved_model), tmp_path / "dl")  # what extract.py / steer.py call
    assert err.value.field == "--model"


def test_a_checkpoint_with_a_cut_short_trainer_state_names_it_and_the_intact_one(run_dir,
                                                                                   tmp_path):
    newest, older = run_dir / "checkpoint_00000004", run_dir / "checkpoint_00000002"
    assert resolve_model(str(newest), tmp_path / "dl") == str((newest / "hf").resolve())
    cut_json(newest / "trainer_state.json")
    with pytest.raises(ConfigError, match="trainer_state.json is cut short") as err:
        resolve_model(str(newest), tmp_path / "dl")
    assert f"the newest intact checkpoint in this run is {older}" in err.value.fix
    with pytest.raises(ConfigError, match="holds no codebook_config.json") as err:
        verify_model_dir(run_dir)  # a run folder is not a model: name the checkpoint to use
    assert str(older) in err.value.fix


# ---------------------------------------------------------------------- checkpoints
CHECKPOINT_DAMAGE: list[tuple[str, Callable[[Path], None], str]] = [
    ("engine_optim.pt", delete, "engine_optim.pt is missing"),
    ("engine_optim.pt", truncate, "engine_optim.pt is truncated"),
    ("engine_model.safetensors", truncate, "engine_model.safetensors is truncated"),
    ("hf/model.safetensors", truncate, "hf/model.safetensors is truncated"),
    ("hf/codebooks.safetensors", truncate, "hf/codebooks.safetensors is truncated"),
    ("trainer_state.json", cut_json, "trainer_state.json is cut short"),
    ("trainer_state.json", delete, "trainer_state.json is missing"),
]


@pytest.mark.parametrize(("name", "damage", "reason"), CHECKPOINT_DAMAGE,
                         ids=["optim-deleted", "optim-truncated", "engine-model-truncated",
                              "hf-model-truncated", "codebooks-truncated", "state-cut",
                              "state-deleted"])
def test_resume_falls_back_past_a_damaged_latest_checkpoint(run_dir, name, damage, reason):
    newest, older = run_dir / "checkpoint_00000004", run_dir / "checkpoint_00000002"
    assert verify_checkpoint(newest) is None and latest_intact_checkpoint(run_dir)[0] == newest
    damage(newest / name)
    assert verify_checkpoint(newest).startswith(reason)
    picked, damaged = latest_intact_checkpoint(run_dir)  # what fit and the sweeps call
    assert picked == older and len(damaged) == 1
    assert damaged[0][0] == newest and damaged[0][1].startswith(reason)
    line = skipped_message(newest, damaged[0][1], older)
    assert str(newest) in line and reason in line and f"{older} (step 2)" in line
    # The worker: Ray Train's own pick (the newest) is damaged, the driver's is intact.
    assert choose_resume([str(newest), str(older)])[0] == older


def test_a_ray_snapshot_naming_a_gone_checkpoint_is_set_aside(tmp_path, capsys):
    """Ray Train's checkpoint_manager_snapshot.json lists the run's checkpoints; if one is gone,
    Ray's controller dies before any worker starts, so fit sets the list aside (and resumes from
    the newest intact checkpoint itself). A list whose checkpoints all exist is kept."""
    from codebook.ray_glue.train import RAY_SNAPSHOT_FILE, set_aside_stale_snapshot

    (tmp_path / "checkpoint_a").mkdir()
    snapshot = tmp_path / RAY_SNAPSHOT_FILE
    entry = {"checkpoint_dir_name": "checkpoint_a", "metrics": {"step": 6}}
    snapshot.write_text(json.dumps({"checkpoint_results": [entry], "latest_checkpoint_result":
                                    entry}))
    assert set_aside_stale_snapshot(tmp_path) is None and snapshot.is_file()
    gone = {"checkpoint_dir_name": "checkpoint_b", "metrics": {"step": 12}}
    snapshot.write_text(json.dumps({"checkpoint_results": [entry, gone],
                                    "latest_checkpoint_result": gone}))
    aside = set_aside_stale_snapshot(tmp_path)
    assert aside == tmp_path / f"{RAY_SNAPSHOT_FILE}.stale" and aside.is_file()
    assert not snapshot.exists() and "checkpoint_b" in capsys.readouterr().out
    snapshot.write_text("{not json")
    assert set_aside_stale_snapshot(tmp_path) is not None and not snapshot.exists()
    assert set_aside_stale_snapshot(tmp_path) is None  # nothing there


def test_no_intact_checkpoint_left_is_reported_not_guessed(run_dir):
    for ckpt in run_dir.glob("checkpoint_*"):
        truncate(ckpt / "engine_optim.pt")
    picked, damaged = latest_intact_checkpoint(run_dir)
    assert picked is None and len(damaged) == 2
    assert "no intact checkpoint" in skipped_message(*damaged[0], None)


@pytest.mark.slow
def test_a_truncated_deepspeed_checkpoint_is_skipped(tmp_path):
    """DeepSpeed writes its own files (``deepspeed/*.pt``); trained in a child process, as
    DeepSpeed sets up a process group."""
    sets = tiny_overrides(tmp_path, "ds", **{"run.max_steps": 4, "run.checkpoint_every": 2,
                                              "deepspeed.enabled": True})
    code = ("import sys; from codebook.training.config import load_config; "
            "from codebook.training.local import train_local; "
            "train_local(load_config(sys.argv[1], sys.argv[2:]), device='cpu')")
    # a fresh process group: not the port of one this pytest worker may hold (another test's)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                        "LOCAL_WORLD_SIZE")}
    done = subprocess.run([sys.executable, "-c", code, str(FSM_CONFIG), *sets], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "ds"
    newest, older = run / "checkpoint_00000004", run / "checkpoint_00000002"
    states = newest / "deepspeed" / "mp_rank_00_model_states.pt"
    assert verify_checkpoint(newest) is None and verify_checkpoint(older) is None
    truncate(states)
    assert verify_checkpoint(newest).startswith(
        "deepspeed/mp_rank_00_model_states.pt is truncated")
    assert latest_intact_checkpoint(run)[0] == older
    states.unlink()
    assert verify_checkpoint(newest).startswith("deepspeed/ holds no")


# ---------------------------------------------------------------------- entry points
def run_script(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    return done, time.perf_counter() - started


@pytest.mark.parametrize("case", ["missing", "truncated"])
def test_extract_names_the_damaged_model_before_ray_starts(saved_model, tmp_path, case):
    if case == "missing":
        model, expected = tmp_path / "no-such-checkpoint", "no-such-checkpoint does not exist"
    else:
        truncate(saved_model / "codebooks.safetensors")
        model, expected = saved_model, "codebooks.safetensors is truncated"
    done, seconds = run_script(["pipelines/extract.py", "--model", str(model), "--out",
                                str(tmp_path / "store"), "--source", "fsm", "--fsm-file",
                                str(tmp_path / "fsm.json")])
    assert done.returncode != 0
    assert f"config error: --model: {tmp_path}" in done.stderr and expected in done.stderr
    assert "Traceback" not in done.stderr
    assert "Ray" not in done.stdout + done.stderr and not (tmp_path / "store").exists()
    assert seconds < 20  # interpreter and imports only: no Ray cluster, no model load


def test_train_names_a_damaged_base_model_before_ray_starts(tmp_path):
    base = tmp_path / "base"
    tiny_model("gpt_neox").save_pretrained(base)
    truncate(base / "model.safetensors")
    sets = tiny_overrides(tmp_path, "t", **{"model.from_config": "null",
                                             "model.name_or_path": str(base)})
    done, seconds = run_script(["pipelines/train.py", "--config", str(FSM_CONFIG),
                                *[a for s in sets for a in ("--set", s)]])
    assert done.returncode != 0
    assert (f"config error: model.name_or_path: {base / 'model.safetensors'} is truncated"
            in done.stderr), done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Ray" not in done.stdout + done.stderr
    assert seconds < 20


def test_steer_and_browse_name_the_damaged_model(saved_model, tmp_path):
    from pipelines import browse, steer

    cut_json(saved_model / "codebook_config.json")
    topics = tmp_path / "topics.yaml"
    topics.write_text("prompts: [the]\nbackground_texts: [some text]\n"
                      "topics: [{name: king, regex: king, topic_texts: [the king]}]\n")
    expected = f"config error: --model: {saved_model / 'codebook_config.json'} is cut short"
    with pytest.raises(SystemExit, match=expected):
        steer.main(["--model", str(saved_model), "--topics", str(topics),
                    "--out", str(tmp_path / "steer")])
    with pytest.raises(SystemExit, match=expected):  # checked before the store is opened
        browse.main(["--store", str(tmp_path / "store"), "--model", str(saved_model)])


# ---------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_train_resume_continues_from_the_newest_intact_checkpoint(tmp_path, capsys):
    """Ray Train restores its own latest checkpoint on a resume of the same run; when that one
    is truncated, the driver and the workers must both fall back to the older intact one."""
    import ray
    from mlflow.tracking import MlflowClient

    from codebook.ray_glue.train import fit

    over = {"run.checkpoint_every": 2, "run.eval_every": 2, "run.log_every": 2,
            "deepspeed.enabled": False}
    from codebook.ray_glue.session import init_local

    init_local(num_cpus=2, include_dashboard=False)
    try:
        first = fit(load_config(FSM_CONFIG, tiny_overrides(tmp_path, "r", **over,
                                                           **{"run.max_steps": 4})))
        newest = Path(first["checkpoint"])
        assert json.loads((newest / "trainer_state.json").read_text())["step"] == 4
        truncate(newest / "engine_optim.pt")
        capsys.readouterr()
        cfg = load_config(FSM_CONFIG, tiny_overrides(tmp_path, "r", **over,
                                                     **{"run.max_steps": 6}))
        second = fit(cfg, resume=True)
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    assert f"checkpoint {newest} is damaged (engine_optim.pt is truncated" in out
    assert "(step 2) instead" in out
    assert second["steps"] == 6 and second["mlflow_run_id"] == first["mlflow_run_id"]
    history = MlflowClient(cfg.tracking_uri()).get_metric_history(second["mlflow_run_id"],
                                                                  "train/loss")
    steps = [m.step for m in sorted(history, key=lambda m: m.timestamp)]
    assert steps == [1, 2, 4, 4, 6]  # resumed after step 2: step 4 trained (and logged) again
    assert verify_checkpoint(second["checkpoint"]) is None
