"""Collect an activation cache (``codebook.compare.cache``) with Ray Data actors.

Token rows are cut into shards; an actor pool of frozen base models (one per worker, CPUs or a
GPU each) runs each shard up to its deepest site and writes it atomically. Shards already on
disk are skipped, so a rerun resumes; the cache's index is written last.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from codebook.compare.cache import SHARD, ActivationCache, write_meta
from codebook.extraction import plan_shards


class _CollectShard:
    """A frozen base model that turns shards of token rows into cache shards."""

    def __init__(self, base: str, codebook_config: dict[str, Any], sites: list[str], root: str,
                 batch_rows: int, threads: int, gguf_file: str | None):
        import torch

        from codebook.compare.load import load_base
        from codebook.config import CodebookConfig
        from codebook.sites import resolve_sites

        torch.set_num_threads(threads)
        self.model = load_base(base, gguf_file)
        chosen = set(sites)
        self.sites = {s.name: s for s in resolve_sites(self.model.config,
                                                       CodebookConfig(**codebook_config))
                      if s.name in chosen}
        self.root, self.batch_rows = root, batch_rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        import torch

        from codebook.compare.cache import collect_activations, write_shard

        out: dict[str, list] = {"shard": [], "tokens": [], "seconds": []}
        for shard, ids in zip(batch["shard"], batch["input_ids"], strict=True):
            t0 = time.perf_counter()
            ids = torch.as_tensor(np.array(ids, dtype=np.int64))
            parts = [collect_activations(self.model, self.sites, ids[i : i + self.batch_rows])
                     for i in range(0, ids.shape[0], self.batch_rows)]
            acts = {n: torch.cat([p[n] for p in parts]) for n in self.sites}
            write_shard(self.root, int(shard), acts, ids)
            out["shard"].append(int(shard))
            out["tokens"].append(int(ids.numel()))
            out["seconds"].append(time.perf_counter() - t0)
        return out


def collect_cache(base: str, codebook_config: dict[str, Any], sites: dict[str, int],
                  tokens: np.ndarray, root: str | Path, rows_per_shard: int = 256,
                  batch_rows: int = 64, num_workers: int = 1, gguf_file: str | None = None
                  ) -> ActivationCache:
    """The activations of ``base`` (HF folder, or one with ``gguf_file``) at ``sites``
    ({name: width}) on ``tokens``
    (rows, seq), cached under ``root``; needs a running Ray (``ray_session``)."""
    import os

    import ray

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ranges = [(p["start"], p["stop"]) for p in plan_shards(tokens.shape[0], rows_per_shard)]
    todo = [i for i in range(len(ranges)) if not (root / SHARD.format(i)).is_file()]
    if todo:
        cpus = max(1.0, float(ray.available_resources().get("CPU", 1)) / num_workers)
        threads = max(1, int(cpus) if cpus >= 1 else (os.cpu_count() or 1) // num_workers)
        items = [{"shard": i, "input_ids": tokens[ranges[i][0] : ranges[i][1]]} for i in todo]
        ds = ray.data.from_items(items).map_batches(
            _CollectShard, batch_size=1, concurrency=num_workers, num_cpus=cpus,
            fn_constructor_kwargs={"base": str(base), "codebook_config": codebook_config,
                                   "sites": list(sites), "root": str(root),
                                   "batch_rows": batch_rows, "threads": threads,
                                   "gguf_file": gguf_file})
        for row in ds.iter_rows():
            print(f"cache shard {row['shard']}: {row['tokens']} tokens in "
                  f"{row['seconds']:.1f}s", flush=True)
    write_meta(root, sites, len(ranges), int(tokens.size), {"base": str(base)})
    return ActivationCache.open(root)
