"""The methods of the comparison, each as a ``CodebookModel`` over the same sites, so that one
scoring code serves them all (``codebook.compare.score``):

- ``codebook``: the end-to-end finetuned codebook model (its own weights);
- ``posthoc_codebook``: codebook layers of the same size and k fitted to the frozen base
  model's cached activations (k-means, then reconstruction training; the model untouched);
- ``sae``: sparsify TopK SAEs on the frozen base model; dictionary = the codebook's codes per
  site, L0 = the codebook's L0 (``sae_4x``: 4x; every method has such multiples);
- ``neuron``: nothing spliced; the base model's own units (``IdentityLayer`` records them).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from codebook.compare.cache import ActivationCache
from codebook.compare.fitting import FiringClock, FitOptions, FitRecord, fit_to_budget
from codebook.compare.sparse_coder import SparseCoderLayer, new_sparse_coder, train_sparse_coder
from codebook.config import CodebookConfig
from codebook.layer import CodebookLayer
from codebook.model import CodebookModel

METHODS = ("codebook", "posthoc_codebook", "sae", "neuron")
# Sparsity points: each dictionary method at L0 multiples of the codebook's k ("sae_4x": an SAE
# with 4x the codebook's L0; "codebook_2x": the end-to-end model trained at k = 2 x k).
SPARSE_METHODS = ("codebook", "posthoc_codebook", "sae")


def method_name(method: str, multiple: int) -> str:
    """``sae`` at L0 multiple 4 -> ``sae_4x``; multiple 1 keeps the plain name."""
    return method if multiple == 1 else f"{method}_{multiple}x"


def method_family(name: str) -> str:
    """The method a row name belongs to: ``sae_4x`` -> ``sae`` (:func:`method_name` undone)."""
    return re.sub(r"_\d+x$", "", name)


@dataclass
class Fitted:
    """A method's model, and what fitting it cost (``fits``: per site, the fit's record)."""

    model: CodebookModel
    train_seconds: float = 0.0
    train_tokens: int = 0
    fits: dict[str, FitRecord] | None = None
    dead_train: float | None = None  # an end-to-end model's, from its last training log

    @property
    def dead_fraction(self) -> float | None:
        """Mean over sites of the share of latents silent over the training window (at most
        the last 1M tokens; an end-to-end model: its last logging window)."""
        if not self.fits:
            return self.dead_train
        return sum(f.dead_fraction for f in self.fits.values()) / len(self.fits)

    @property
    def stopped_early(self) -> bool:
        return bool(self.fits) and any(f.stopped_early for f in self.fits.values())


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
    k-means on a sample of the training shards, then the reconstruction loss alone (Adam), to
    ``opts``' budget or plateau (``codebook.compare.fitting``); dead codes re-seeded as in
    training."""
    model = _wrap(base, config)
    train_shards, val_shards = cache.split(opts.val_fraction, opts.seed)
    fits = {}
    for name, layer in model.codebooks.items():
        gen = torch.Generator().manual_seed(opts.seed)
        layer.kmeans_init_(cache.sample(name, kmeans_samples, opts.seed, train_shards),
                           config.kmeans_iters, gen)
        fits[name] = _fit_codebook(layer, config, cache, name, opts, train_shards, val_shards,
                                   gen, None if log is None else
                                   (lambda t, f, n=name: log(n, t, f)))
    model.eval()
    return Fitted(model, sum(f.seconds for f in fits.values()),
                  sum(f.tokens for f in fits.values()), fits)


def _fit_codebook(layer: CodebookLayer, config: CodebookConfig, cache: ActivationCache,
                  name: str, opts: FitOptions, train_shards: list[int], val_shards: list[int],
                  gen: torch.Generator, log: Callable[[int, float], None] | None) -> FitRecord:
    layer.train()
    opt = torch.optim.Adam([layer.codes], lr=opts.lr or 1e-3)
    clock = FiringClock(layer.groups * layer.num_codes)
    val = cache.sample(name, opts.val_tokens, opts.seed, val_shards)

    def step(x: torch.Tensor) -> None:
        for mb in x.split(opts.micro_batch_tokens):
            layer(mb)
            (layer.last_losses.recon * (mb.shape[0] / x.shape[0])).backward()
        opt.step()
        opt.zero_grad()
        clock.update(x.shape[0], layer.code_counts.flatten().nonzero().flatten())
        layer.reset_metrics()
        if config.dead_code_steps:
            layer.replace_dead_codes(config.dead_code_steps, config.dead_code_noise, gen)

    @torch.no_grad()
    def validate() -> float:
        layer.eval()
        q = layer(val)
        layer.train()
        return float((q - val).pow(2).sum() / (val - val.mean(0)).pow(2).sum())

    record = fit_to_budget(
        step, validate,
        lambda epoch: cache.batches(name, opts.batch_tokens, opts.seed * 1009 + epoch,
                                    train_shards), opts, clock, log)
    layer.eval()
    layer.reset_metrics()
    return record


def sae_model(base: nn.Module, config: CodebookConfig, cache: ActivationCache,
              opts: FitOptions, l0_multiplier: int = 1, save_to: str | Path | None = None,
              log: Callable[[str, int, float], None] | None = None) -> Fitted:
    """A sparsify TopK SAE per site of ``config``: ``groups * num_codes`` latents (the
    codebook's dictionary size) and k = ``l0_multiplier * groups * k`` (its L0), trained on
    the cache's training shards to ``opts``' budget or plateau; saved in sparsify's format
    (``<save_to>/<site>/{cfg.json, sae.safetensors}``)."""
    model = _wrap(base, config)
    train_shards, val_shards = cache.split(opts.val_fraction, opts.seed)
    fits = {}
    for name, layer in list(model.codebooks.items()):
        latents = layer.groups * layer.num_codes
        k = l0_multiplier * layer.groups * config.k
        coder = new_sparse_coder(layer.dim, latents, k, opts.seed,
                                 multi_topk=opts.dead_latents == "multi_topk")
        fits[name] = train_sparse_coder(coder, cache, name, opts, train_shards, val_shards,
                                        None if log is None else
                                        (lambda t, f, n=name: log(n, t, f)))
        sae = SparseCoderLayer(coder)
        batches = cache.batches(name, opts.micro_batch_tokens, opts.seed, train_shards)
        sae.set_activation_stats(x for _, x in zip(range(8), batches, strict=False))
        sae.eval()
        model.codebooks[name] = sae
        if save_to is not None:
            coder.save_to_disk(Path(save_to) / name)
    model.eval()
    return Fitted(model, sum(f.seconds for f in fits.values()),
                  sum(f.tokens for f in fits.values()), fits)
