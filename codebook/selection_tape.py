"""Codes chosen once under activation checkpointing: the forward pass records each codebook
layer's selection on a tape, and the recomputation inside backward replays it instead of scoring
again (:func:`reuse_selections`, the checkpoint's ``context_fn``).
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager

import torch
from torch import nn


class SelectionTape:
    """The codes chosen in one activation-checkpointed region: recorded in order by its
    forward pass, handed back in the same order to its recomputation inside backward."""

    def __init__(self) -> None:
        self.entries: list[tuple[nn.Module, int, torch.Tensor, torch.Tensor | None]] = []
        self.cursor = 0
        self.broken = False


_tapes = threading.local()  # .stack: [(mode, tape)], innermost last; per thread (autograd
# runs a CUDA backward, and so the recompute, on its own thread)


def _tape_stack() -> list[tuple[str, SelectionTape]]:
    if not hasattr(_tapes, "stack"):
        _tapes.stack = []
    return _tapes.stack


class _TapeMode:
    """Puts ``tape`` on this thread's stack in ``mode`` while entered; re-entrant, since a
    checkpoint enters its recompute context once per recomputation (retain_graph)."""

    def __init__(self, tape: SelectionTape, mode: str) -> None:
        self.tape, self.mode = tape, mode

    def __enter__(self) -> None:
        if self.mode == "replay":
            self.tape.cursor = 0
        _tape_stack().append((self.mode, self.tape))

    def __exit__(self, *exc: object) -> None:
        _tape_stack().pop()


def reuse_selections() -> tuple[AbstractContextManager, AbstractContextManager]:
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` (and
    so for HF's ``gradient_checkpointing_kwargs``): the recomputation inside backward reuses the
    codes every codebook layer chose in the forward pass instead of scoring again. Without it
    the recompute selects again (the same codes, at the cost of a second scoring)."""
    tape = SelectionTape()
    return _TapeMode(tape, "record"), _TapeMode(tape, "replay")


def record_selection(layer: nn.Module, idx: torch.Tensor,
                      weight: torch.Tensor | None) -> None:
    stack = _tape_stack()
    if stack and stack[-1][0] == "record" and not in_backward():
        stack[-1][1].entries.append((layer, idx.shape[0], idx, weight))


def replayed_selection(layer: nn.Module, rows: int
                        ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The next recorded selection if this call is a recompute under a replaying tape and the
    entry is this layer's for as many rows; else None (and the tape is not trusted again)."""
    stack = _tape_stack()
    if not stack or stack[-1][0] != "replay":
        return None
    tape = stack[-1][1]
    if tape.broken or tape.cursor >= len(tape.entries):
        tape.broken = True
        return None
    owner, n, idx, weight = tape.entries[tape.cursor]
    if owner is not layer or n != rows:
        tape.broken = True
        return None
    tape.cursor += 1
    return idx, weight


def in_backward() -> bool:
    """True inside the autograd engine: an activation-checkpointed block being recomputed."""
    return torch._C._current_graph_task_id() != -1
