"""The one training loop in this process, without Ray: one rank, checkpoints in a folder, metrics
as JSON lines. For machines without Ray (a lone GPU box), benchmarks and tests; the Ray
pipeline (``codebook.ray_glue.train``) runs the same ``train`` with Ray Train's reporter.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from codebook.errors import ConfigError
from codebook.io import atomic_write
from codebook.training import metric_names as names
from codebook.training.config import TrainConfig
from codebook.training.loop import HF_DIR, LoopData, Workers, train

METRICS_FILE = "metrics.jsonl"


class FolderReporter:
    """Metrics appended to ``run_dir/metrics.jsonl``; checkpoints copied to
    ``run_dir/checkpoint_<step>`` (under a temp name, then renamed), keeping the newest ``keep``."""

    def __init__(self, run_dir: Path, keep: int = 2):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.checkpoints: list[Path] = sorted(self.run_dir.glob("checkpoint_*"))
        self.history: list[dict[str, Any]] = []

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **metrics}
        self.history.append(row)
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def checkpoint(self, step: int, metrics: dict[str, float], directory: Path) -> None:
        final = self.run_dir / f"checkpoint_{step:08d}"
        tmp = self.run_dir / f".checkpoint_{step:08d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(directory, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self.checkpoints = [c for c in self.checkpoints if c != final] + [final]
        for old in self.checkpoints[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        self.checkpoints = self.checkpoints[-self.keep:]


def fsm_loop_data(cfg: TrainConfig, workers: Workers) -> LoopData:
    """The TokFSM stream for this rank (needs no Ray)."""
    from codebook.data.fsm import TokFSM
    from codebook.data.sources import fsm_eval_batches, fsm_train_batches

    fsm = TokFSM(cfg.data.fsm)
    bs, n_eval = cfg.optim.batch_size, cfg.data.eval_blocks
    return LoopData(
        train=lambda start: fsm_train_batches(fsm, bs, cfg.run.seed, start, workers.rank,
                                              workers.world_size, n_eval),
        eval=lambda: fsm_eval_batches(fsm, n_eval, bs, workers.rank, workers.world_size),
    )


def text_loop_data(cfg: TrainConfig, workers: Workers) -> LoopData:
    """A text corpus read in this process (``codebook.data.blocks``): training blocks in a
    seeded random order per epoch (this rank's share of each batch), eval blocks as the Ray
    pipeline picks them."""
    import numpy as np

    from codebook.data.blocks import split_blocks
    from codebook.data.text import load_tokenizer

    m, bs = cfg.model, cfg.optim.batch_size
    tokenizer = load_tokenizer(m.tokenizer or m.name_or_path,
                               None if m.tokenizer else m.gguf_file)
    train_blocks, held = split_blocks(cfg.data, tokenizer)
    eval_blocks = held[: cfg.data.eval_blocks]
    need = bs * workers.world_size
    if len(train_blocks) < need:
        raise ConfigError("data.paths", f"the corpus gives {len(train_blocks)} training blocks,"
                          f" fewer than one batch ({need})", "add text or lower the batch size")

    def train_batches(start: int) -> Iterator[dict[str, torch.Tensor]]:
        per_epoch = len(train_blocks) // need
        seen = 0
        for epoch in itertools.count():
            order = np.random.default_rng([cfg.run.seed, epoch]).permutation(len(train_blocks))
            for b in range(per_epoch):
                seen += 1
                if seen > start:
                    rows = order[b * need + workers.rank * bs: b * need + (workers.rank + 1) * bs]
                    yield {"input_ids": torch.from_numpy(train_blocks[np.sort(rows)]).long()}

    def eval_batches() -> Iterator[dict[str, torch.Tensor]]:
        mine = eval_blocks[workers.rank:: workers.world_size]
        for i in range(0, len(mine), bs):
            yield {"input_ids": torch.from_numpy(mine[i: i + bs]).long()}

    return LoopData(train=train_batches, eval=eval_batches)


def single_process_group_env() -> None:
    """Environment for a one-rank process group (DeepSpeed initialises one even alone)."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)


def train_local(cfg: TrainConfig, data: LoopData | None = None,
                device: torch.device | str | None = None,
                reporter: FolderReporter | None = None, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg`` here, in one process, into ``cfg.run_dir`` (with ``resume``, on from its
    newest intact checkpoint); returns the loop's summary plus ``checkpoint``, ``model`` (the
    last checkpoint's HF folder) and ``wall_s``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if cfg.deepspeed.enabled:
        single_process_group_env()
    workers = Workers(0, 1, device)
    if data is None:
        data = (fsm_loop_data if cfg.data.source == "fsm" else text_loop_data)(cfg, workers)
    reporter = reporter or FolderReporter(cfg.run_dir)
    resume_dir = None
    if resume:
        from codebook.checkpoint import latest_intact_checkpoint

        resume_dir, _ = latest_intact_checkpoint(cfg.run_dir)
        if resume_dir is None:
            raise ConfigError("resume", f"no intact checkpoint under {cfg.run_dir}",
                              "train without resume")
    started = time.perf_counter()
    summary = train(cfg, data, reporter, workers, resume_dir)
    last = reporter.checkpoints[-1] if reporter.checkpoints else None
    summary.update({"dead_code_fraction": summary["metrics"].get(names.DEAD_CODE_FRACTION),
                    "checkpoint": str(last) if last else None,
                    "model": str(last / HF_DIR) if last else None,
                    "wall_s": round(time.perf_counter() - started, 1)})
    with atomic_write(cfg.run_dir / "summary.json") as fh:
        json.dump({k: v for k, v in summary.items() if k != "metrics"}, fh, indent=2)
    return summary
