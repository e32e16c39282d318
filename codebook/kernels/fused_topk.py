"""Fused score + top-k on the GPU: each row's k best codes without writing the score matrix.

One Triton program takes ``BLOCK_M`` rows of one group (one head's codebook) and walks that
group's codes in tiles of ``BLOCK_N``: it scores the tile (``x . c`` on the tensor cores,
accumulated in fp32, then the score's epilogue), and merges it into each row's running top-k,
which stays in registers. Only the k winners per row are written: ``n x groups x k`` ids and
scores instead of ``n x groups x num_codes`` scores.

The merge is cheap when nothing changes: a tile is merged only where its row maximum beats the
row's current k-th best (after the first tiles that is rare: a new code enters the top-k of
``j`` tiles with probability about ``k / j``), by taking the tile's maximum, putting it in the
slot of the current k-th best and repeating while some row still has a tile score above its
k-th best.

Exact: the winners are those of ``torch.topk`` over the fp32 scores of the PyTorch path
(``codebook.layer``), up to ties and fp32 rounding: bf16 and fp16 inputs are multiplied exactly
and summed in fp32 (as the PyTorch path does after its upcast), fp32 inputs by ``tf32x3`` (three
TF32 products, about fp32's accuracy) unless ``precision`` says otherwise. Scores: ``inner``
(``x . c``), ``cosine`` (``x . c / |c|``: the same order as cosine similarity, since ``|x|`` is
the same for a row's codes) and ``euclidean`` (``2 x . c - |c|^2``: the order of ``-|x - c|``).
Equal scores: the lower code id wins and comes first.

Limits: ``k <= MAX_K`` (64; the layer falls back to PyTorch above it), and fewer than k usable
codes in a row (codes barred by an intervention) is left to the caller (the layer falls back).
NaN scores are never selected (``torch.topk`` ranks NaN first); a row with fewer than k finite
scores gets code 0 in the empty places.

Under Triton's interpreter (``TRITON_INTERPRET=1`` set before this module is imported) the same
kernel runs on CPU tensors, which is how the tests check it without a GPU. The interpreter
multiplies bf16 tiles as their raw 16-bit storage, so there bf16 tiles are converted to fp32
before the product (exact, the same products); the bf16 tensor-core product itself is checked
by ``benchmarks/fused_topk_check.py`` on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from codebook.kernels import FUSED_TOPK_MAX_K

MAX_K = FUSED_TOPK_MAX_K  # registers: BLOCK_M x next_pow2(k) values and ids per program
SCORE_IDS = {"inner": 0, "cosine": 1, "euclidean": 2}
LOW_PRECISION = (torch.bfloat16, torch.float16)


@triton.jit
def _fused_topk_kernel(
    x_ptr, c_ptr, aux_ptr, mask_ptr, idx_ptr, val_ptr,
    N, C, D,
    sxn, sxg, sxd, scg, scc, scd,
    K: tl.constexpr, KP: tl.constexpr, SCORE: tl.constexpr, HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, SINGLE_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    groups = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    slots = tl.arange(0, KP)
    cols = tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # Running top-k per row: slots >= K hold +inf (never the minimum, never replaced); empty
    # slots hold -inf and distinct negative ids, so one empty slot is filled at a time.
    vals = tl.where(slots[None, :] < K, float("-inf"), float("inf")) \
        + tl.zeros((BLOCK_M, KP), tl.float32)
    ids = (-1 - slots[None, :]) + tl.zeros((BLOCK_M, KP), tl.int32)
    kth = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # each row's current k-th best
    # 32-bit offsets (the wrapper checks that they fit) keep the pointer tiles small
    x_group = x_ptr + g * sxg
    c_group = c_ptr + g * scg
    aux_group = aux_ptr + g * C
    if SINGLE_K:  # the whole row fits one K step: load this block's rows once
        x_once = tl.load(x_group + rows[:, None] * sxn + ks[None, :] * sxd,
                         mask=row_ok[:, None] & (ks < D)[None, :], other=0.0)
        if UPCAST:
            x_once = x_once.to(tl.float32)
    for n0 in range(0, C, BLOCK_N):
        code = n0 + cols
        code_ok = code < C
        if SINGLE_K:
            ct = tl.load(c_group + code[None, :] * scc + ks[:, None] * scd,
                         mask=(ks < D)[:, None] & code_ok[None, :], other=0.0)
            if UPCAST:
                ct = ct.to(tl.float32)
            acc = tl.dot(x_once, ct, input_precision=PRECISION)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for d0 in range(0, D, BLOCK_K):
                d = d0 + ks
                d_ok = d < D
                xt = tl.load(x_group + rows[:, None] * sxn + d[None, :] * sxd,
                             mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                ct = tl.load(c_group + code[None, :] * scc + d[:, None] * scd,
                             mask=d_ok[:, None] & code_ok[None, :], other=0.0)
                if UPCAST:
                    xt = xt.to(tl.float32)
                    ct = ct.to(tl.float32)
                acc = tl.dot(xt, ct, acc, input_precision=PRECISION)
        if SCORE == 1:  # cosine order: x . c / |c|
            acc = acc * tl.load(aux_group + code, mask=code_ok, other=0.0)[None, :]
        if SCORE == 2:  # euclidean order: 2 x . c - |c|^2
            acc = 2.0 * acc - tl.load(aux_group + code, mask=code_ok, other=0.0)[None, :]
        usable = row_ok[:, None] & code_ok[None, :]
        if HAS_MASK:
            barred = tl.load(mask_ptr + g * C + code, mask=code_ok, other=1)
            usable = usable & (barred == 0)[None, :]
        s = tl.where(usable, acc, float("-inf"))
        best = tl.max(s, 1)
        while tl.max((best > kth).to(tl.int32), 0) > 0:
            take = best > kth
            # the tile's best code per row (equal scores: the lowest id) ...
            col = tl.min(tl.where(s == best[:, None], cols[None, :], BLOCK_N), 1)
            # ... replaces the current k-th best (equal k-th bests: the highest id goes)
            out_id = tl.max(tl.where(vals == kth[:, None], ids, -KP - 1), 1)
            put = take[:, None] & (vals == kth[:, None]) & (ids == out_id[:, None])
            vals = tl.where(put, best[:, None], vals)
            ids = tl.where(put, (n0 + col)[:, None], ids)
            s = tl.where(take[:, None] & (cols[None, :] == col[:, None]), float("-inf"), s)
            kth = tl.min(vals, 1)
            best = tl.max(s, 1)
    # Write the k winners best first; equal scores: the lower id first.
    live = (slots[None, :] < K) & (rows[:, None] >= 0)
    out = (rows * groups + g) * K
    for i in range(K):
        v = tl.where(live, vals, float("-inf"))
        top = tl.max(v, 1)
        tied = live & (v == top[:, None])
        pick = tl.min(tl.where(tied, ids, 2147483647), 1)
        live = live & ~(tied & (ids == pick[:, None]))
        pick = tl.where((pick >= 0) & (pick < C), pick, 0)  # empty places (see Limits): 0
        tl.store(idx_ptr + out + i, pick.to(tl.int64), mask=row_ok)
        tl.store(val_ptr + out + i, top, mask=row_ok)


# (BLOCK_M, BLOCK_N, warps, stages), tried once per shape on the GPU. Compiled for sm_90 here
# (no GPU): bf16 tiles take 200-255 registers a thread without spills; fp32 (tf32x3, three
# products per tile) spilled with 64-wide K steps and 3 stages, so it gets 32-wide K steps,
# 2 stages and these tiles (216-250 registers, no spills).
_CONFIGS_LOW = [(64, 64, 4, 3), (64, 128, 8, 3), (32, 128, 4, 3), (128, 64, 8, 3)]
_CONFIGS_FP32 = [(32, 64, 4, 2), (64, 64, 8, 2), (32, 128, 8, 2)]
_KEY = ["C", "D", "KP", "SCORE", "HAS_MASK", "PRECISION"]


def _tuned(configs: list[tuple[int, int, int, int]]):
    return triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                 for m, n, w, s in configs], key=_KEY)(_fused_topk_kernel)


_tuned_low, _tuned_fp32 = _tuned(_CONFIGS_LOW), _tuned(_CONFIGS_FP32)

# Under the interpreter: small fixed tiles, so the tests' small shapes cross several tiles and
# take both the one-K-step path (d <= 16) and the K loop (d > 16).
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}
_OFFSET_LIMIT = 2**31 - 1  # the kernel's offsets are 32-bit


def interpreted() -> bool:
    """True when this module's kernel runs under Triton's interpreter (CPU tensors)."""
    return not isinstance(_fused_topk_kernel, triton.runtime.JITFunction)


def code_aux(codes: torch.Tensor, score: str) -> torch.Tensor:
    """Per-code fp32 terms of the score's epilogue, (groups, num_codes): ``1 / |c|`` for
    cosine (``F.normalize``'s floor of 1e-12 on ``|c|``), ``|c|^2`` for euclidean."""
    c = codes.detach().float()
    if score == "cosine":
        return c.norm(dim=-1).clamp_min(1e-12).reciprocal()
    if score == "euclidean":
        return (c * c).sum(-1)
    return torch.zeros(c.shape[:2], device=c.device)


def _max_offset(t: torch.Tensor) -> int:
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))


