"""A cache of site activations on disk: safetensors shards, read one shard at a time.

``collect_activations`` runs the frozen base model on token blocks and keeps the activation at
each site, as the codebook layer there would see it; the forward pass stops as soon as the
deepest requested site has been seen (a layer-8 site does not run layers 9..L). Shards are
written atomically by whoever collects them (``codebook.ray_glue.activations`` runs Ray Data
actors); ``ActivationCache`` streams them back, so training on the cache never holds all of it.

Layout: ``<cache>/cache.json`` ({sites: {name: dim}, shards: [...], tokens}) and
``<cache>/shard-00000.safetensors`` ({site: (tokens, dim) fp32, "input_ids": (rows, seq)}).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from codebook.errors import ConfigError
from codebook.io import atomic_write
from codebook.sites import Site, site_module

CACHE_FILE = "cache.json"
SHARD = "shard-{:05d}.safetensors"


class _Seen(Exception):
    """Raised inside the forward pass once every site has been seen."""


@torch.no_grad()
def collect_activations(model: nn.Module, sites: Mapping[str, Site], input_ids: torch.Tensor
                        ) -> dict[str, torch.Tensor]:
    """{site: (rows * seq, dim) fp32} the activations at ``sites`` of ``model`` (a plain HF
    causal LM) on ``input_ids``; the pass stops after the deepest site."""
    caught: dict[str, torch.Tensor] = {}

    def keep(name: str, value: Any) -> None:
        t = value[0] if isinstance(value, tuple) else value
        caught[name] = t.detach().float().reshape(-1, t.shape[-1]).cpu()
        if len(caught) == len(sites):
            raise _Seen

    handles = []
    for name, site in sites.items():
        module = site_module(model, site)
        if site.hook == "pre":
            handles.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, n=name: keep(n, args[0] if args else
                                                     next(iter(kwargs.values()))),
                with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(lambda m, a, out, n=name: keep(n, out)))
    try:
        model(input_ids=input_ids)
    except _Seen:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(sites) - set(caught))
    if missing:
        raise ConfigError("sites", f"the forward pass never reached {missing}",
                          "name sites that the model's forward pass runs")
    return caught


def write_shard(root: str | Path, index: int, acts: Mapping[str, torch.Tensor],
                input_ids: torch.Tensor) -> Path:
    """One shard, written atomically (a rerun overwrites it whole or not at all)."""
    path = Path(root) / SHARD.format(index)
    tensors = {name: t.contiguous() for name, t in acts.items()}
    tensors["input_ids"] = input_ids.long().contiguous()
    with atomic_write(path, "wb") as fh:
        fh.write(save(tensors))
    return path


def write_meta(root: str | Path, sites: Mapping[str, int], shards: int, tokens: int,
               extra: Mapping[str, Any] | None = None) -> None:
    """The cache's index, written last: a cache without it is unfinished."""
    meta = {"sites": dict(sites), "shards": shards, "tokens": tokens, **(extra or {})}
    with atomic_write(Path(root) / CACHE_FILE) as fh:
        fh.write(json.dumps(meta, indent=2))


@dataclass
class ActivationCache:
    """A finished cache folder (see the module docstring)."""

    root: Path
    sites: dict[str, int]
    shards: int
    tokens: int
    meta: dict[str, Any]

    @classmethod
    def open(cls, root: str | Path) -> ActivationCache:
        root = Path(root)
        index = root / CACHE_FILE
        if not index.is_file():
            raise ConfigError("cache", f"no finished activation cache at {root} ({CACHE_FILE} "
                              "is missing)", "collect it first (pipelines/compare.py does)")
        meta = json.loads(index.read_text())
        for i in range(meta["shards"]):
            if not (root / SHARD.format(i)).is_file():
                raise ConfigError("cache", f"{root / SHARD.format(i)} is missing",
                                  "collect the cache again")
        return cls(root, dict(meta["sites"]), int(meta["shards"]), int(meta["tokens"]), meta)

    def site(self, name: str) -> int:
        """The width of site ``name``; a ConfigError naming the cached sites otherwise."""
        if name not in self.sites:
            raise ConfigError("site", f"{name!r} is not in the cache at {self.root}",
                              f"cached sites: {sorted(self.sites)}")
        return self.sites[name]

    def shard(self, i: int, name: str) -> torch.Tensor:
        """One site's (tokens, dim) activations of shard ``i`` (the other sites not read)."""
        with safe_open(str(self.root / SHARD.format(i)), framework="pt") as fh:
            return fh.get_tensor(name)

    def split(self, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
        """(training, validation) shard indices: ``val_fraction`` of the shards (at least one,
        and at least one left to train on) held out, chosen by ``seed``."""
        if self.shards < 2:
            raise ConfigError("cache", f"{self.root} has {self.shards} shard: a validation "
                              "split needs at least 2", "collect more sequences, or lower "
                              "cache.rows_per_shard")
        n_val = min(self.shards - 1, max(1, round(val_fraction * self.shards)))
        order = np.random.default_rng([seed, 11]).permutation(self.shards)
        return sorted(int(i) for i in order[n_val:]), sorted(int(i) for i in order[:n_val])

    def batches(self, name: str, batch_tokens: int, seed: int = 0,
                shards: list[int] | None = None) -> Iterator[torch.Tensor]:
        """(batch_tokens, dim) batches of one site from ``shards`` (default all), shards in a
        seeded order; tokens shuffled within a pool of at least two batches' worth of shards
        (a batch may span shards), a pool's tail carried into the next; one pool in memory."""
        self.site(name)
        rng = np.random.default_rng(seed)
        ids = list(range(self.shards)) if shards is None else list(shards)
        pool: list[torch.Tensor] = []
        held = 0
        for k, i in enumerate(rng.permutation(ids)):
            x = self.shard(int(i), name)
            pool.append(x)
            held += x.shape[0]
            if held < 2 * batch_tokens and k < len(ids) - 1:
                continue
            mixed = torch.cat(pool)
            mixed = mixed[torch.as_tensor(rng.permutation(mixed.shape[0]))]
            whole = mixed.shape[0] // batch_tokens * batch_tokens
            yield from mixed[:whole].split(batch_tokens)
            pool, held = [mixed[whole:]], mixed.shape[0] - whole

    def sample(self, name: str, n: int, seed: int = 0,
               shards: list[int] | None = None) -> torch.Tensor:
        """Up to ``n`` random tokens of one site, drawn evenly from ``shards`` (default all)."""
        self.site(name)
        ids = list(range(self.shards)) if shards is None else list(shards)
        per = max(1, -(-n // len(ids)))
        g = torch.Generator().manual_seed(seed)
        parts = []
        for i in ids:
            x = self.shard(i, name)
            parts.append(x[torch.randperm(x.shape[0], generator=g)[:per]])
        return torch.cat(parts)[:n]
