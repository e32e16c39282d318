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
learning-rate rule, AuxK or multi-TopK for dead latents) as a loop over cached activations
(``codebook.compare.fitting``: sparsify's batch, a token budget, a validation plateau):
sparsify's own ``Trainer`` runs the model itself, batch by batch, and cannot read a cache.

Dead latents: in eai-sparsify 1.3.3 the fused encoder's backward drops the gradient of the
pre-activations, and AuxK and multi-TopK reach the encoder only through them, so a dead latent's
encoder row never moves and it cannot revive. ``new_sparse_coder`` returns a subclass whose
encoder, while ``grad_preacts`` is set (during training, whenever some latent is dead or
multi-TopK is on), is the same linear + ReLU + top-k in plain autograd.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from codebook.compare.fitting import FiringClock, FitOptions, FitRecord, fit_to_budget
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


def new_sparse_coder(dim: int, num_latents: int, k: int, seed: int = 0,
                     multi_topk: bool = False) -> Any:
    """A fresh fp32 TopK sparse coder (``num_latents`` latents, ``k`` active): sparsify's
    ``SparseCoder`` with an encoder that can pass the pre-activations' gradient on."""
    sparsify = require_sparsify()
    if not 1 <= k <= num_latents:
        raise ConfigError("sae.k", f"L0 {k} must be in 1..{num_latents} (the dictionary size)",
                          "lower the SAE's k or enlarge the dictionary")
    torch.manual_seed(seed)
    cfg = sparsify.SparseCoderConfig(activation="topk", num_latents=num_latents, k=k,
                                     multi_topk=multi_topk)
    return _trainable_class()(dim, cfg, device="cpu", dtype=torch.float32)


@functools.cache
def _trainable_class() -> type:
    sparsify = require_sparsify()
    from sparsify.fused_encoder import EncoderOutput

    class TrainableSparseCoder(sparsify.SparseCoder):
        """sparsify's SparseCoder; with ``grad_preacts`` its encoder is plain autograd, so the
        AuxK and multi-TopK losses reach the encoder (module docstring)."""

        grad_preacts = False

        def encode(self, x: torch.Tensor) -> Any:
            if not self.grad_preacts or self.cfg.activation != "topk":
                return super().encode(x)
            if not self.cfg.transcode:
                x = x - self.b_dec
            pre = F.relu(F.linear(x, self.encoder.weight, self.encoder.bias))
            values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return EncoderOutput(values, indices, pre)

    return TrainableSparseCoder


class SparseCoderLayer(CodebookLayer):
    """A ``sparsify.SparseCoder`` behind the ``CodebookLayer`` interface (one group)."""

    def __init__(self, coder: Any):
        super().__init__(coder.d_in, coder.num_latents, coder.cfg.k, groups=1, init_std=0.0)
        self.coder = coder
        self.codes = torch.nn.Parameter(coder.W_dec.data.unsqueeze(0), requires_grad=False)
        self.register_buffer("mean_act", torch.zeros(coder.num_latents))
        self.register_buffer("max_act", torch.zeros(coder.num_latents))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k latent (ids, values) (n, k) for x (n, dim), largest value first (sparsify's
        top-k is unsorted: sorted, a forced latent takes the weakest slot, as a forced code
        does); ids -1 where the value is 0."""
        acts, ids, _ = self.coder.encode(x.to(self.coder.dtype))
        acts, order = acts.sort(dim=-1, descending=True)
        ids = ids.gather(-1, order)
        return ids.masked_fill(acts <= 0, -1), acts

    def decode(self, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Reconstruction (n, dim) from (n, m) latent ids (-1 skipped) and values."""
        w = torch.where(ids >= 0, values, 0).to(self.coder.dtype)
        out = F.embedding_bag(ids.clamp_min(0), self.coder.W_dec, mode="sum",
                              per_sample_weights=w)
        return out + self.coder.b_dec

    @torch.no_grad()
    def set_activation_stats(self, batches: Iterable[torch.Tensor]) -> None:
        """``mean_act`` and ``max_act``: each latent's mean and largest value where active
        over ``batches`` (n, dim); a latent that never fired gets the means over all."""
        total = torch.zeros(self.num_codes, dtype=torch.float64)
        count = torch.zeros(self.num_codes, dtype=torch.float64)
        top = torch.zeros(self.num_codes, dtype=torch.float64)
        for x in batches:
            ids, acts = self.encode(x)
            live = ids >= 0
            total.index_add_(0, ids[live], acts[live].double())
            count.index_add_(0, ids[live], torch.ones_like(acts[live], dtype=torch.float64))
            top.index_reduce_(0, ids[live], acts[live].double(), "amax")
        fired = count > 0
        mean = torch.where(fired, total / count.clamp_min(1), total.sum() / count.sum().clamp(1))
        self.mean_act.copy_(mean.float())
        self.max_act.copy_(torch.where(fired, top, top[fired].mean() if fired.any() else 0.0)
                           .float())

    def _edited(self, ids: torch.Tensor, acts: torch.Tensor, lead: Sequence[int],
                positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The editors' work on (n, 1, k) latents: a patch carrying recorded values writes
        them as they were; every other edited or forced latent takes its mean active value."""
        patch = next((e for e in self.editors if getattr(e, "values", None) is not None), None)
        if patch is not None:
            ids, acts = self._write_patch(patch, ids, acts, lead, positions)
        others = [e for e in self.editors if e is not patch]
        if not others:
            return ids, acts
        saved, self.editors = self.editors, others
        try:
            edited, keep = self._apply_editors(ids.clamp_min(0), lead, positions)
        finally:
            self.editors = saved
        k = ids.shape[-1]
        values = self.mean_act[edited].to(acts.dtype)
        same = edited[..., :k] == ids.clamp_min(0)
        values[..., :k] = torch.where(same, acts, values[..., :k])
        alive = torch.ones_like(edited, dtype=torch.bool)
        alive[..., :k] = ids >= 0
        return edited.masked_fill(~(keep & alive) | (values <= 0), -1), values

    def _write_patch(self, patch: Any, ids: torch.Tensor, acts: torch.Tensor,
                     lead: Sequence[int], positions: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The recorded latents and values of ``patch`` (a ``patch_codes`` editor) in place of
        these at the positions it covers."""
        if len(lead) == 1:
            lead = (1, lead[0])
        b, t, k = math.prod(lead[:-1]), lead[-1], ids.shape[-1]
        pos = torch.arange(t, device=ids.device) if positions is None else positions
        src = patch.source.to(ids.device)
        val = torch.nan_to_num(patch.values.to(ids.device, acts.dtype), nan=0.0)
        n = src.shape[-1]
        if n < k:  # recorded with fewer slots: pad with inactive ones
            src = F.pad(src, (0, k - n), value=-1)
            val = F.pad(val, (0, k - n))
        at = pos < src.shape[1]
        if patch.positions is not None:
            at &= torch.isin(pos, patch.positions.to(pos.device))
        take = pos.clamp(max=src.shape[1] - 1)
        s_ids = src[:, take, :, :k].expand(b, t, 1, k)
        s_val = val[:, take, :, :k].expand(b, t, 1, k)
        where = at.view(1, t, 1, 1)
        ids = torch.where(where, s_ids, ids.view(b, t, 1, k)).reshape(-1, 1, k)
        acts = torch.where(where, s_val, acts.view(b, t, 1, k)).reshape(-1, 1, k)
        return ids, acts

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
            ids, acts = self._edited(ids, acts, lead, positions)
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


def train_sparse_coder(coder: Any, cache: Any, site: str, opts: FitOptions,
                       train_shards: list[int], val_shards: list[int],
                       log: Callable[[int, float], None] | None = None) -> FitRecord:
    """Train ``coder`` on one site of an ``ActivationCache`` by sparsify's recipe (module
    docstring) to ``opts``' token budget or validation plateau; returns the fit's record."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify.sign_sgd import SignSGD

    lr = opts.lr or 5e-3 / math.sqrt(coder.num_latents / 2**14)  # sparsify's rule for signum
    opt = ScheduleFreeWrapper(SignSGD([{"params": coder.parameters(), "lr": lr}]), momentum=0.95)
    opt.train()
    clock = FiringClock(coder.num_latents)
    val = cache.sample(site, opts.val_tokens, opts.seed, val_shards).to(coder.dtype)
    started = [False]
    auxk = opts.dead_latents == "auxk" and opts.auxk_alpha > 0
    multi = opts.dead_latents == "multi_topk"

    def step(x: torch.Tensor) -> None:
        x = x.to(coder.dtype)
        if not started[0]:
            coder.b_dec.data = x.mean(0)
            started[0] = True
        coder.set_decoder_norm_to_unit_norm()
        dead = clock.dead(opts.dead_tokens) if auxk else None
        coder.grad_preacts = multi or (dead is not None and bool(dead.any()))
        total = (x - x.mean(0)).pow(2).sum()
        for mb in x.split(opts.micro_batch_tokens):
            out = coder(mb, dead_mask=dead, total_variance=total)
            loss = out.fvu + opts.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
            loss.backward()
            clock.update(mb.shape[0], out.latent_indices)
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()

    @torch.no_grad()
    def validate() -> float:
        opt.eval()  # schedule-free: the averaged weights are the ones kept
        coder.grad_preacts = False
        fvu = float(coder(val).fvu)
        opt.train()
        return fvu

    record = fit_to_budget(
        step, validate,
        lambda epoch: cache.batches(site, opts.batch_tokens, opts.seed * 1009 + epoch,
                                    train_shards), opts, clock, log)
    opt.eval()
    coder.grad_preacts = False
    coder.set_decoder_norm_to_unit_norm()
    return record
