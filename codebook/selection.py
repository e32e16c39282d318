"""PyTorch top-k selection over score rows, and the reused scratch memory scoring writes into.

:func:`topk_indices` gives ``scores.topk(k).indices`` (up to ties) in two cheap passes: block
maxima, then a selection among the best blocks' scores. :func:`scratch` hands out per-thread
buffers reused across calls and layers on the CPU. :func:`select_chunked` scores rows in chunks
and selects; ``codebook.layer.CodebookLayer`` uses it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F


def block_size(n: int, k: int) -> int | None:
    """Codes per block for :func:`topk_indices` over ``n`` codes, or None where blocks do not
    pay (large k, few codes). A multiple of the SIMD width: the block maxima are one
    vectorised pass (blocks of 100 or 125 codes ran 2-4x slower than 128 on CPU); 128 for
    k = 1, 64 for larger k (its k x block candidates are what the second pass sorts)."""
    if k > 32:
        return None
    for block in (128, 64) if k == 1 else (64, 32):  # k > 1: fewer candidates (k x block)
        if -(-n // block) >= max(8, 4 * k):
            return block
    return None


def topk_indices(scores: torch.Tensor, k: int, block: int | None = None) -> torch.Tensor:
    """Indices of the ``k`` largest scores along the last dim, largest first; as
    ``scores.topk(k).indices`` (up to ties), in two cheap passes for large dims.

    The last dim is cut into blocks of ``block`` (default :func:`block_size`; a last dim that
    is not a multiple is padded with -inf, which a caller avoids by scoring into a padded
    buffer); the k blocks with the largest maxima hold every top-k score (a block holding one
    has a maximum >= the k-th largest score, and fewer than k blocks can beat it), so the top-k
    of those ``k * block`` candidates is exact. One vectorised max over the scores plus small
    selections replaces a selection over every score: on CPU ``torch.topk`` and ``argmax`` are
    several times slower than ``amax``, and on a GPU ``torch.topk`` over 10,000 codes was the
    layer's bottleneck. For k = 1 the two passes are argmaxes.
    """
    n = scores.shape[-1]
    if block is None:
        block = block_size(n, k)
    if block is None:
        if k == 1:
            return scores.argmax(-1, keepdim=True)
        return scores.topk(k, dim=-1).indices
    if n % block:
        scores = F.pad(scores, (0, block - n % block), value=float("-inf"))
    lead = scores.shape[:-1]
    nblocks = scores.shape[-1] // block
    rows = scores.reshape(-1, nblocks, block)  # a view of a contiguous score buffer
    maxima = rows.amax(-1)  # (r, nblocks)
    r = rows.shape[0]
    first = torch.arange(r, device=scores.device).unsqueeze(-1) * nblocks
    if k == 1:
        best = maxima.argmax(-1, keepdim=True)  # (r, 1)
        cand = rows.reshape(r * nblocks, block).index_select(0, (first + best).view(-1))
        return (best * block + cand.argmax(-1, keepdim=True)).view(*lead, 1)
    best = maxima.topk(k, dim=-1, sorted=False).indices  # (r, k) block ids
    cand = rows.reshape(r * nblocks, block).index_select(0, (first + best).view(-1))
    top = cand.view(r, k * block).topk(k, dim=-1).indices  # positions among the candidates
    ids = best.gather(-1, top // block) * block + top % block
    return ids.view(*lead, k)


# ---------------------------------------------------------------------- CPU scratch
_scratch_space = threading.local()  # per thread: name -> flat fp32 tensor


def scratch(name: str, numel: int, device: torch.device) -> torch.Tensor:
    """A flat fp32 tensor of ``numel`` (uninitialised) for scoring. On CPU it is kept per
    thread and reused across calls and layers: a fresh tensor over glibc's 32 MiB mmap limit
    is mapped and page-faulted on every call (~30 ms for a 41 MB right-hand side of 16 x
    10,000 x 64 codes, measured). Elsewhere a plain allocation (CUDA caches its own)."""
    if device.type != "cpu":
        return torch.empty(numel, device=device)
    space = getattr(_scratch_space, "tensors", None)
    if space is None:
        space = _scratch_space.tensors = {}
    buf = space.get(name)
    if buf is None or buf.numel() < numel:
        buf = space[name] = torch.empty(numel)
    return buf[:numel]


def score_operands(codes: torch.Tensor, score: str, width: int
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What scoring needs from the fp32 codes (groups, num_codes, group_dim), once per call
    rather than per chunk: the (groups, group_dim, width) right-hand side, zero past
    ``num_codes``, and for euclidean the (groups, 1, width) bias ``-|c|^2`` (-inf past
    ``num_codes``). Rows are ranked by ``x . rhs`` (inner; cosine, whose rhs is ``c/|c|``:
    ``|x|`` changes no row's order) or by ``x . rhs + bias`` with rhs ``2c`` (euclidean: the
    order of ``-|x - c|^2``). One pass over the codes writes the (scaled, padded) rhs."""
    g, c, dim = codes.shape
    bias = None
    if score == "cosine":  # F.normalize's floor on |c|, as a multiplier
        scale = torch.linalg.vector_norm(codes, dim=-1, keepdim=True).clamp_min_(1e-12)
        scale = scale.reciprocal_()
    elif score == "euclidean":
        bias = -torch.linalg.vecdot(codes, codes, dim=-1)
        scale = 2.0  # exact: the same scores as 2 (x . c)
    else:
        scale = None
    if scale is None and width == c:
        return codes.transpose(1, 2), None
    rhs = scratch("rhs", g * width * dim, codes.device).view(g, width, -1)
    if scale is None:
        rhs[:, :c].copy_(codes)
    else:
        torch.mul(codes, scale, out=rhs[:, :c])
    rhs[:, c:].zero_()
    if bias is not None:
        bias = F.pad(bias, (0, width - c), value=float("-inf")).unsqueeze(1)
    return rhs.transpose(1, 2), bias


