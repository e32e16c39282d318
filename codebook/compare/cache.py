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

    def batches(self, name: str, batch_tokens: int, seed: int = 0) -> Iterator[torch.Tensor]:
        """(batch_tokens, dim) batches of one site, shards in a seeded order, tokens shuffled
        within each shard; one shard in memory at a time."""
        self.site(name)
        rng = np.random.default_rng(seed)
        for i in rng.permutation(self.shards):
            x = self.shard(int(i), name)
            order = torch.as_tensor(rng.permutation(x.shape[0]))
            for start in range(0, x.shape[0] - batch_tokens + 1, batch_tokens):
                yield x[order[start : start + batch_tokens]]

    def sample(self, name: str, n: int, seed: int = 0) -> torch.Tensor:
        """Up to ``n`` random tokens of one site, drawn evenly from every shard."""
        self.site(name)
        per = max(1, -(-n // self.shards))
        g = torch.Generator().manual_seed(seed)
        parts = []
        for i in range(self.shards):
            x = self.shard(i, name)
            parts.append(x[torch.randperm(x.shape[0], generator=g)[:per]])
        return torch.cat(parts)[:n]
