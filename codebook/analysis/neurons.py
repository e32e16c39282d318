"""The neuron baseline: the best single neuron at a given recall, in steps a stream can split.

For a label with ``P`` positive tokens and a target recall ``r``, neuron ``j`` (signed
activations ``a = sign * acts[:, j]``) gets the threshold ``t`` = the ``ceil(r * P)``-th largest
``a`` among the positives, and predicts the label where ``a >= t`` (ties can push its recall
above ``r``); its precision is positives predicted / all predicted. The best neuron is the most
precise; ties go to sign +1, then to the lower index.

The steps: :func:`recall_thresholds` (from the positives' activations alone),
:func:`count_at_or_above` (over all tokens: one array, or shard by shard, summed) and
:func:`choose_neurons`. :func:`best_neurons_at_recall` runs them in memory for many labels at
once; ``codebook.store.evaluate`` runs them over a code store's shards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

__all__ = [
    "best_neurons_at_recall",
    "choose_neurons",
    "count_at_or_above",
    "positives_needed",
    "recall_thresholds",
]

SIGNS = (1, -1)
_CHUNK_ELEMENTS = 1 << 24  # activations sorted per chunk of neurons (~64 MB of float32)


def positives_needed(target_recall: float, positives: int) -> int:
    """How many of ``positives`` tokens a threshold must keep to reach ``target_recall``."""
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    # Guard against float noise such as 0.3 * 10 = 3.0000000000000004.
    m = math.ceil(target_recall * positives - 1e-9)
    return min(max(m, 1), positives)


def recall_thresholds(positive_acts: np.ndarray, target_recall: float, sign: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Per neuron, from the positives' activations (P, D): the threshold (D,) float32 in signed
    units that reaches ``target_recall``, and how many positives are at or above it (D,)."""
    signed = sign * np.asarray(positive_acts, dtype=np.float32)
    if signed.ndim != 2 or signed.shape[0] == 0:
        raise ValueError(f"positive_acts must be (P >= 1, D), got shape {signed.shape}")
    p = signed.shape[0]
    m = positives_needed(target_recall, p)
    thr = np.partition(signed, p - m, axis=0)[p - m]
    return thr, (signed >= thr[None, :]).sum(axis=0)


def count_at_or_above(acts: np.ndarray, thresholds: np.ndarray, sign: int) -> np.ndarray:
    """(D,) tokens of ``acts`` (T, D) whose signed activation is at or above the threshold."""
    return (sign * np.asarray(acts, dtype=np.float32) >= thresholds[None, :]).sum(axis=0)


def _count_sorted(sorted_cols: np.ndarray, thresholds: np.ndarray, sign: int) -> np.ndarray:
    """:func:`count_at_or_above` from each neuron's sorted column (D, T), for thresholds
    (labels, D): one binary search per column instead of a pass over the tokens per label."""
    total = sorted_cols.shape[1]
    out = np.empty(thresholds.shape, dtype=np.int64)
    for j, col in enumerate(sorted_cols):
        if sign == 1:
            out[:, j] = total - np.searchsorted(col, thresholds[:, j], side="left")
        else:  # -a >= t  <=>  a <= -t
            out[:, j] = np.searchsorted(col, -thresholds[:, j], side="right")
    return out


def choose_neurons(candidates: Sequence[tuple[int, np.ndarray, np.ndarray]]
                   ) -> dict[str, np.ndarray]:
    """The best neuron from ``(sign, precision (..., D), threshold (..., D))`` per sign, in
    order: the most precise; ties to the earlier sign, then the lower index. Returns
    ``precision``, ``neuron``, ``sign`` and ``threshold`` (signed units), each of shape (...)."""
    best: dict[str, np.ndarray] = {}
    for sign, precision, threshold in candidates:
        j = np.argmax(precision, axis=-1)
        p = np.take_along_axis(precision, j[..., None], axis=-1)[..., 0]
        t = np.take_along_axis(threshold, j[..., None], axis=-1)[..., 0]
        if not best:
            best = {"precision": p, "neuron": j, "sign": np.full(j.shape, sign), "threshold": t}
            continue
        better = p > best["precision"]
        for key, value in (("precision", p), ("neuron", j), ("sign", sign), ("threshold", t)):
            best[key] = np.where(better, value, best[key])
    return best


def best_neurons_at_recall(
    acts: np.ndarray,
    labels: np.ndarray,
    target_recall: np.ndarray,
    both_signs: bool = True,
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> dict[str, np.ndarray]:
    """For every label ``s`` with a finite ``target_recall[s]``: the best single neuron.

    ``acts`` (M, D); ``labels`` (M,) label ids, -1 = none (still counted as negatives). Each
    neuron's column is sorted once (per chunk of neurons of about ``chunk_elements``
    activations) and counted by binary search. Returns ``precision``, ``neuron``, ``sign`` and
    ``threshold`` (signed units) of length ``len(target_recall)``: NaN / -1 / 0 / NaN for
    labels skipped (target NaN, or no positive token). ``both_signs=False``: sign +1 only.
    """
    acts = np.asarray(acts)
    labels = np.asarray(labels, dtype=np.int64).ravel()
    target = np.asarray(target_recall, dtype=np.float64).ravel()
    if acts.ndim != 2 or acts.shape[0] != labels.size:
        raise ValueError(f"acts must be (M, D) with M={labels.size}, got {acts.shape}")
    num = target.size
    out = {"precision": np.full(num, np.nan), "neuron": np.full(num, -1, dtype=np.int64),
           "sign": np.zeros(num, dtype=np.int64), "threshold": np.full(num, np.nan)}
    todo, pos_rows = [], []
    for s in range(num):
        rows = np.flatnonzero(labels == s) if np.isfinite(target[s]) else np.empty(0)
        if rows.size:
            positives_needed(target[s], rows.size)  # a target outside (0, 1] fails here
            todo.append(s)
            pos_rows.append(rows)
    m_total, dim = acts.shape
    if not todo or dim == 0:
        return out
    signs = SIGNS if both_signs else (1,)
    precision = {s: np.empty((len(todo), dim)) for s in signs}
    threshold = {s: np.empty((len(todo), dim), dtype=np.float32) for s in signs}
    chunk = max(1, chunk_elements // max(m_total, 1))
    for start in tqdm(range(0, dim, chunk), desc="neurons at recall", unit="chunk",
                      disable=None, leave=False):
        stop = min(start + chunk, dim)
        block = np.ascontiguousarray(acts[:, start:stop], dtype=np.float32)
        sorted_cols = np.sort(block.T, axis=1)  # (chunk, M)
        for sign in signs:
            found = [recall_thresholds(block[rows], target[s], sign)
                     for s, rows in zip(todo, pos_rows, strict=True)]
            thr = np.stack([t for t, _ in found])
            n_pos = np.stack([n for _, n in found])
            n_above = _count_sorted(sorted_cols, thr, sign)
            precision[sign][:, start:stop] = n_pos / np.maximum(n_above, 1)
            threshold[sign][:, start:stop] = thr
    best = choose_neurons([(s, precision[s], threshold[s]) for s in signs])
    for key, value in best.items():
        out[key][todo] = value
    return out
