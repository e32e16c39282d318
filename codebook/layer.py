"""The codebook layer: replace an activation by the sum of its top-k most similar codes.

One ``CodebookLayer`` holds ``groups`` independent codebooks of ``num_codes`` codes each, over
``groups`` equal chunks of the activation (one per attention head at the per-head site). All
groups are scored in one batched matmul. Scores are computed without autograd, in chunks of
tokens, so the (tokens x num_codes) score matrix is never kept for backward; only the chosen
indices are. Gradients: straight-through to the input, and to the codes through the task loss
and the reconstruction loss ``mean_tokens(sum_d (out - sg[in])^2)``.

Selection: on a GPU with Triton installed, a fused kernel scores and keeps each row's top-k on
chip (``codebook.kernels.fused_topk``, k <= 64); otherwise, and always on the CPU, PyTorch
scores chunks of rows into one reused buffer sized per device (``CHUNK_BYTES``) and selects in
two cheap passes (:func:`topk_indices`). Both give the indices of ``torch.topk`` over the fp32
scores, up to ties. Cosine ranks by ``x . c/|c|``: dividing by ``|x|`` changes no row's order.

Precision: scoring, k-means and the loss terms run in fp32 whatever the compute dtype (in bf16,
euclidean's ``2x.c - |c|^2`` cancels badly and near-ties are decided by rounding), and the
statistics buffers stay fp32 under any ``.to(dtype)`` cast (in bf16 a count stops at 256).
Under activation checkpointing the recomputed forward (run inside backward) updates no
statistics, so each token is counted once, and with :func:`reuse_selections` as the
checkpoint's ``context_fn`` it reuses the codes the forward pass chose instead of scoring again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from codebook.config import SCORE_ALIASES, SCORES, Combine, Score
from codebook.selection import select_chunked, topk_indices
from codebook.selection_tape import (
    in_backward,
    record_selection,
    replayed_selection,
    reuse_selections,
)

__all__ = ["CHUNK_BYTES", "CodebookLayer", "CodeEditor", "LayerLosses", "reuse_selections",
           "topk_indices"]


class CodeEditor(Protocol):
    """An intervention: edits the chosen codes of one layer before they are combined."""

    def disabled_mask(self, layer: CodebookLayer) -> torch.Tensor | None:
        """(groups, num_codes) bool of codes barred from selection, or None."""

    def edit(
        self, idx: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Edit (batch, seq, groups, n) code ids and weights; ``positions`` is (seq,) absolute."""


@dataclass
class LayerLosses:
    recon: torch.Tensor
    commit: torch.Tensor


# The fp32 scores of one chunk of rows, by device, when ``score_chunk_tokens`` is None (measured:
# benchmarks/results/speed_cpu.md, benchmarks/results/gpu.md). CPU: a chunk that stays in the
# last-level cache, in one buffer per call (a fresh score-sized tensor per chunk pays page faults
# on every call). CUDA, PyTorch path: large chunks (65,536 rows of 10,000 codes were faster than
# 4,096 on an H200); the fused kernel writes no scores and needs no chunks.
CHUNK_BYTES = {"cpu": 8 * 2**20, "cuda": 65536 * 10000 * 4}
SelectBackend = Literal["auto", "torch", "triton"]
# The selection of layers built without ``select_backend`` (benchmarks set "torch" to measure
# the PyTorch path on a GPU).
DEFAULT_SELECT_BACKEND: SelectBackend = "auto"