def fused_topk(x: torch.Tensor, codes: torch.Tensor, k: int, score: str = "cosine",
               disabled: torch.Tensor | None = None, precision: str | None = None,
               blocks: dict[str, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best codes per row and group: ``(ids, scores)``, each (n, groups, k), best first.

    ``x`` (n, groups, d) and ``codes`` (groups, num_codes, d): both bf16 (or both fp16) are
    multiplied as they are; otherwise both in fp32 (``precision``: ``"tf32x3"`` by default,
    ``"ieee"`` or ``"tf32"``). ``disabled`` (groups, num_codes) bool bars codes. ``scores`` are
    in the kernel's order units (cosine: ``x . c / |c|``, euclidean: ``2 x . c - |c|^2``).
    ``blocks`` fixes ``BLOCK_M``/``BLOCK_N``/``BLOCK_K`` instead of the tuned choice, and may
    add Triton's launch options ``num_warps`` and ``num_stages``
    (``benchmarks/fused_topk_tune.py`` searches them).
    """
    if x.dim() != 3 or codes.dim() != 3 or x.shape[1] != codes.shape[0] \
            or x.shape[2] != codes.shape[2]:
        raise ValueError(f"fused_topk: x (n, groups, d) {tuple(x.shape)} does not match codes "
                         f"(groups, num_codes, d) {tuple(codes.shape)}")
    n, groups, d = x.shape
    num_codes = codes.shape[1]
    if not 1 <= k <= min(MAX_K, num_codes):
        raise ValueError(f"fused_topk: k={k} must be in 1..min({MAX_K}, num_codes={num_codes});"
                         " use the PyTorch path (codebook.selection.topk_indices) beyond it")
    if score not in SCORE_IDS:
        raise ValueError(f"fused_topk: unknown score {score!r}: use one of {list(SCORE_IDS)}")
    if x.device != codes.device:
        raise ValueError(f"fused_topk: x on {x.device}, codes on {codes.device}")
    low = x.dtype in LOW_PRECISION and codes.dtype == x.dtype
    if not low:
        x, codes = x.float(), codes.float()
    if _max_offset(codes) > _OFFSET_LIMIT or groups * num_codes > _OFFSET_LIMIT:
        raise ValueError(f"fused_topk: codes {tuple(codes.shape)} too large for 32-bit offsets")
    ids = torch.empty(n, groups, k, dtype=torch.long, device=x.device)
    vals = torch.empty(n, groups, k, dtype=torch.float32, device=x.device)
    # rows per launch: x's and the outputs' offsets stay 32-bit
    per_row = max(x.stride(0), groups * k, 1)
    step = max(1, min(n, (_OFFSET_LIMIT - _max_offset(x[:1])) // per_row))
    aux = code_aux(codes, score).contiguous()
    mask = aux if disabled is None else disabled.to(torch.uint8).contiguous()
    for start in range(0, n, step):
        _launch(x[start:start + step], codes, aux, mask, ids[start:start + step],
                vals[start:start + step], k, score, disabled is not None, low, precision,
                blocks)
    return ids, vals


def _launch(x, codes, aux, mask, ids, vals, k, score, has_mask, low, precision, blocks):
    n, groups, d = x.shape
    interp = interpreted()
    if low:
        precision = None
    elif precision is None:
        precision = "ieee" if interp else "tf32x3"
    if interp:
        block_k = INTERPRETER_BLOCKS["BLOCK_K"]
    else:
        widest = 128 if low else 64
        block_k = max(16, triton.next_power_of_2(d))
        if block_k > widest:
            block_k = 64 if low else 32
    if blocks and "BLOCK_K" in blocks:
        block_k = blocks["BLOCK_K"]
    args = (x, codes, aux, mask, ids, vals, n, codes.shape[1], d, *x.stride(), *codes.stride())
    meta = dict(K=k, KP=max(2, triton.next_power_of_2(k)), SCORE=SCORE_IDS[score],
                HAS_MASK=has_mask, UPCAST=low and interp, PRECISION=precision,
                SINGLE_K=block_k >= d, BLOCK_K=block_k)
    if blocks is not None or interp:
        fixed = {**(INTERPRETER_BLOCKS if interp else {}), **(blocks or {})}
        fixed.pop("BLOCK_K", None)
        if "BLOCK_M" not in fixed or "BLOCK_N" not in fixed:
            raise ValueError("fused_topk: blocks needs BLOCK_M and BLOCK_N")
        _fused_topk_kernel[(triton.cdiv(n, fixed["BLOCK_M"]), groups)](*args, **meta, **fixed)
        return
    kernel = _tuned_low if low else _tuned_fp32
    kernel[lambda cfg: (triton.cdiv(n, cfg["BLOCK_M"]), groups)](*args, **meta)
