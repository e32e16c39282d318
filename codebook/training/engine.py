"""Optimisation engines for the training loop: DeepSpeed (ZeRO 0-3, offload) or plain PyTorch.

Both expose the same small surface (forward, backward, step, save, load, set_param) so the one
training loop does not care which runs it. Codebook parameters get their own parameter group
(own lr, no weight decay); the base model is frozen or trained at ``lr * model_lr_factor``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from codebook.model import CodebookModel
from codebook.training.config import TrainConfig


def param_groups(model: CodebookModel, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Codebooks: lr, no weight decay. Base model: lr, scaled per step by
    :func:`model_lr_lambda` (or frozen)."""
    o = cfg.optim
    groups = [{"params": model.codebook_parameters(), "lr": o.lr, "weight_decay": 0.0,
               "name": "codebooks"}] if model.codebooks else []  # none: the plain model
    if cfg.model.freeze_base:
        for p in model.base_parameters():
            p.requires_grad_(False)
    else:
        groups.append({"params": [p for p in model.base_parameters() if p.requires_grad],
                       "lr": o.lr, "weight_decay": o.weight_decay,
                       "name": "model"})
    return groups


def lr_lambda(cfg: TrainConfig):
    """Warm-up then constant or cosine decay to ``min_lr_ratio``; a multiplier per step."""
    o, total = cfg.optim, cfg.run.max_steps

    def factor(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def model_lr_lambda(cfg: TrainConfig):
    """The base model's multiplier: the schedule times ``model_lr_factor``, or times
    ``codebook_phase_model_lr_factor`` (when set) from ``codebook.start_step`` on."""
    o, schedule = cfg.optim, lr_lambda(cfg)
    start = cfg.codebook.start_step
    after = o.model_lr_factor if o.codebook_phase_model_lr_factor is None \
        else o.codebook_phase_model_lr_factor

    def factor(step: int) -> float:
        return schedule(step) * (after if step >= start else o.model_lr_factor)

    return factor


def make_optimizer(model: CodebookModel, cfg: TrainConfig):
    groups = param_groups(model, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    per_group = {"codebooks": lr_lambda(cfg), "model": model_lr_lambda(cfg)}
    lambdas = [per_group[g["name"]] for g in groups]
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambdas)


def rebase_schedule(scheduler, cfg: TrainConfig) -> None:
    """After loading a checkpoint: every group's base lr is ``optim.lr`` (the per-group factors
    live in the lambdas). Checkpoints written before the factors moved there saved the base
    model's lr already scaled by ``model_lr_factor``; without this it was applied twice."""
    scheduler.base_lrs = [cfg.optim.lr] * len(scheduler.base_lrs)


class TorchEngine:
    """Plain PyTorch (DDP when a process group is up); gradient accumulation and clipping."""

    def __init__(self, model: CodebookModel, cfg: TrainConfig, device: torch.device):
        self.module = model.to(device)
        self.cfg = cfg
        self.optimizer, self.scheduler = make_optimizer(model, cfg)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        # Before codebook.start_step the codebooks take no part in the forward pass, so their
        # parameters get no gradient: DDP must look for unused parameters. Buffers are not
        # broadcast: each rank keeps its own code statistics (steps_unused, code_counts,
        # recent inputs), which the loop reduces across ranks where it needs them.
        self.wrapped = nn.parallel.DistributedDataParallel(
            self.module, broadcast_buffers=False,
            find_unused_parameters=cfg.codebook.start_step > 0,
        ) if distributed else model
        self.micro = 0
        self.dtype = torch.float32
        # bf16 without DeepSpeed (e.g. a GPU box without it): the forward pass under autocast,
        # fp32 master weights and optimizer; the codebooks score in fp32 whatever the dtype.
        self.autocast = bool(cfg.deepspeed.bf16) and device.type == "cuda"

    def __call__(self, **batch: torch.Tensor):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            return self.wrapped(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.optim.grad_accum).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.cfg.optim.grad_accum:
            return
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, directory: Path, rank: int) -> None:
        from safetensors.torch import save_file

        if rank == 0:
            save_file({k: v.contiguous() for k, v in self.module.state_dict().items()},
                      str(directory / "engine_model.safetensors"))
            # Optimizer state holds only tensors and numbers: loaded back with weights_only=True.
            torch.save({"optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, directory / "engine_optim.pt")

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        self.module.load_state_dict(load_file(str(directory / "engine_model.safetensors")))
        state = torch.load(directory / "engine_optim.pt", weights_only=True, map_location="cpu")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rebase_schedule(self.scheduler, self.cfg)

    @contextmanager
    def full_params(self, params: list[nn.Parameter], modifier_rank: int | None = None):
        yield

    def set_param(self, param: nn.Parameter, value: torch.Tensor) -> None:
        with torch.no_grad():
            param.copy_(value)


class DeepSpeedEngine:
    """DeepSpeed engine: ZeRO stage 0-3, optional CPU offload, bf16 on GPU, fp32 on CPU."""

    def __init__(self, model: CodebookModel, cfg: TrainConfig, device: torch.device):
        import deepspeed

        self.cfg = cfg
        ds = cfg.deepspeed
        bf16 = ds.uses_bf16(device.type)
        zero: dict[str, Any] = {"stage": ds.zero_stage}
        if ds.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        if ds.offload_params:
            zero["offload_param"] = {"device": "cpu"}
        if ds.zero_stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        config = {
            "train_micro_batch_size_per_gpu": cfg.optim.batch_size,
            "gradient_accumulation_steps": cfg.optim.grad_accum,
            "gradient_clipping": cfg.optim.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": bool(bf16)},
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        optimizer, scheduler = make_optimizer(model, cfg)
        if bf16 and device.type == "cuda":
            # Codebook scoring runs in fp32 (see codebook.layer); TF32 tensor cores keep it fast.
            torch.backends.cuda.matmul.allow_tf32 = True
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model.to(device), optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.module = self.engine.module
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        if ds.zero_stage == 0 and self.engine.dp_world_size == 1:
            self.engine.enable_backward_allreduce = False  # nothing to reduce with one rank

    def __call__(self, **batch: torch.Tensor):
        return self.engine(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def save(self, directory: Path, rank: int) -> None:
        # DeepSpeed's own format: each rank writes its optimizer shard into ``directory``.
        self.engine.save_checkpoint(str(directory), tag="deepspeed", save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag="deepspeed",
                                              load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}")
        rebase_schedule(self.scheduler, self.cfg)

    @contextmanager
    def full_params(self, params: list[nn.Parameter], modifier_rank: int | None = None):
        """Gather ZeRO-3 partitioned parameters (no-op below stage 3)."""
        if self.cfg.deepspeed.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
                yield
        else:
            with nullcontext():
                yield

    def set_param(self, param: nn.Parameter, value: torch.Tensor) -> None:
        """Set a parameter everywhere DeepSpeed keeps it: the module's copy and, in bf16, the
        optimizer's fp32 master copy (else the next step writes the old value back)."""
        from deepspeed.utils import safe_set_full_fp32_param

        with torch.no_grad(), self.full_params([param], modifier_rank=0):
            param.copy_(value.to(param.dtype))
        if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):  # ZeRO 1-3, BF16_Optimizer
            safe_set_full_fp32_param(param, value.float())
        elif param.dtype != torch.float32 and not _set_fp16_master(self.optimizer, param, value):
            raise RuntimeError(f"cannot find the fp32 master copy of a {tuple(param.shape)} "
                               f"parameter in {type(self.optimizer).__name__}")


@torch.no_grad()
def _set_fp16_master(optimizer: Any, param: nn.Parameter, value: torch.Tensor) -> bool:
    """ZeRO-0 in bf16/fp16 (DeepSpeed's FP16 optimizers): copy ``value`` into ``param``'s fp32
    master, kept per parameter (``fp32_groups``) or flattened per group (``fp32_groups_flat``).
    Returns whether it was found."""
    for i, group in enumerate(getattr(optimizer, "fp16_groups", [])):
        offset = 0
        for j, p in enumerate(group):
            if p is param:
                if hasattr(optimizer, "fp32_groups"):
                    optimizer.fp32_groups[i][j].copy_(value.reshape(p.shape))
                else:
                    flat = optimizer.fp32_groups_flat[i]
                    flat[offset: offset + p.numel()].copy_(value.reshape(-1))
                return True
            offset += p.numel()
    return False


def make_engine(model: CodebookModel, cfg: TrainConfig, device: torch.device):
    if cfg.deepspeed.enabled:
        return DeepSpeedEngine(model, cfg, device)
    return TorchEngine(model, cfg, device)
