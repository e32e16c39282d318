"""TokFSM: the synthetic finite-state-machine dataset of the codebook-features paper.

A random directed graph on ``num_states`` states; every state has ``num_edges`` distinct
out-neighbours drawn uniformly without replacement from all states (self-loops possible), each
taken with equal probability. A trajectory of ``trajectory_states`` states starts at a uniformly
random state. Each state is written as ``digits_per_state`` base-``base`` digit tokens, most
significant digit first, and a sequence starts with one BOS token (id ``base``). With the paper's
defaults (100 states, 10 edges, base 10, seed 42, 64 states) a sequence is ``1 + 64 * 2 = 129``
tokens over a vocabulary of 11.

Train/eval split: the evaluation set is drawn from a dedicated random stream derived from
``config.seed``; training batches are drawn per ``(seed, step)`` (so a resumed run sees exactly
the batches of an uninterrupted one) and drop any sequence whose hash is in the evaluation set.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from codebook.io import atomic_write

__all__ = ["FSMConfig", "TokFSM", "row_hashes"]

_FORMAT_VERSION = 1
# Entropy words that separate the evaluation stream from training streams ``[seed, step]``.
_EVAL_TAG = (0x45564C, 0x5453)  # "EVL", "TS"; non-zero so SeedSequence never pads them away.
_EVAL_BLOCK = 1024  # eval rows are drawn in fixed blocks so eval_set(n) is a prefix of eval_set(m)


@dataclass(frozen=True)
class FSMConfig:
    """Shape and seed of a TokFSM. Defaults are the paper's."""

    num_states: int = 100
    num_edges: int = 10
    base: int = 10
    seed: int = 42
    trajectory_states: int = 64

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> FSMConfig:
        """Raise ``ValueError`` naming the bad field and the fix; return ``self`` when valid."""
        for name in ("num_states", "num_edges", "base", "seed", "trajectory_states"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise ValueError(f"FSMConfig.{name} must be an int, got {value!r}")
        if self.num_states < 1:
            raise ValueError(f"FSMConfig.num_states={self.num_states}: set it to 1 or more")
        if not 1 <= self.num_edges <= self.num_states:
            raise ValueError(
                f"FSMConfig.num_edges={self.num_edges}: out-neighbours are drawn without "
                f"replacement, so set 1 <= num_edges <= num_states ({self.num_states})"
            )
        if self.base < 2:
            raise ValueError(f"FSMConfig.base={self.base}: set base >= 2 (digits need base >= 2)")
        if self.seed < 0:
            raise ValueError(f"FSMConfig.seed={self.seed}: use a non-negative seed")
        if self.trajectory_states < 1:
            raise ValueError(
                f"FSMConfig.trajectory_states={self.trajectory_states}: set it to 1 or more"
            )
        return self


def row_hashes(tokens: np.ndarray) -> list[bytes]:
    """A 16-byte blake2b digest per row of a 2-D token array (dtype-independent: int64 bytes)."""
    arr = np.ascontiguousarray(np.asarray(tokens), dtype=np.int64)
    if arr.ndim != 2:
        raise ValueError(f"row_hashes expects a 2-D (n, seq_len) array, got shape {arr.shape}")
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in arr]


