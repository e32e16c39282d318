"""Helpers the FSM analysis modules share: eval mode, devices, state spellings, top-E sets."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from codebook.data.fsm import TokFSM

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it"
             ) -> Iterator[T]:
    """``items`` with a progress bar on stderr, shown only on a terminal, gone when done."""
    return iter(tqdm(items, desc=desc, total=total, unit=unit, disable=None, leave=False))


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; the model's previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def device_of(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters are (CPU for a model without any)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def as_tokens(tokens: Any) -> torch.Tensor:
    """(n, seq_len) token ids as a CPU long tensor."""
    t = torch.as_tensor(np.asarray(tokens) if not torch.is_tensor(tokens) else tokens)
    if t.dim() != 2:
        raise ValueError(f"tokens must be (n, seq_len), got shape {tuple(t.shape)}")
    return t.to(torch.long).cpu()


def state_spellings(fsm: TokFSM) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Digits (S, D), distinct (D-1)-digit prefixes (P, D-1), prefix index per state (S,)."""
    digits = fsm.encode_states(np.arange(fsm.num_states)[:, None])
    d = fsm.digits_per_state
    if d == 1:
        return digits, np.zeros((1, 0), dtype=np.int64), np.zeros(fsm.num_states, np.int64)
    prefixes, inverse = np.unique(digits[:, : d - 1], axis=0, return_inverse=True)
    return digits, prefixes.astype(np.int64), np.asarray(inverse, dtype=np.int64).ravel()


def hits_needed(fraction: float, e: int) -> int:
    """How many of ``e`` states a ``fraction`` of them is (at least 1, at most ``e``)."""
    return min(e, max(1, math.ceil(fraction * e - 1e-9)))


def top_mask(scores: np.ndarray, e: int) -> np.ndarray:
    """(n, S) boolean: the top-``e`` entries of each row."""
    mask = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(mask, np.argpartition(-scores, e - 1, axis=1)[:, :e], True, axis=1)
    return mask


def overlaps(fsm: TokFSM, scores: np.ndarray, states: np.ndarray) -> np.ndarray:
    """Per row: |top-E scored states & out-neighbours(states)| / E."""
    e = fsm.num_edges
    return (top_mask(scores, e) & (fsm.adjacency[np.asarray(states)] > 0)).sum(axis=1) / e


def logsumexp(x: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp, (n, 1)."""
    m = x.max(axis=1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=1, keepdims=True))
