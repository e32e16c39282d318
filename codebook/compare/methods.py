"""The methods of the comparison, each as a ``CodebookModel`` over the same sites, so that one
scoring code serves them all (``codebook.compare.score``):

- ``codebook``: the end-to-end finetuned codebook model (its own weights);
- ``posthoc_codebook``: codebook layers of the same size and k fitted to the frozen base
  model's cached activations (k-means, then reconstruction training; the model untouched);
- ``sae`` / ``sae_4x``: sparsify TopK SAEs on the frozen base model; dictionary = the
  codebook's codes per site, L0 = the codebook's L0 (and 4x);
- ``neuron``: nothing spliced; the base model's own units (``IdentityLayer`` records them).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from codebook.compare.cache import ActivationCache
from codebook.compare.sparse_coder import SparseCoderLayer, new_sparse_coder, train_sparse_coder
from codebook.config import CodebookConfig
from codebook.layer import CodebookLayer
from codebook.model import CodebookModel

METHODS = ("codebook", "posthoc_codebook", "sae", "sae_4x", "neuron")


@dataclass
class FitOptions:
    """How the cache-trained methods are fitted (``sae`` and ``posthoc`` sections)."""

    steps: int = 2000
    batch_tokens: int = 1024
    lr: float | None = None  # None: the method's default (sparsify's rule; 1e-3 for codebooks)
    seed: int = 0


@dataclass
class Fitted:
    """A method's model, and what fitting it cost."""

    model: CodebookModel
    train_seconds: float = 0.0
    train_tokens: int = 0
    info: dict[str, Any] | None = None


class IdentityLayer(CodebookLayer):
    """Leaves the activation alone; records no codes (one empty slot), only the inputs."""

    def __init__(self, dim: int):
        super().__init__(dim, 1, 1, init_std=0.0)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if self.recording:
            self.recorded_codes.append(torch.full((*x.shape[:-1], 1, 1), -1, device=x.device,
                                                  dtype=torch.long))
            if self.record_inputs:
                self.recorded_inputs.append(x.detach())
        self.last_losses = None
        return x


def _wrap(base: nn.Module, config: CodebookConfig) -> CodebookModel:
    """A fresh CodebookModel over a copy of ``base`` (hooks never touch the caller's model)."""
    return CodebookModel(copy.deepcopy(base).eval(), config)


def neuron_model(base: nn.Module, config: CodebookConfig) -> Fitted:
    """The base model with an ``IdentityLayer`` at every site."""
    model = _wrap(base, config)
    for name, layer in model.codebooks.items():
        model.codebooks[name] = IdentityLayer(layer.dim)
    return Fitted(model)


def posthoc_codebook(base: nn.Module, config: CodebookConfig, cache: ActivationCache,
                     opts: FitOptions, kmeans_samples: int = 16384,
                     log: Callable[[str, int, float], None] | None = None) -> Fitted:
    """Codebooks of ``config``'s size and k fitted to the frozen base model's activations:
    k-means on a cache sample, then the reconstruction loss alone, Adam, dead codes re-seeded
    every ``config.dead_code_steps`` steps as in training."""
    model = _wrap(base, config)
    t0, tokens = time.perf_counter(), 0
    for name, layer in model.codebooks.items():
        gen = torch.Generator().manual_seed(opts.seed)
        layer.kmeans_init_(cache.sample(name, kmeans_samples, opts.seed), config.kmeans_iters, gen)
        layer.train()
        opt = torch.optim.Adam([layer.codes], lr=opts.lr or 1e-3)
        step = 0
        while step < opts.steps:
            for x in cache.batches(name, opts.batch_tokens, opts.seed + step):
                layer(x)
                layer.last_losses.recon.backward()
                opt.step()
                opt.zero_grad()
                step += 1
                tokens += x.shape[0]
                if config.dead_code_steps and step % config.dead_code_steps == 0:
                    layer.replace_dead_codes(config.dead_code_steps, config.dead_code_noise,
                                             gen)
                if log is not None and (step % 100 == 0 or step == opts.steps):
                    log(name, step, float(layer.last_losses.recon.detach()))
                if step >= opts.steps:
                    break
        layer.eval()
        layer.reset_metrics()
    model.eval()
    return Fitted(model, time.perf_counter() - t0, tokens)


def sae_model(base: nn.Module, config: CodebookConfig, cache: ActivationCache,
              opts: FitOptions, l0_multiplier: int = 1, save_to: str | Path | None = None,
              log: Callable[[str, int, float], None] | None = None) -> Fitted:
    """A sparsify TopK SAE per site of ``config``: ``groups * num_codes`` latents (the
    codebook's dictionary size) and k = ``l0_multiplier * groups * k`` (its L0), trained on
    the cache; saved in sparsify's format (``<save_to>/<site>/{cfg.json, sae.safetensors}``)."""
    model = _wrap(base, config)
    t0, tokens, info = time.perf_counter(), 0, {}
    for name, layer in list(model.codebooks.items()):
        latents = layer.groups * layer.num_codes
        k = l0_multiplier * layer.groups * config.k
        coder = new_sparse_coder(layer.dim, latents, k, opts.seed)

        def batches(name: str = name) -> Any:
            return cache.batches(name, opts.batch_tokens, opts.seed)

        info[name] = train_sparse_coder(coder, batches, opts.steps, opts.lr,
                                        log=None if log is None else
                                        (lambda s, f, n=name: log(n, s, f)))
        tokens += opts.steps * opts.batch_tokens
        sae = SparseCoderLayer(coder)
        sae.set_mean_activations(x for i, x in zip(range(8), batches(), strict=False))
        sae.eval()
        model.codebooks[name] = sae
        if save_to is not None:
            coder.save_to_disk(Path(save_to) / name)
    model.eval()
    return Fitted(model, time.perf_counter() - t0, tokens, info)
