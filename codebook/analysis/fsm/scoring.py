"""Next-state scoring: the model's distribution over the state after a position, and the
transition accuracies read from it (conventions: ``codebook.analysis.fsm``)."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from codebook.analysis.fsm.common import (
    as_tokens,
    device_of,
    eval_mode,
    logsumexp,
    progress,
    state_spellings,
)
from codebook.data.fsm import TokFSM
from codebook.model import CodebookModel


def next_state_scores(
    model: CodebookModel,
    fsm: TokFSM,
    tokens: Any,
    positions: Any,
    *,
    renormalise: bool = False,
    kv_cache: bool = True,
    batch_tokens: int = 1 << 15,
) -> np.ndarray:
    """Log-probability of every state being the next one after ``positions``: (n, num_states).

    ``tokens`` (n, T) BOS-prefixed sequences; ``positions`` (n,) or a scalar: the last digit of
    the current state in each row (a multiple of ``D``; 0 = BOS scores the first state). Tokens
    after a row's position are ignored (the candidate digits are teacher-forced there), so a
    position may be the last one of the sequence. See ``codebook.analysis.fsm`` for the
    normalisation. Rows are processed in passes of about ``batch_tokens`` tokens.

    ``kv_cache=True`` runs each context once and the ``(D-1)``-digit candidate prefixes from its
    key/value cache (the cache repeated per prefix, keys after a row's own position masked out,
    rotary/absolute positions given explicitly): about ``P`` times cheaper than
    ``kv_cache=False``, which runs context + prefix afresh for each of the ``P`` prefixes. Both
    give the same scores.
    """
    tok = as_tokens(tokens)
    n, seq_len = tok.shape
    d = fsm.digits_per_state
    pos = np.broadcast_to(np.asarray(positions, dtype=np.int64), (n,)).copy()
    if n == 0:
        return np.empty((0, fsm.num_states))
    if (pos < 0).any() or (pos >= seq_len).any() or (pos % d).any():
        raise ValueError(
            f"positions must be state positions: multiples of {d} in [0, {seq_len})"
        )
    digits, prefixes, prefix_idx = state_spellings(fsm)
    n_prefix = len(prefixes)
    device = device_of(model)
    out = np.empty((n, fsm.num_states), dtype=np.float64)
    order = np.argsort(pos, kind="stable")  # similar positions together: shorter inputs
    state_digit = torch.as_tensor(digits)
    state_prefix = torch.as_tensor(prefix_idx)
    # Tokens a row costs: P copies of context + prefix (plain), or P copies of its cache.
    cost = n_prefix * (pos[order] + d)
    with eval_mode(model):
        for start, stop in progress(_passes(cost, batch_tokens), "next-state scores",
                                    unit="pass"):
            chunk = order[start:stop]
            if kv_cache:
                lp = _cached_pass(model, tok, chunk, pos[chunk], prefixes, d, device)
            else:
                lp = _plain_pass(model, tok, chunk, pos[chunk], prefixes, d, device)
            c = len(chunk)
            lp = lp.view(c, n_prefix, d, -1)
            total = torch.zeros((c, fsm.num_states), dtype=torch.float64)
            for j in range(d):
                total += lp[:, state_prefix, j, state_digit[:, j]]
            out[chunk] = total.numpy()
    if renormalise:
        out = out - logsumexp(out)
    return out


def _passes(cost: np.ndarray, batch_tokens: int) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges of about ``batch_tokens`` tokens each, ``cost`` (n,)
    ascending: a pass costs its row count times its last (longest) row's cost."""
    out, start, n = [], 0, len(cost)
    while start < n:
        stop = start + 1
        while stop < n and (stop - start + 1) * cost[stop] <= batch_tokens:
            stop += 1
        out.append((start, stop))
        start = stop
    return out


def _plain_pass(model: CodebookModel, tok: torch.Tensor, chunk: np.ndarray, cp: np.ndarray,
                prefixes: np.ndarray, d: int, device: torch.device) -> torch.Tensor:
    """(c * P, D, V) log-probs: context + each prefix run afresh."""
    n_prefix = len(prefixes)
    c, seq_len = len(chunk), tok.shape[1]
    length = int(cp.max()) + d
    x = torch.zeros((c, length), dtype=torch.long)
    keep = min(length, seq_len)
    x[:, :keep] = tok[torch.as_tensor(chunk), :keep]
    x = x.repeat_interleave(n_prefix, dim=0)  # row r * n_prefix + q
    rr = torch.as_tensor(np.repeat(cp, n_prefix))
    qq = torch.arange(n_prefix).repeat(c)
    rows = torch.arange(c * n_prefix)
    for j in range(d - 1):
        x[rows, rr + 1 + j] = torch.as_tensor(prefixes[:, j])[qq]
    logits = model.model(input_ids=x.to(device)).logits
    read_at = rr[:, None] + torch.arange(d)[None, :]  # (c*P, D)
    lp = logits[rows[:, None].to(device), read_at.to(device)].double().log_softmax(-1)
    return lp.cpu()