class TokFSM:
    """The TokFSM dataset: graph, tokenisation, sampling, labels, split and metric."""

    def __init__(self, config: FSMConfig | None = None, transitions: np.ndarray | None = None):
        """Build from ``config`` (default: the paper's); ``transitions`` overrides the graph
        drawn from the seed (used by :meth:`load`)."""
        self.config = (config or FSMConfig()).validate()
        cfg = self.config
        if transitions is None:
            rng = np.random.default_rng(cfg.seed)
            transitions = np.stack(
                [
                    rng.choice(cfg.num_states, size=cfg.num_edges, replace=False)
                    for _ in range(cfg.num_states)
                ]
            )
        transitions = np.array(transitions, dtype=np.int64)  # own copy: made read-only below
        if transitions.shape != (cfg.num_states, cfg.num_edges):
            raise ValueError(
                f"transitions has shape {transitions.shape}, expected "
                f"(num_states, num_edges) = {(cfg.num_states, cfg.num_edges)}"
            )
        if transitions.min() < 0 or transitions.max() >= cfg.num_states:
            raise ValueError("transitions must hold state ids in [0, num_states)")
        srt = np.sort(transitions, axis=1)
        if (srt[:, 1:] == srt[:, :-1]).any():
            raise ValueError("each row of transitions must hold distinct out-neighbours")
        self.transitions: np.ndarray = transitions
        self.transitions.setflags(write=False)
        adjacency = np.zeros((cfg.num_states, cfg.num_states), dtype=bool)
        adjacency[np.arange(cfg.num_states)[:, None], transitions] = True
        adjacency.setflags(write=False)
        self.adjacency: np.ndarray = adjacency  # adjacency[a, b]: a -> b is an edge
        digits = 1
        while cfg.base**digits < cfg.num_states:
            digits += 1
        self.digits_per_state: int = digits
        self._powers = cfg.base ** np.arange(digits - 1, -1, -1, dtype=np.int64)

    # ------------------------------------------------------------------ sizes
    @property
    def num_states(self) -> int:
        return self.config.num_states

    @property
    def num_edges(self) -> int:
        return self.config.num_edges

    @property
    def vocab_size(self) -> int:
        """Digits ``0..base-1`` plus BOS."""
        return self.config.base + 1

    @property
    def bos_token_id(self) -> int:
        return self.config.base

    @property
    def seq_len(self) -> int:
        """Tokens per sequence: BOS + trajectory_states * digits_per_state (129 by default)."""
        return 1 + self.config.trajectory_states * self.digits_per_state

    # ------------------------------------------------------------ tokenising
    def encode_states(self, states: np.ndarray) -> np.ndarray:
        """States ``(..., L)`` -> digit tokens ``(..., L * D)``, most significant digit first."""
        states = np.asarray(states, dtype=np.int64)
        if states.size and (states.min() < 0 or states.max() >= self.num_states):
            raise ValueError(f"states must lie in [0, {self.num_states})")
        digits = (states[..., None] // self._powers) % self.config.base
        return digits.reshape(*states.shape[:-1], states.shape[-1] * self.digits_per_state)

    def decode_tokens(self, tokens: np.ndarray, has_bos: bool | None = None) -> np.ndarray:
        """Digit tokens ``(..., [1 +] L * D)`` -> states ``(..., L)``.

        ``has_bos=None`` strips a leading column when it is BOS in every row.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        if has_bos is None:
            has_bos = tokens.shape[-1] > 0 and bool((tokens[..., 0] == self.bos_token_id).all())
        if has_bos:
            if not (tokens[..., 0] == self.bos_token_id).all():
                raise ValueError("has_bos=True but the first token is not BOS in every row")
            tokens = tokens[..., 1:]
        d = self.digits_per_state
        if tokens.shape[-1] % d:
            raise ValueError(f"digit count {tokens.shape[-1]} is not a multiple of {d}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.base):
            raise ValueError("decode_tokens found a non-digit token (BOS in the middle?)")
        grouped = tokens.reshape(*tokens.shape[:-1], tokens.shape[-1] // d, d)
        states = grouped @ self._powers
        if states.size and states.max() >= self.num_states:
            raise ValueError(f"decoded a state >= num_states ({self.num_states})")
        return states

    # -------------------------------------------------------------- sampling
    def sample_states(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` trajectories ``(n, trajectory_states)`` int64 from uniform random starts."""
        length = self.config.trajectory_states
        states = np.empty((n, length), dtype=np.int64)
        states[:, 0] = rng.integers(self.num_states, size=n)
        choices = rng.integers(self.num_edges, size=(n, length - 1))
        for t in range(1, length):
            states[:, t] = self.transitions[states[:, t - 1], choices[:, t - 1]]
        return states

    def states_to_tokens(self, states: np.ndarray) -> np.ndarray:
        """Trajectories ``(n, L)`` -> sequences ``(n, 1 + L * D)`` int64 with BOS first."""
        digits = self.encode_states(states)
        bos = np.full((*digits.shape[:-1], 1), self.bos_token_id, dtype=np.int64)
        return np.concatenate([bos, digits], axis=-1)

    def sample_tokens(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` sequences ``(n, seq_len)`` int64, BOS first."""
        return self.states_to_tokens(self.sample_states(n, rng))

    # ---------------------------------------------------------------- labels
    def state_label_positions(self, num_states_in_seq: int | None = None) -> np.ndarray:
        """Token positions that carry a state label: the last digit of each state.

        State ``i`` (0-based) of a BOS-prefixed sequence occupies positions
        ``1 + i*D .. (i+1)*D``; its label sits on position ``(i+1)*D``, the first position at
        which the whole state has been read. Returns ``[(i+1)*D for i in range(L)]``.
        """
        length = self.config.trajectory_states if num_states_in_seq is None else num_states_in_seq
        return (np.arange(length, dtype=np.int64) + 1) * self.digits_per_state

    def state_labels(self, tokens: np.ndarray) -> np.ndarray:
        """Per-position state labels ``(..., 1 + L*D)`` int64 for BOS-prefixed sequences.

        Position of the LAST digit of state ``i`` holds state ``i`` (the state that is current
        once that position is read); every other position (BOS, earlier digits) holds -1.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        states = self.decode_tokens(tokens, has_bos=True)
        labels = np.full(tokens.shape, -1, dtype=np.int64)
        labels[..., self.state_label_positions(states.shape[-1])] = states
        return labels

    # ----------------------------------------------------------------- split
    def _eval_rng(self, block: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, *_EVAL_TAG, block + 1])

    def eval_set(self, n: int) -> np.ndarray:
        """The fixed evaluation sequences ``(n, seq_len)``; ``eval_set(n)`` is a prefix of
        ``eval_set(m)`` for ``m >= n``. Depends only on the config."""
        blocks = [
            self.sample_tokens(_EVAL_BLOCK, self._eval_rng(b))
            for b in range(math.ceil(n / _EVAL_BLOCK))
        ]
        if not blocks:
            return np.empty((0, self.seq_len), dtype=np.int64)
        return np.concatenate(blocks)[:n]

    def eval_hashes(self, n: int) -> set[bytes]:
        """Hashes (see :func:`row_hashes`) of ``eval_set(n)``, to pass as ``exclude``."""
        return set(row_hashes(self.eval_set(n)))

    def train_batch(
        self,
        step: int,
        batch_size: int,
        seed: int | None = None,
        exclude: set[bytes] | None = None,
    ) -> np.ndarray:
        """Training batch ``(batch_size, seq_len)`` for ``step``: a pure function of
        ``(seed, step, exclude)`` drawn with ``default_rng([seed, step])`` (``seed`` defaults to
        ``config.seed``). Rows whose hash is in ``exclude`` are dropped and redrawn from the same
        generator."""
        seed = self.config.seed if seed is None else seed
        if seed < 0 or step < 0:
            raise ValueError(f"seed ({seed}) and step ({step}) must be non-negative")
        rng = np.random.default_rng([seed, step])
        batch = self.sample_tokens(batch_size, rng)
        if not exclude:
            return batch
        for _ in range(100):
            keep = np.array([h not in exclude for h in row_hashes(batch)], dtype=bool)
            if keep.all():
                return batch
            refill = self.sample_tokens(int((~keep).sum()), rng)
            batch = np.concatenate([batch[keep], refill])
        raise RuntimeError("train_batch: could not avoid the excluded set; is it the whole space?")

    # ---------------------------------------------------------------- metric
    def first_transition_accuracy(
        self, next_state_scores: np.ndarray, current_states: np.ndarray
    ) -> float:
        """Mean overlap of the top-E scored next states with the E true out-neighbours.

        ``next_state_scores``: (n, num_states), higher = more likely; ``current_states``: (n,).
        Ties at the E-th score are broken arbitrarily.
        """
        scores = np.asarray(next_state_scores, dtype=np.float64)
        current = np.asarray(current_states, dtype=np.int64)
        if scores.ndim != 2 or scores.shape[1] != self.num_states:
            raise ValueError(
                f"next_state_scores must be (n, {self.num_states}), got {scores.shape}"
            )
        if current.shape != (scores.shape[0],):
            raise ValueError(f"current_states must be ({scores.shape[0]},), got {current.shape}")
        if scores.shape[0] == 0:
            raise ValueError("first_transition_accuracy needs at least one row")
        e = self.num_edges
        top = np.argpartition(-scores, e - 1, axis=1)[:, :e]
        hits = self.adjacency[current[:, None], top].sum(axis=1)
        return float(hits.mean() / e)

    # ------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": _FORMAT_VERSION,
            "config": asdict(self.config),
            "transitions": self.transitions.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokFSM:
        version = data.get("format_version")
        if version != _FORMAT_VERSION:
            raise ValueError(f"unsupported TokFSM format_version {version!r}")
        return cls(FSMConfig(**data["config"]), np.asarray(data["transitions"], dtype=np.int64))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write config + transitions as JSON, atomically (temp file, fsync, ``os.replace``)."""
        path = Path(path)
        with atomic_write(path) as fh:
            json.dump(self.to_dict(), fh)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TokFSM:
        """Read a file written by :meth:`save`."""
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TokFSM):
            return NotImplemented
        return self.config == other.config and np.array_equal(self.transitions, other.transitions)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TokFSM({self.config}, seq_len={self.seq_len}, vocab_size={self.vocab_size})"