class CodebookLayer(nn.Module):
    """``groups`` codebooks of ``num_codes`` codes over an activation of width ``dim``."""

    def __init__(
        self,
        dim: int,
        num_codes: int,
        k: int,
        groups: int = 1,
        score: Score = "cosine",
        combine: Combine = "sum",
        layer_norm: bool = False,
        score_chunk_tokens: int | None = None,
        init_std: float = 1.0,
        recent_inputs: int = 0,
        select_backend: SelectBackend | None = None,
    ):
        super().__init__()
        if dim % groups:
            raise ValueError(f"groups={groups} must divide dim={dim}")
        if not 1 <= k <= num_codes:
            raise ValueError(f"k={k} must be in 1..num_codes={num_codes}")
        score = SCORE_ALIASES.get(score, score)
        if score not in SCORES:
            raise ValueError(f"unknown score {score!r}: use one of {SCORES}")
        self.dim, self.groups, self.group_dim = dim, groups, dim // groups
        self.num_codes, self.k = num_codes, k
        self.score, self.combine, self.layer_norm = score, combine, layer_norm
        select_backend = select_backend or DEFAULT_SELECT_BACKEND
        if select_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"select_backend={select_backend!r}: use 'auto', 'torch' or 'triton'")
        # (token, group) rows scored at once by the PyTorch path; None: by device (CHUNK_BYTES)
        self.score_chunk_tokens = score_chunk_tokens
        # 'auto': the fused Triton kernel on CUDA when Triton is installed and k <= its limit,
        # else PyTorch; 'triton' forces the kernel (on CPU tensors only under TRITON_INTERPRET=1)
        self.select_backend: SelectBackend = select_backend
        # False: the commitment term is a detached copy of the reconstruction term (the same
        # value) and builds no graph; CodebookModel sets it from commit_weight on every forward.
        self.commit_grad = True
        self.codes = nn.Parameter(torch.randn(groups, num_codes, self.group_dim) * init_std)
        # Running statistics, on the device, never synced per forward (see ``metrics``).
        self.register_buffer("code_counts", torch.zeros(groups, num_codes), persistent=False)
        self.register_buffer("stat_sums", torch.zeros(4), persistent=False)  # mse, |in|, |out|, n
        # Forward passes (in training) since each code last fired: drives dead-code replacement.
        self.register_buffer("steps_unused", torch.zeros(groups, num_codes, dtype=torch.long))
        self.register_buffer(
            "recent", torch.zeros(groups, recent_inputs, self.group_dim), persistent=False
        )
        self.recent_filled = False
        # Per-call state, owned by this layer (no globals): interventions and recordings.
        self.editors: list[CodeEditor] = []
        self.recording = False
        self.record_inputs = False
        self.record_scores = False
        self.track_stats = False  # update running statistics outside training mode too
        self.recorded_codes: list[torch.Tensor] = []
        self.recorded_inputs: list[torch.Tensor] = []
        self.recorded_scores: list[torch.Tensor] = []
        self.last_losses: LayerLosses | None = None
        self.enabled = True

    # Buffers that accumulate: kept fp32 whatever dtype the module is cast to.
    _FP32_BUFFERS = ("code_counts", "stat_sums", "recent")

    def _apply(self, fn, recurse: bool = True):
        """Module casts (``.to(bf16)``, DeepSpeed's ``.bfloat16()``) leave the statistics fp32."""
        super()._apply(fn, recurse)
        for name in self._FP32_BUFFERS:
            buf = getattr(self, name)
            if buf.is_floating_point() and buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self

    # ------------------------------------------------------------------ scoring
    def chunk_rows(self, device: torch.device, width: int | None = None) -> int:
        """(token, group) rows scored at once: ``score_chunk_tokens``, or by device,
        ``CHUNK_BYTES`` of fp32 scores of ``width`` (default ``num_codes``) codes. The CPU
        scores one group at a time (each group's matrix product then has that many rows); other
        devices score all groups of ``rows // groups`` tokens at once."""
        rows = self.score_chunk_tokens
        if rows is None:
            budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"])
            rows = budget // (4 * (width or self.num_codes))
        return max(1, rows)

    def _fused_applies(self, x: torch.Tensor, k: int) -> bool:
        """Whether :meth:`select` runs the fused Triton kernel."""
        if self.select_backend == "torch":
            return False
        from codebook.kernels import FUSED_TOPK_MAX_K, triton_available

        if self.select_backend == "triton" and not triton_available():
            raise RuntimeError("select_backend='triton' needs Triton: pip install "
                               "'codebook[kernels]' (or use 'auto')")
        return (k <= FUSED_TOPK_MAX_K
                and (self.select_backend == "triton" or (x.is_cuda and triton_available())))

    @torch.no_grad()
    def select(self, x: torch.Tensor, k: int | None = None,
               disabled: torch.Tensor | None = None) -> torch.Tensor:
        """Top-k code ids (n, groups, k) for x (n, groups, group_dim), best first: the fused
        kernel where it applies (see ``select_backend``), else PyTorch in chunks of rows."""
        k = self.k if k is None else k
        if disabled is not None and int((~disabled).sum(-1).min()) < k:
            # fewer than k codes left to choose from: torch.topk's choice among barred codes
            return self._select_torch(x, k, disabled, blocks=False)
        if self._fused_applies(x, k):
            from codebook.kernels.fused_topk import fused_topk

            return fused_topk(x, self.codes.detach(), k, self.score, disabled)[0]
        return self._select_torch(x, k, disabled)

    def _select_torch(self, x: torch.Tensor, k: int, disabled: torch.Tensor | None,
                      blocks: bool = True, per_group: bool | None = None) -> torch.Tensor:
        """The PyTorch path (:func:`codebook.selection.select_chunked`) with this layer's codes,
        score and chunk size."""
        return select_chunked(x, self.codes.detach(), k, self.score, disabled,
                              lambda width: self.chunk_rows(x.device, width), blocks, per_group)

    @torch.no_grad()
    def code_scores(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The similarity (n, groups, m) of x (n, groups, group_dim) to the codes ``idx``
        (n, groups, m) under this layer's score: cosine, inner product, or for euclidean the
        negative distance (larger is always closer)."""
        x = x.float().unsqueeze(2)  # (n, g, 1, d)
        offsets = (torch.arange(self.groups, device=idx.device) * self.num_codes).view(1, -1, 1)
        table = self.codes.detach().float().reshape(-1, self.group_dim)
        c = F.embedding(idx.clamp_min(0) + offsets, table)  # (n, g, m, d)
        if self.score == "euclidean":
            return -(x - c).norm(dim=-1)
        if self.score == "inner":
            return (x * c).sum(-1)
        return F.cosine_similarity(x, c, dim=-1)

    def lookup(self, idx: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Combine codes: (n, groups, m) ids (+ optional 0/1 weights) -> (n, groups, group_dim)."""
        n, g, m = idx.shape
        offsets = (torch.arange(g, device=idx.device) * self.num_codes).view(1, g, 1)
        flat = (idx + offsets).reshape(n * g, m)
        w = None if weight is None else weight.reshape(n * g, m).to(self.codes.dtype)
        table = self.codes.reshape(g * self.num_codes, self.group_dim)
        out = F.embedding_bag(flat, table, mode="sum", per_sample_weights=w)
        out = out.view(n, g, self.group_dim)
        if self.combine == "mean":
            denom = float(m) if weight is None else weight.sum(-1, keepdim=True).clamp_min(1)
            out = out / denom
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Quantise ``x`` (..., dim); ``positions`` (seq,) are absolute token positions."""
        if not self.enabled:
            if self.recording and self.record_inputs:
                self.recorded_inputs.append(x.detach())
            return x
        lead = x.shape[:-1]
        raw = x
        x = x.reshape(-1, self.groups, self.group_dim)
        if self.layer_norm:
            x = F.layer_norm(x, (self.group_dim,))
        replayed = replayed_selection(self, x.shape[0]) if in_backward() else None
        if replayed is not None:  # checkpoint recompute: the forward pass's codes
            idx, weight = replayed
        else:
            idx = self.select(x, disabled=self._disabled_mask())
            weight = None
            if self.editors:
                idx, weight = self._apply_editors(idx, lead, positions)
            record_selection(self, idx, weight)
        out = self.lookup(idx, weight).to(x.dtype)
        out32, x32 = out.float(), x.float()
        err = (out32 - x32.detach()).pow(2).sum(dim=(-1, -2))
        recon = err.mean()
        if self.commit_grad:
            commit = (x32 - out32.detach()).pow(2).sum(dim=(-1, -2)).mean()
        else:  # the same value ((a - b)^2 = (b - a)^2 exactly), no graph
            commit = recon.detach()
        self.last_losses = LayerLosses(recon=recon, commit=commit)
        if (self.training or self.track_stats) and not in_backward():
            self._update_stats(x32, out32, idx, weight, err)
        if self.recording and not in_backward():
            ids = idx if weight is None else idx.masked_fill(weight == 0, -1)
            self.recorded_codes.append(ids.reshape(*lead, self.groups, -1))
            if self.record_scores:
                scores = self.code_scores(x, idx)
                if weight is not None:
                    scores = scores.masked_fill(weight == 0, float("nan"))
                self.recorded_scores.append(scores.reshape(*lead, self.groups, -1))
            if self.record_inputs:
                self.recorded_inputs.append(raw.detach())
        out = out + (x - x.detach())  # straight-through: d out / d x = identity
        return out.reshape(raw.shape)

    def _disabled_mask(self) -> torch.Tensor | None:
        masks = [m for e in self.editors if (m := e.disabled_mask(self)) is not None]
        if not masks:
            return None
        mask = masks[0]
        for m in masks[1:]:
            mask = mask | m
        return mask

    def _apply_editors(self, idx: torch.Tensor, lead: Sequence[int],
                       positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if len(lead) == 1:  # (seq, dim) input without a batch dimension
            lead = (1, lead[0])
        b, t = math.prod(lead[:-1]), lead[-1]
        if positions is None:
            positions = torch.arange(t, device=idx.device)
        idx = idx.view(b, t, self.groups, -1)
        weight = torch.ones_like(idx, dtype=torch.bool)
        for editor in self.editors:
            idx, weight = editor.edit(idx, weight, positions)
        m = idx.shape[-1]
        return idx.reshape(b * t, self.groups, m), weight.reshape(b * t, self.groups, m)

    @torch.no_grad()
    def _update_stats(self, x, out, idx, weight, err) -> None:
        n = x.shape[0]
        ones = torch.ones_like(idx, dtype=self.code_counts.dtype)
        if weight is not None:
            ones = ones * weight
        batch_counts = torch.zeros_like(self.code_counts).scatter_add_(
            -1, _groups_last(idx), _groups_last(ones)
        )
        self.code_counts += batch_counts
        self.stat_sums += torch.stack([
            err.sum(),
            x.reshape(n, -1).norm(dim=-1).sum(),
            out.reshape(n, -1).norm(dim=-1).sum(),
            torch.full((), float(n), device=x.device),
        ]).to(self.stat_sums.dtype)
        if self.training:
            self.steps_unused.add_(1).masked_fill_(batch_counts > 0, 0)  # in place, no realloc
            r = self.recent.shape[1]
            if r:
                pick = torch.randint(0, n, (r,), device=x.device)
                self.recent.copy_(x.detach()[pick].transpose(0, 1))
                self.recent_filled = True

    # ------------------------------------------------------------------ metrics
    @torch.no_grad()
    def metrics(self, reset: bool = True) -> dict[str, float]:
        """Reconstruction MSE, input/output norms, dead-code fraction since the last reset.

        This is the only place that syncs with the host; call it when logging.
        """
        mse, in_norm, out_norm, n = self.stat_sums.tolist()
        n = max(n, 1.0)
        dead = (self.code_counts == 0).float().mean().item()
        result = {
            "recon_mse": mse / n,
            "input_norm": in_norm / n,
            "output_norm": out_norm / n,
            "dead_code_fraction": dead,
        }
        if reset:
            self.reset_metrics()
        return result

    def reset_metrics(self) -> None:
        self.code_counts.zero_()
        self.stat_sums.zero_()

    # ------------------------------------------------------------------ training-time maintenance
    @torch.no_grad()
    def replace_dead_codes(self, min_unused_steps: int, noise: float,
                           generator: torch.Generator | None = None) -> torch.Tensor:
        """Re-seed codes unused for ``min_unused_steps`` from recent inputs plus noise.

        Returns the (groups, num_codes) mask of replaced codes (on the device; no host sync).
        """
        dead = self.steps_unused >= min_unused_steps
        if not self.recent_filled or self.recent.shape[1] == 0:
            return torch.zeros_like(dead)
        g, r, d = self.recent.shape
        pick = torch.randint(0, r, (g, self.num_codes), device=self.recent.device,
                             generator=generator)
        seeds = self.recent.gather(1, pick.unsqueeze(-1).expand(g, self.num_codes, d))
        scale = seeds.norm(dim=-1, keepdim=True) / d**0.5
        seeds = seeds + noise * scale * torch.randn(seeds.shape, device=seeds.device,
                                                    generator=generator)
        if self.combine == "sum":  # a sum of k codes should land at the scale of the input
            seeds = seeds / self.k
        self.codes.copy_(torch.where(dead.unsqueeze(-1), seeds.to(self.codes.dtype), self.codes))
        self.steps_unused.masked_fill_(dead, 0)
        return dead

    @torch.no_grad()
    def kmeans_init_(self, samples: torch.Tensor, iters: int = 10,
                     generator: torch.Generator | None = None) -> None:
        """Set the codes to k-means centroids of ``samples`` (n, dim) of real activations.

        With ``combine='sum'`` the centroids are divided by k, so that a sum of k codes starts at
        the scale of the activations.
        """
        x = samples.reshape(-1, self.groups, self.group_dim).float()
        if self.layer_norm:
            x = F.layer_norm(x, (self.group_dim,))
        n = x.shape[0]
        pick = torch.randint(0, n, (self.groups, self.num_codes), device=x.device,
                             generator=generator)
        xg = x.transpose(0, 1)  # (groups, n, d)
        centroids = xg.gather(1, pick.unsqueeze(-1).expand(-1, -1, self.group_dim)).clone()
        for _ in range(iters):
            assign = torch.cat([
                (2 * c.transpose(0, 1) @ centroids.transpose(1, 2)
                 - centroids.pow(2).sum(-1).unsqueeze(1)).argmax(-1)
                for c in x.split(max(1, self.chunk_rows(x.device) // self.groups))
            ], dim=1)  # (groups, n)
            sums = torch.zeros_like(centroids).scatter_add_(
                1, assign.unsqueeze(-1).expand(-1, -1, self.group_dim), xg)
            counts = torch.zeros(self.groups, self.num_codes, device=x.device).scatter_add_(
                1, assign, torch.ones_like(assign, dtype=torch.float))
            # empty clusters are re-seeded from random samples
            pick = torch.randint(0, n, (self.groups, self.num_codes), device=x.device,
                                 generator=generator)
            reseed = xg.gather(1, pick.unsqueeze(-1).expand(-1, -1, self.group_dim))
            centroids = torch.where((counts > 0).unsqueeze(-1),
                                    sums / counts.clamp_min(1).unsqueeze(-1), reseed)
        if self.combine == "sum":
            centroids = centroids / self.k
        self.codes.copy_(centroids)
        self.steps_unused.zero_()


def _groups_last(t: torch.Tensor) -> torch.Tensor:
    """(n, groups, m) -> (groups, n*m) so scatter along the last dim counts per group."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)
