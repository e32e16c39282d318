"""Switching the codebooks on: k-means initialisation in forward order, and the base model's
learning rate for the codebook phase."""

from __future__ import annotations

import pytest
import torch
from train_helpers import FSM_CONFIG, tiny_overrides

from codebook.errors import ConfigError
from codebook.interventions import recording
from codebook.training.config import load_config
from codebook.training.engine import TorchEngine
from codebook.training.loop import Workers, build_model, kmeans_init


def _inputs(model, name, batches, on: bool) -> torch.Tensor:
    """The inputs ``name`` gets with every codebook on (``on``) or with all of them off."""
    model.eval()
    with torch.no_grad(), recording(model, [name], activations=True) as rec:
        for b in batches:
            if on:
                model(input_ids=b)
            else:
                with model.codebooks_disabled():
                    model(input_ids=b)
    return rec.activations[name].reshape(-1, model.codebooks[name].dim)


def _centroid_gap(layer, x: torch.Tensor) -> float:
    """Largest distance between a used code and the mean of the inputs assigned to it."""
    idx = layer.select(x.reshape(-1, layer.groups, layer.group_dim))[..., 0]  # (n, groups)
    xs = x.reshape(-1, layer.groups, layer.group_dim)
    gap = 0.0
    for g in range(layer.groups):
        for c in idx[:, g].unique():
            mean = xs[idx[:, g] == c, g].mean(0)
            gap = max(gap, float((layer.codes[g, c] - mean).norm()))
    return gap


def test_kmeans_init_fits_each_site_to_what_it_sees_with_earlier_codebooks_on(tmp_path):
    cfg = load_config(FSM_CONFIG, tiny_overrides(
        tmp_path, **{"codebook.num_codes": 8, "codebook.k": 1, "codebook.kmeans_iters": 60,
                     "codebook.score": "euclidean"}))
    model = build_model(cfg)
    assert list(model.codebooks) == ["attn_heads_0", "mlp_0", "attn_heads_1", "mlp_1"]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 10, (4, 24), generator=gen) for _ in range(2)]
    engine = TorchEngine(model, cfg, torch.device("cpu"))
    kmeans_init(model, [{"input_ids": b} for b in batches], engine, cfg, Workers())
    assert model.training and all(cb.enabled for cb in model.codebooks.values())

    last = model.codebooks["mlp_1"]
    seen = _inputs(model, "mlp_1", batches, on=True)
    plain = _inputs(model, "mlp_1", batches, on=False)
    # Lloyd's fixed point holds on the inputs the site sees with the earlier codebooks on ...
    assert _centroid_gap(last, seen) < 1e-4
    # ... and not on the plain model's inputs, which differ once layer 0 is quantised.
    assert not torch.allclose(seen, plain, atol=1e-3)
    assert _centroid_gap(last, plain) > 1e-2


def test_base_model_lr_switches_when_the_codebooks_come_on(tmp_path):
    cfg = load_config(FSM_CONFIG, tiny_overrides(
        tmp_path, **{"codebook.start_step": 3, "optim.lr": 1e-2, "optim.model_lr_factor": 1.0,
                     "optim.schedule": "constant",
                     "optim.codebook_phase_model_lr_factor": 0.1}))
    engine = TorchEngine(build_model(cfg), cfg, torch.device("cpu"))
    lrs = []
    for _ in range(5):
        lrs.append([g["lr"] for g in engine.optimizer.param_groups])
        engine.optimizer.step()
        engine.scheduler.step()
    assert [round(m, 6) for _, m in lrs] == [1e-2, 1e-2, 1e-2, 1e-3, 1e-3]
    assert all(c == 1e-2 for c, _ in lrs)  # the codebooks keep optim.lr


def test_negative_lr_factor_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="codebook_phase_model_lr_factor"):
        load_config(FSM_CONFIG, tiny_overrides(
            tmp_path, **{"optim.codebook_phase_model_lr_factor": -1}))


class _Collect:
    """A Reporter that keeps what the loop logs and which steps it checkpoints (no Ray)."""

    def __init__(self):
        self.logged: dict[int, dict[str, float]] = {}
        self.checkpoints: list[int] = []

    def log(self, step, metrics):
        self.logged.setdefault(step, {}).update(metrics)

    def checkpoint(self, step, metrics, directory):
        assert (directory / "hf" / "codebooks.safetensors").exists()
        self.checkpoints.append(step)


def test_the_loop_runs_without_ray_and_logs_each_groups_lr(tmp_path):
    from codebook.data.fsm import TokFSM
    from codebook.data.sources import fsm_eval_batches, fsm_train_batches
    from codebook.training.loop import LoopData, train

    cfg = load_config(FSM_CONFIG, tiny_overrides(
        tmp_path, **{"run.max_steps": 4, "run.log_every": 1, "codebook.start_step": 2,
                     "codebook.kmeans_init_batches": 1, "deepspeed.enabled": False,
                     "optim.lr": 1e-2, "optim.model_lr_factor": 0.5, "optim.schedule": "constant",
                     "optim.codebook_phase_model_lr_factor": 0.1}))
    fsm = TokFSM(cfg.data.fsm)
    data = LoopData(
        train=lambda start: fsm_train_batches(fsm, 8, 0, start, 0, 1, cfg.data.eval_blocks),
        eval=lambda: fsm_eval_batches(fsm, cfg.data.eval_blocks, 8, 0, 1))
    reporter = _Collect()
    summary = train(cfg, data, reporter, Workers())
    assert summary["steps"] == 4 and reporter.checkpoints == [4]
    lrs = {step: (m["lr/codebooks"], m["lr/model"]) for step, m in reporter.logged.items()
           if "lr/model" in m}
    # logged after the optimizer step: steps 1-2 plain (factor 0.5), then codebooks on (0.1)
    assert [round(m, 6) for _, m in (lrs[1], lrs[3], lrs[4])] == [5e-3, 1e-3, 1e-3]
    assert all(c == 1e-2 for c, _ in lrs.values())


def test_resuming_uses_the_configs_base_lr_once(tmp_path):
    """A checkpoint whose scheduler saved the base model's lr already scaled by model_lr_factor
    (as before the factor moved into the lr lambda) must not get the factor a second time."""
    cfg = load_config(FSM_CONFIG, tiny_overrides(
        tmp_path, **{"optim.lr": 1e-2, "optim.model_lr_factor": 0.3,
                     "optim.schedule": "constant", "deepspeed.enabled": False}))
    engine = TorchEngine(build_model(cfg), cfg, torch.device("cpu"))
    engine.scheduler.base_lrs = [1e-2, 3e-3]  # the older checkpoints' scheduler state
    engine.save(tmp_path, 0)
    resumed = TorchEngine(build_model(cfg), cfg, torch.device("cpu"))
    resumed.load(tmp_path)
    resumed.optimizer.step()
    resumed.scheduler.step()
    assert [round(g["lr"], 6) for g in resumed.optimizer.param_groups] == [1e-2, 3e-3]
