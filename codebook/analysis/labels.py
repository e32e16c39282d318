"""Features as labels of tokens: one ``Labeller`` class per kind of feature.

A labeller turns token rows (document, position, token id; as a code store's shards hold them,
or as a batch of sequences) into a (tokens, features) bool array. The store evaluation, code
search and the FSM analysis count codes against these arrays
(``classifiers.code_feature_stats`` takes them as they are), so a new kind of feature is one
class with ``names``, ``only_labelled`` and ``labels``. Here: FSM states and token ids; regex
features are ``features.RegexLabels``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

if TYPE_CHECKING:
    from codebook.data.fsm import TokFSM

__all__ = ["FSMStates", "Labeller", "TokenIds", "TokenRows", "label_ids", "label_rows",
           "one_label"]


@dataclass(frozen=True)
class TokenRows:
    """Tokens as rows, sorted by document then position: (T,) arrays each."""

    doc_id: np.ndarray
    position: np.ndarray
    token_id: np.ndarray

    @classmethod
    def from_table(cls, table: Any) -> TokenRows:
        """The rows of a code store shard (a ``pyarrow.Table``)."""
        return cls(*(table.column(c).to_numpy() for c in ("doc_id", "position", "token_id")))

    @classmethod
    def from_sequences(cls, tokens: np.ndarray) -> TokenRows:
        """A batch (n, L) of sequences: document ``i`` is row ``i``, every position kept."""
        tokens = np.asarray(tokens)
        n, length = tokens.shape
        return cls(np.repeat(np.arange(n), length), np.tile(np.arange(length), n),
                   tokens.reshape(-1))

    def __len__(self) -> int:
        return len(self.doc_id)

    def documents(self) -> Iterator[tuple[int, int, int]]:
        """``(doc_id, lo, hi)``: the rows ``[lo, hi)`` of each document."""
        bounds = np.flatnonzero(np.diff(self.doc_id)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(self)], strict=True):
            if lo < hi:
                yield int(self.doc_id[lo]), int(lo), int(hi)


class Labeller(Protocol):
    """Labels tokens with features.

    ``labels(rows)`` is (len(rows), len(names)) bool: which features hold at each token.
    ``only_labelled``: only tokens with some label are counted (FSM states: the state
    positions); otherwise every token is (a code firing on an unlabelled token lowers its
    precision).
    """

    only_labelled: ClassVar[bool]

    @property
    def names(self) -> list[str]: ...

    def labels(self, rows: TokenRows) -> np.ndarray: ...


def label_rows(labeller: Labeller, rows: TokenRows) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, mask)``: the labeller's (T, F) labels and the (T,) tokens counted."""
    labels = labeller.labels(rows)
    if labeller.only_labelled:
        return labels, labels.any(axis=1)
    return labels, np.ones(len(rows), dtype=bool)


def label_ids(labels: np.ndarray) -> np.ndarray:
    """(T, F) bool labels as (T, m) label ids, -1 padded (m: the most labels on one token)."""
    labels = np.asarray(labels, dtype=bool)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (T, features) bool, got shape {labels.shape}")
    width = max(1, int(labels.sum(axis=1).max(initial=0)))
    order = np.argsort(~labels, axis=1, kind="stable")[:, :width]  # labelled columns first
    return np.where(np.take_along_axis(labels, order, axis=1), order, -1)


def one_label(labels: np.ndarray) -> np.ndarray:
    """(T,) the one label of each token, -1 for none (labels that never overlap, e.g. states)."""
    ids = label_ids(labels)
    if ids.shape[1] != 1:
        raise ValueError("a token has several labels; use label_ids")
    return ids[:, 0]


@dataclass(frozen=True)
class FSMStates:
    """FSM states as features: a state labels the position of its LAST digit (as
    ``TokFSM.state_labels``), in documents read from position 0 on (BOS, whole states)."""

    fsm: TokFSM
    only_labelled: ClassVar[bool] = True

    @property
    def names(self) -> list[str]:
        return [f"state_{s}" for s in range(self.fsm.num_states)]

    def labels(self, rows: TokenRows) -> np.ndarray:
        states = np.full(len(rows), -1, dtype=np.int64)
        d = self.fsm.digits_per_state
        for _, lo, hi in rows.documents():
            if (hi - lo - 1) % d == 0 and np.array_equal(rows.position[lo:hi],
                                                         np.arange(hi - lo)):
                states[lo:hi] = self.fsm.state_labels(rows.token_id[lo:hi])
        return states[:, None] == np.arange(self.fsm.num_states)[None, :]


@dataclass(frozen=True)
class TokenIds:
    """Token ids as features: feature ``i`` holds where the token is ``ids[i]``."""

    ids: Sequence[int]
    only_labelled: ClassVar[bool] = False

    @property
    def names(self) -> list[str]:
        return [f"token_{i}" for i in self.ids]

    def labels(self, rows: TokenRows) -> np.ndarray:
        return np.asarray(rows.token_id)[:, None] == np.asarray(self.ids, dtype=np.int64)[None, :]
