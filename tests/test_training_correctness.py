"""Training correctness without Ray: precision, activation checkpointing, the k schedule on load,
divergence, error pickling, and DDP with two real ranks."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from train_helpers import FSM_CONFIG, tiny_overrides

from codebook import CodebookConfig, CodebookLayer, CodebookModel
from codebook.errors import ConfigError, TrainingDiverged
from codebook.training.config import load_config
from codebook.training.engine import make_engine
from codebook.training.local import train_local
from codebook.training.loop import build_model


def tiny_cfg(tmp_path, name="t", **extra):
    return load_config(FSM_CONFIG, tiny_overrides(tmp_path, name, **extra))


# ---------------------------------------------------------------------- bf16
def test_bf16_cast_keeps_statistics_fp32_and_counts_past_256():
    layer = CodebookLayer(dim=8, num_codes=4, k=1).train().to(torch.bfloat16)
    assert layer.codes.dtype == torch.bfloat16
    assert layer.code_counts.dtype == torch.float32 and layer.stat_sums.dtype == torch.float32
    x = torch.randn(300, 8, dtype=torch.bfloat16)
    for _ in range(3):
        layer(x)
    # 900 tokens fired: in bf16 the counts would stop at 256 per code
    assert layer.code_counts.sum().item() == 900
    assert layer.stat_sums[3].item() == 900


def test_bf16_is_resolved_one_way_for_the_engine_and_the_benchmark_label():
    """deepspeed.bf16 None means bf16 on a GPU under DeepSpeed (the engine's mode) and the
    train-step benchmark labels a run by the same rule: the first H200 suite's bf16 steps were
    labelled fp32 when the label read the raw None."""
    from codebook.training.config import DeepSpeedSection

    assert DeepSpeedSection().uses_bf16("cuda") and not DeepSpeedSection().uses_bf16("cpu")
    assert not DeepSpeedSection(bf16=False).uses_bf16("cuda")
    assert DeepSpeedSection(bf16=True).uses_bf16("cpu")  # asked for: DeepSpeed's bf16 on CPU
    assert DeepSpeedSection(enabled=False, bf16=True).uses_bf16("cuda")  # autocast
    assert not DeepSpeedSection(enabled=False, bf16=True).uses_bf16("cpu")
    assert not DeepSpeedSection(enabled=False).uses_bf16("cuda")


def test_bf16_scoring_matches_fp32_scoring_of_the_same_values():
    torch.manual_seed(0)
    layer = CodebookLayer(dim=64, num_codes=512, k=4, score="euclidean")
    # activations far from the origin: 2x.c - |c|^2 cancels badly when computed in bf16
    with torch.no_grad():
        layer.codes.add_(20.0)
    x = (torch.randn(256, 64) + 20.0).to(torch.bfloat16)
    reference = layer.select(x.float().reshape(-1, 1, 64))  # fp32 module, same bf16 values
    layer.to(torch.bfloat16)
    chosen = layer.select(x.reshape(-1, 1, 64))
    codes32 = layer.codes.float()  # the bf16-rounded codes, scored exactly
    exact = layer.__class__(dim=64, num_codes=512, k=4, score="euclidean")
    with torch.no_grad():
        exact.codes.copy_(codes32)
    assert torch.equal(chosen, exact.select(x.float().reshape(-1, 1, 64)))
    assert reference.shape == chosen.shape


def test_deepspeed_bf16_engine_keeps_statistics_fp32(tmp_path):
    from codebook.training.local import single_process_group_env

    single_process_group_env()
    cfg = tiny_cfg(tmp_path, **{"deepspeed.bf16": True, "codebook.start_step": 0})
    model = build_model(cfg)
    engine = make_engine(model, cfg, torch.device("cpu"))
    layer = next(iter(engine.module.codebooks.values()))
    assert layer.codes.dtype == torch.bfloat16  # DeepSpeed did cast the module
    assert layer.code_counts.dtype == torch.float32 and layer.recent.dtype == torch.float32
    ids = torch.randint(0, 11, (8, 24))
    for _ in range(2):
        out = engine(input_ids=ids, labels=ids)
        engine.backward(out.loss)
        engine.step()
    assert torch.isfinite(out.loss)
    assert layer.code_counts.dtype == torch.float32
    assert layer.code_counts.sum().item() == 2 * 8 * 24 * layer.groups * layer.k


def test_kmeans_runs_in_fp32_for_bf16_codes():
    torch.manual_seed(0)
    layer = CodebookLayer(dim=4, num_codes=2, k=1, score="euclidean").to(torch.bfloat16)
    centre = torch.tensor([300.0, 300.0, 300.0, 300.0])
    samples = torch.cat([centre + 0.25 * torch.randn(50, 4), -centre + 0.25 * torch.randn(50, 4)])
    layer.kmeans_init_(samples, iters=5, generator=torch.Generator().manual_seed(0))
    found = sorted(layer.codes.float()[0, :, 0].tolist())
    # bf16 has a resolution of 2 at 300: an fp32 fit lands within one bf16 step of +-300
    assert found[0] == pytest.approx(-300, abs=2.1) and found[1] == pytest.approx(300, abs=2.1)


# ---------------------------------------------------------------------- gradient checkpointing
def _one_step(checkpointing: bool, tmp_path):
    cfg = tiny_cfg(tmp_path, **{"codebook.start_step": 0,
                                "model.gradient_checkpointing": checkpointing})
    model = build_model(cfg).train()
    ids = torch.randint(0, 11, (4, 24), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    recon_only = out.recon_loss  # the codes' reconstruction gradient alone
    grads = torch.autograd.grad(recon_only, model.codebook_parameters(), retain_graph=True,
                                allow_unused=True)
    out.loss.backward()
    counts = {n: layer.code_counts.clone() for n, layer in model.codebooks.items()}
    return grads, counts, model.model.is_gradient_checkpointing


def test_gradient_checkpointing_keeps_codebook_gradients_and_counts_once(tmp_path):
    plain_grads, plain_counts, on = _one_step(False, tmp_path)
    assert not on
    ckpt_grads, ckpt_counts, on = _one_step(True, tmp_path)
    assert on
    for g_plain, g_ckpt in zip(plain_grads, ckpt_grads, strict=True):
        assert g_ckpt is not None and g_ckpt.abs().sum() > 0
        torch.testing.assert_close(g_ckpt, g_plain)
    for name, counts in plain_counts.items():
        torch.testing.assert_close(ckpt_counts[name], counts)  # the recompute counted nothing


# ---------------------------------------------------------------------- k schedule on load
def test_k_in_force_is_saved_and_restored(tmp_path):
    from conftest import tiny_model

    cfg = CodebookConfig(sites=["mlp"], num_codes=16, k=8, k_min=2, k_schedule_steps=10)
    model = CodebookModel(tiny_model("gpt_neox"), cfg)
    model.set_step(10)
    assert model.k_in_force == 2
    model.save_pretrained(tmp_path / "m")
    loaded = CodebookModel.from_pretrained(tmp_path / "m")
    assert {layer.k for layer in loaded.codebooks.values()} == {2}


# ---------------------------------------------------------------------- divergence
def test_errors_survive_pickling():
    err = pickle.loads(pickle.dumps(ConfigError("model.tokenizer", "missing", "set it")))
    assert isinstance(err, ConfigError) and str(err) == "model.tokenizer: missing. Fix: set it"
    div = pickle.loads(pickle.dumps(TrainingDiverged(7, 3, "/runs/x/checkpoint_4")))
    assert isinstance(div, TrainingDiverged) and "/runs/x/checkpoint_4" in str(div)


def test_divergence_is_logged_and_stops_naming_the_last_good_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path, "div", **{"codebook.start_step": 0, "run.max_steps": 40,
                                        "run.log_every": 1, "run.checkpoint_every": 1,
                                        "run.max_nonfinite_steps": 3, "optim.lr": 1e30,
                                        "deepspeed.enabled": False})
    with pytest.raises(TrainingDiverged, match="step 1") as info:
        train_local(cfg)
    assert info.value.nonfinite_steps == 3 and info.value.step == 4
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert math.isfinite(losses[0]) and all(math.isnan(v) for v in losses[1:])
    assert [r["train/nonfinite_steps"] for r in rows if "train/loss" in r] == [0, 1, 2, 3]
    saved = sorted(p.name for p in cfg.run_dir.glob("checkpoint_*"))
    assert saved == ["checkpoint_00000001"]  # nothing written once the loss went non-finite


def test_mlflow_logger_keeps_nan(tmp_path):
    from mlflow.tracking import MlflowClient

    from codebook.tracking import MLflowLogger, start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "e", "r", {}, {})
    MLflowLogger(uri, run_id).log(3, {"train/loss": float("nan"), "lr": 1e-3})
    history = MlflowClient(uri).get_metric_history(run_id, "train/loss")
    assert len(history) == 1 and math.isnan(history[0].value)


# ---------------------------------------------------------------------- DDP, two real ranks
def _ddp_rank(rank: int, port: int, storage: str, queue) -> None:
    from pathlib import Path

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        torch.set_num_threads(1)
        cfg = tiny_cfg(Path(storage), **{"codebook.start_step": 2, "deepspeed.enabled": False,
                                         "codebook.dead_code_steps": 2})
        model = build_model(cfg)
        engine = make_engine(model, cfg, torch.device("cpu"))
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        counts = []
        for step in range(4):
            for layer in model.codebooks.values():
                layer.enabled = step >= cfg.codebook.start_step
            ids = torch.randint(0, 11, (4 - 2 * rank, 24), generator=gen)  # 4 and 2 sequences
            out = engine(input_ids=ids, labels=ids)
            engine.backward(out.loss)
            engine.step()
            layer = model.codebooks["mlp_0"]
            counts.append((layer.code_counts.clone(), layer.steps_unused.clone()))
        queue.put((rank, [(c.tolist(), u.tolist()) for c, u in counts]))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_codebooks_off_then_on_and_statistics_stay_per_rank(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_rank, args=(r, port, str(tmp_path), queue))
             for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # Steps 0-1 ran without codebooks (their parameters unused: DDP must allow that); steps 2-3
    # with. Each rank's counts are its own tokens': rank 1's are not overwritten by rank 0's
    # (with DDP's buffer broadcast, rank 1 would hold rank 0's 96 + its own 48 after step 3).
    for rank in (0, 1):
        (c2, _), (c3, _) = results[rank][2], results[rank][3]
        per_step = (4 - 2 * rank) * 24  # tokens, k=1, one group at the MLP site
        assert sum(map(sum, c2)) == per_step and sum(map(sum, c3)) == 2 * per_step


@pytest.mark.parametrize("bf16,zero_stage", [(True, 0), (True, 2), (False, 0)])
def test_set_param_survives_the_next_optimizer_step(tmp_path, bf16, zero_stage):
    """k-means and dead-code replacement set codes through the engine: in bf16 the optimizer's
    fp32 master copy must change too, or the next step writes the old codes back."""
    from codebook.training.local import single_process_group_env

    single_process_group_env()
    cfg = tiny_cfg(tmp_path, **{"deepspeed.bf16": bf16, "deepspeed.zero_stage": zero_stage,
                                "codebook.start_step": 0, "optim.lr": 1e-6})
    engine = make_engine(build_model(cfg), cfg, torch.device("cpu"))
    layer = engine.module.codebooks["mlp_0"]
    engine.set_param(layer.codes, torch.full(layer.codes.shape, 0.5))
    ids = torch.randint(0, 11, (8, 24))
    out = engine(input_ids=ids, labels=ids)
    engine.backward(out.loss)
    engine.step()
    assert (layer.codes.float() - 0.5).abs().max().item() < 1e-3