def select_chunked(x: torch.Tensor, codes: torch.Tensor, k: int, score: str,
                   disabled: torch.Tensor | None, chunk_rows: Callable[[int], int],
                   blocks: bool = True, per_group: bool | None = None) -> torch.Tensor:
    """Top-k code ids (n, groups, k) of x (n, groups, group_dim) among ``codes`` (groups,
    num_codes, group_dim) under ``score``, barring ``disabled``: the PyTorch path. Each chunk
    of ``chunk_rows(width)`` rows is scored into one reused buffer (``addmm`` / ``mm`` with
    ``out=``, one group at a time; ``per_group=False``, the default off the CPU: ``baddbmm`` /
    ``bmm`` over all groups), then :func:`topk_indices` picks from it."""
    x = x.float()
    n, g, _ = x.shape
    num_codes = codes.shape[1]
    block = block_size(num_codes, k) if blocks else None
    width = num_codes if block is None else -(-num_codes // block) * block
    rhs, bias = score_operands(codes.float(), score, width)
    mask = None
    if disabled is not None:
        mask = F.pad(disabled, (0, width - num_codes), value=True).unsqueeze(1)
    fill_pad = mask is None and bias is None and width > num_codes
    rows = chunk_rows(width)
    out = torch.empty(n, g, k, dtype=torch.long, device=x.device)
    if per_group is None:
        per_group = x.device.type == "cpu"
    if per_group:  # one group at a time: in-cache chunks, full-height products
        buf = scratch("scores", min(rows, n) * width, x.device)
        for j in range(g):
            for start in range(0, n, rows):
                xc = x[start:start + rows, j]  # (m, group_dim), a view
                s = buf[: xc.shape[0] * width].view(xc.shape[0], width)
                if bias is None:
                    torch.mm(xc, rhs[j], out=s)
                else:
                    torch.addmm(bias[j], xc, rhs[j], out=s)
                if mask is not None:
                    s.masked_fill_(mask[j], float("-inf"))
                elif fill_pad:
                    s[:, num_codes:] = float("-inf")
                out[start:start + rows, j] = topk_indices(s, k, block)
        return out
    tokens = max(1, rows // g)
    buf = torch.empty(g * min(tokens, n) * width, device=x.device)
    for start in range(0, n, tokens):
        xg = x[start:start + tokens].transpose(0, 1)  # (groups, m, group_dim), a view
        s = buf[: g * xg.shape[1] * width].view(g, xg.shape[1], width)
        if bias is None:
            torch.bmm(xg, rhs, out=s)
        else:
            torch.baddbmm(bias, xg, rhs, out=s)
        if mask is not None:
            s.masked_fill_(mask, float("-inf"))
        elif fill_pad:
            s[..., num_codes:] = float("-inf")
        out[start:start + tokens] = topk_indices(s, k, block).transpose(0, 1)
    return out
