"""TopK sparse autoencoders from EleutherAI's sparsify, in a codebook layer's place.

``SparseCoderLayer`` puts a ``sparsify.SparseCoder`` (the library's model: TopK architecture,
initialisation, encode/decode, save/load) where a ``CodebookLayer`` sits, so every analysis
written for codebook models (recording, interventions, the dictionary metrics, the FSM report)
runs on an SAE unchanged: the "codes" are the k active latents (inactive: -1), the code vectors
the decoder rows. An edited or forced latent takes its *mean active value* (``mean_act``,
measured on the training activations); a latent that never fired takes the mean over all
latents. The spliced output is the SAE's reconstruction, without an error term (the model
computes through the features, as it does through codebooks).

``train_sparse_coder`` is sparsify's recipe (unit-norm decoder, decoder-parallel gradient
removed, ``b_dec`` at the data mean, SignSGD under a schedule-free wrapper, the library's
learning-rate rule, AuxK on dead latents) as a plain loop over cached activations: sparsify's
own ``Trainer`` runs the model itself, batch by batch, and cannot read a cache.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from codebook.errors import ConfigError
from codebook.layer import CodebookLayer, LayerLosses

SAE_EXTRA = "pip install -e '.[sae]'  (eai-sparsify)"


def require_sparsify() -> Any:
    """The ``sparsify`` module, or a ConfigError that names the extra installing it."""
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder is CUDA-only
    try:
        import sparsify
    except ImportError as err:
        raise ConfigError("sae", f"eai-sparsify is not installed ({err})",
                          f"install the extra: {SAE_EXTRA}") from err
    return sparsify


def new_sparse_coder(dim: int, num_latents: int, k: int, seed: int = 0) -> Any:
    """A fresh fp32 TopK ``sparsify.SparseCoder`` (``num_latents`` latents, ``k`` active)."""
    sparsify = require_sparsify()
    if not 1 <= k <= num_latents:
        raise ConfigError("sae.k", f"L0 {k} must be in 1..{num_latents} (the dictionary size)",
                          "lower the SAE's k or enlarge the dictionary")
    torch.manual_seed(seed)
    cfg = sparsify.SparseCoderConfig(activation="topk", num_latents=num_latents, k=k)
    return sparsify.SparseCoder(dim, cfg, device="cpu", dtype=torch.float32)


class SparseCoderLayer(CodebookLayer):
    """A ``sparsify.SparseCoder`` behind the ``CodebookLayer`` interface (one group)."""

    def __init__(self, coder: Any):
        super().__init__(coder.d_in, coder.num_latents, coder.cfg.k, groups=1, init_std=0.0)
        self.coder = coder
        self.codes = torch.nn.Parameter(coder.W_dec.data.unsqueeze(0), requires_grad=False)
        self.register_buffer("mean_act", torch.zeros(coder.num_latents))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k latent (ids, values) (n, k) for x (n, dim); ids -1 where the value is 0."""
        acts, ids, _ = self.coder.encode(x.to(self.coder.dtype))
        return ids.masked_fill(acts <= 0, -1), acts

    def decode(self, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Reconstruction (n, dim) from (n, m) latent ids (-1 skipped) and values."""
        w = torch.where(ids >= 0, values, 0).to(self.coder.dtype)
        out = F.embedding_bag(ids.clamp_min(0), self.coder.W_dec, mode="sum",
                              per_sample_weights=w)
        return out + self.coder.b_dec

    @torch.no_grad()
    def set_mean_activations(self, batches: Iterable[torch.Tensor]) -> None:
        """``mean_act``: each latent's mean value where active over ``batches`` (n, dim)."""
        total = torch.zeros(self.num_codes, dtype=torch.float64)
        count = torch.zeros(self.num_codes, dtype=torch.float64)
        for x in batches:
            ids, acts = self.encode(x)
            live = ids >= 0
            total.index_add_(0, ids[live], acts[live].double())
            count.index_add_(0, ids[live], torch.ones_like(acts[live], dtype=torch.float64))
        fallback = total.sum() / count.sum().clamp_min(1)
        self.mean_act.copy_(torch.where(count > 0, total / count.clamp_min(1), fallback).float())

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if not self.enabled:
            if self.recording and self.record_inputs:
                self.recorded_inputs.append(x.detach())
            return x
        lead, raw = x.shape[:-1], x
        flat = x.reshape(-1, self.dim)
        ids, acts = self.encode(flat)
        ids, acts = ids.unsqueeze(1), acts.unsqueeze(1)  # (n, 1, k): one group
        if self.editors:
            edited, keep = self._apply_editors(ids.clamp_min(0), lead, positions)
            k = ids.shape[-1]
            values = self.mean_act[edited].to(acts.dtype)  # edited or forced: mean active value
            same = edited[..., :k] == ids.clamp_min(0)
            values[..., :k] = torch.where(same, acts, values[..., :k])
            alive = torch.ones_like(edited, dtype=torch.bool)
            alive[..., :k] = ids >= 0
            ids = edited.masked_fill(~(keep & alive) | (values <= 0), -1)
            acts = values
        out = self.decode(ids[:, 0], acts[:, 0]).to(x.dtype)
        err = (out.float() - flat.float()).pow(2).sum(-1)
        self.last_losses = LayerLosses(recon=err.mean(), commit=err.mean())
        if self.track_stats:
            self._update_stats(flat.float().unsqueeze(1), out.float().unsqueeze(1),
                               ids.clamp_min(0), ids >= 0, err)
        if self.recording:
            self.recorded_codes.append(ids.reshape(*lead, 1, -1))
            if self.record_scores:  # a latent's score is its activation
                self.recorded_scores.append(acts.float().masked_fill(ids < 0, float("nan"))
                                            .reshape(*lead, 1, -1))
            if self.record_inputs:
                self.recorded_inputs.append(raw.detach())
        return out.reshape(raw.shape)


def train_sparse_coder(coder: Any, batches: Callable[[], Iterable[torch.Tensor]], steps: int,
                       lr: float | None = None, auxk_alpha: float = 1 / 32,
                       dead_tokens: int = 100_000, log: Callable[[int, float], None] | None = None,
                       log_every: int = 100) -> dict[str, float]:
    """Train ``coder`` for ``steps`` batches drawn from ``batches()`` (re-called when it runs
    out), sparsify's recipe (module docstring); ``log(step, fvu)`` every ``log_every`` steps
    and at the end (the only host syncs). Returns the final fvu and dead-latent share."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify.sign_sgd import SignSGD

    lr = lr or 5e-3 / math.sqrt(coder.num_latents / 2**14)  # sparsify's rule for signum
    opt = ScheduleFreeWrapper(SignSGD([{"params": coder.parameters(), "lr": lr}]), momentum=0.95)
    opt.train()
    since_fired = torch.zeros(coder.num_latents, dtype=torch.long)
    step, fvu = 0, None
    while step < steps:
        for x in batches():
            x = x.to(coder.dtype)
            if step == 0:
                coder.b_dec.data = x.mean(0)
            coder.set_decoder_norm_to_unit_norm()
            dead = since_fired > dead_tokens if auxk_alpha > 0 else None
            out = coder(x, dead_mask=dead)
            loss = out.fvu + auxk_alpha * out.auxk_loss
            loss.backward()
            coder.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            since_fired += x.shape[0]
            since_fired[out.latent_indices.flatten()] = 0
            fvu = out.fvu.detach()
            step += 1
            if log is not None and (step % log_every == 0 or step == steps):
                log(step, float(fvu))
            if step >= steps:
                break
        else:
            if step == 0:
                raise ConfigError("activation cache", "holds no activations",
                                  "collect the cache again (it is empty)")
    opt.eval()  # schedule-free: the averaged weights are the trained ones
    coder.set_decoder_norm_to_unit_norm()
    return {"fvu": math.nan if fvu is None else float(fvu),
            "dead_fraction": float((since_fired > dead_tokens).float().mean())}