def _cached_pass(model: CodebookModel, tok: torch.Tensor, chunk: np.ndarray, cp: np.ndarray,
                 prefixes: np.ndarray, d: int, device: torch.device) -> torch.Tensor:
    """(c * P, D, V) log-probs: the contexts once, then every prefix from the repeated cache."""
    n_prefix = len(prefixes)
    c = len(chunk)
    length = int(cp.max()) + 1
    x = tok[torch.as_tensor(chunk), :length].to(device)
    rows = torch.arange(c)
    res = model.model(input_ids=x, use_cache=d > 1)
    first = res.logits[rows.to(device), torch.as_tensor(cp).to(device)].double().log_softmax(-1)
    first = first.cpu().repeat_interleave(n_prefix, dim=0)[:, None]  # (c*P, 1, V)
    if d == 1:
        return first
    cache = getattr(res, "past_key_values", None) or getattr(res, "cache", None)
    del res
    cache.batch_repeat_interleave(n_prefix)
    rr = torch.as_tensor(np.repeat(cp, n_prefix))  # (c*P,)
    y = torch.as_tensor(prefixes).repeat(c, 1)  # (c*P, D-1), prefix q of row r at r*P + q
    mask = torch.ones((c * n_prefix, length + d - 1), dtype=torch.long)
    mask[:, :length] = (torch.arange(length)[None, :] <= rr[:, None]).long()
    pos_ids = rr[:, None] + 1 + torch.arange(d - 1)[None, :]
    logits = model.model(
        input_ids=y.to(device), attention_mask=mask.to(device), position_ids=pos_ids.to(device),
        use_cache=True, **_cache_kwarg(model.model, cache),
    ).logits
    rest = logits.double().log_softmax(-1).cpu()  # (c*P, D-1, V)
    return torch.cat([first, rest], dim=1)


def _cache_kwarg(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The KV cache under the keyword this transformers takes (``cache`` from 5.24 on;
    ``past_key_values`` before, deprecated since and going in 5.40)."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def first_transition_accuracy(
    model: CodebookModel, fsm: TokFSM, tokens: Any, batch_tokens: int = 1 << 15
) -> float:
    """Mean overlap of the top-E predicted next states after the FIRST state (position D) with
    its E true out-neighbours (``fsm.first_transition_accuracy``)."""
    tok = as_tokens(tokens)
    d = fsm.digits_per_state
    scores = next_state_scores(model, fsm, tok[:, : 2 * d], d, batch_tokens=batch_tokens)
    first = fsm.decode_tokens(tok[:, 1 : 1 + d].numpy(), has_bos=False)[:, 0]
    return fsm.first_transition_accuracy(scores, first)


def transition_accuracy_all_positions(
    model: CodebookModel,
    fsm: TokFSM,
    tokens: Any,
    max_samples: int | None = 256,
    seed: int = 0,
    batch_tokens: int = 1 << 15,
) -> float:
    """Like :func:`first_transition_accuracy`, averaged over every state position but the last
    (whose next state is not in the sequence). ``max_samples`` (row, position) pairs are drawn
    uniformly without replacement (None: all; costs one pass per prefix per pair)."""
    tok = as_tokens(tokens)
    labels = fsm.state_labels(tok.numpy())
    state_pos = np.flatnonzero(labels[0] >= 0)[:-1]
    if state_pos.size == 0:
        raise ValueError("sequences need at least two states for transition accuracy")
    rows, cols = np.meshgrid(np.arange(tok.shape[0]), state_pos, indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    if max_samples is not None and rows.size > max_samples:
        pick = np.random.default_rng(seed).choice(rows.size, size=max_samples, replace=False)
        rows, cols = rows[pick], cols[pick]
    scores = next_state_scores(model, fsm, tok[torch.as_tensor(rows)], cols,
                               batch_tokens=batch_tokens)
    return fsm.first_transition_accuracy(scores, labels[rows, cols])
