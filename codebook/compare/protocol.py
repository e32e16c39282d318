"""The comparison's models, trained on equal terms by the one training loop.

From scratch (``model.from_config``): the **base** is the plain model trained for
``codebook.start_step`` steps (no codebooks); every other model is a finetune of it for the
same ``max_steps - start_step`` steps, schedule and data: the **control** without codebooks
(the "clean" reference for every method), and the end-to-end **codebook** models, one per
(L0 multiple, seed). From a pretrained model the base is that model and the finetunes start
there. The cache-fitted methods (post-hoc codebooks, SAEs) are fitted to the base.

A run that finished is reused: its folder under ``<out>/runs/<name>`` holds its last
checkpoint at its last step; an interrupted one resumes from its newest intact checkpoint.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codebook.errors import ConfigError
from codebook.training.config import TrainConfig

# fit(train config, resume) -> summary with "model": the last checkpoint's HF folder
Fit = Callable[[TrainConfig, bool], dict[str, Any]]


@dataclass
class TrainedModel:
    """A model of the comparison and what training it cost."""

    path: str
    seconds: float | None = None  # wall time of its training
    tokens: int = 0
    dead_fraction: float | None = None  # codes unused over its last training log window


def phase_config(train: TrainConfig, name: str, runs: Path, base: str | None, *,
                 codebooks: bool, k_multiple: int = 1, seed: int = 0) -> TrainConfig:
    """One run's config: the base's pretraining (``base`` None, from scratch), or a finetune
    of ``base`` with or without codebooks (k times ``k_multiple``) under ``seed``
    (``CodebookConfig.at_k``: a euclidean codebook above k=1 averages its codes)."""
    tc = copy.deepcopy(train)
    tc.run.name, tc.run.storage_path = name, str(runs)
    start = train.codebook.start_step
    if base is None:  # the base: the plain model for start_step steps
        tc.codebook.sites, tc.run.max_steps = [], start
    else:
        tc.model.name_or_path, tc.model.from_config = base, None
        if train.model.from_config is not None:  # a finetune of our own base, phase 2
            tc.run.max_steps = train.run.max_steps - start
            tc.model.gguf_file = None
            if train.optim.codebook_phase_model_lr_factor is not None:
                tc.optim.model_lr_factor = train.optim.codebook_phase_model_lr_factor
        tc.codebook.start_step = 0
        tc.run.seed = seed
        if not codebooks:
            tc.codebook.sites = []
        else:
            k = train.codebook.k * k_multiple
            if k > tc.codebook.num_codes:
                raise ConfigError("sparsity", f"k x {k_multiple} = {k} exceeds "
                                  f"num_codes {tc.codebook.num_codes}", "lower the multiples")
            tc.codebook = tc.codebook.at_k(k)
    tc.run.checkpoint_every = max(tc.run.max_steps // 2, 1)
    tc.run.eval_every = min(tc.run.eval_every, tc.run.max_steps)
    return tc


def train_model(tc: TrainConfig, fit: Fit) -> TrainedModel:
    """``tc``'s run: reused when it finished, resumed when interrupted, else trained."""
    from codebook.checkpoint import HF_DIR, checkpoint_step, latest_intact_checkpoint
    from codebook.io import atomic_write

    tokens = (tc.run.max_steps * tc.optim.batch_size * tc.optim.grad_accum
              * tc.run.num_workers * sequence_tokens(tc))
    latest, _ = latest_intact_checkpoint(tc.run_dir)
    cost_file = tc.run_dir / "cost.json"
    if latest is not None and checkpoint_step(latest) == tc.run.max_steps:
        cost = json.loads(cost_file.read_text()) if cost_file.is_file() else {}
        print(f"{tc.run.name}: trained before ({latest})", flush=True)
        return TrainedModel(str(latest / HF_DIR), cost.get("seconds"), tokens,
                            cost.get("dead_fraction"))
    started = time.perf_counter()
    summary = fit(tc, latest is not None)
    seconds = time.perf_counter() - started
    dead = summary.get("dead_code_fraction")
    with atomic_write(cost_file) as fh:
        json.dump({"seconds": seconds, "tokens": tokens, "resumed": latest is not None,
                   "dead_fraction": dead}, fh)
    return TrainedModel(str(summary["model"]), seconds, tokens, dead)


def sequence_tokens(tc: TrainConfig) -> int:
    """Tokens per training sequence: the block size, or the FSM's sequence length."""
    if tc.data.source == "fsm":
        from codebook.data.fsm import TokFSM

        return TokFSM(tc.data.fsm).seq_len
    return tc.data.block_size
