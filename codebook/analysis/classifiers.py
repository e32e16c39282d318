"""Codes versus neurons as classifiers of features (FSM states, regex features).

Definitions (the paper's): for a code ``c`` and a label ``l``,
precision = #(tokens where c fires and l holds) / #(tokens where c fires) and
recall = #(tokens where c fires and l holds) / #(tokens where l holds), counted over the
positions considered (``mask``). A neuron is compared at the same recall: its threshold is set
so that its recall equals the code's, and its precision is read off at that threshold.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

__all__ = [
    "best_code_per_label",
    "code_feature_stats",
    "codes_vs_neurons",
    "js_divergence",
    "neuron_precision_at_recall",
    "neuron_precisions_at_recall",
    "normalised_jsd",
    "precision_summary",
]

_CHUNK_ELEMENTS = 1 << 24  # ~16M elements per (T, chunk) block of activations


def _as_2d_ids(x: np.ndarray, name: str, length: int | None = None) -> np.ndarray:
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be (T,) or (T, k), got shape {arr.shape}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name} has {arr.shape[0]} rows, expected {length}")
    return arr


def _dedupe_rows(ids: np.ndarray) -> np.ndarray:
    """Sort each row and replace repeated ids by -1, so an id counts once per token."""
    srt = np.sort(ids, axis=1)
    if srt.shape[1] > 1:
        dup = np.zeros_like(srt, dtype=bool)
        dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
        srt[dup] = -1
    return srt


def code_feature_stats(
    codes: np.ndarray,
    labels: np.ndarray,
    num_codes: int,
    num_labels: int,
    mask: np.ndarray | None = None,
) -> dict[str, Any]:
    """Co-occurrence counts, precision and recall of every (code, label) pair.

    Args:
        codes: (T, k) (or (T,)) ids of the codes active at each token, one codebook group;
            negative ids are ignored (padding); an id repeated in a row counts once.
        labels: (T,) label id per token, -1 = no label; (T, m) for several labels per token.
        num_codes, num_labels: sizes of the id spaces.
        mask: (T,) bool, positions considered (default: all). Tokens with label -1 inside the
            mask still count in a code's firing total (the precision denominator).

    Returns a dict with ``precision`` and ``recall`` (num_codes, num_labels) float64 (0 where
    the denominator is 0), ``joint`` (num_codes, num_labels) int64 counts, ``code_counts``
    (num_codes,), ``label_counts`` (num_labels,) and ``num_tokens`` (positions considered).
    """
    codes2 = _as_2d_ids(codes, "codes")
    labels2 = _as_2d_ids(labels, "labels", codes2.shape[0])
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (codes2.shape[0],):
            raise ValueError(f"mask must be ({codes2.shape[0]},), got {mask.shape}")
        codes2, labels2 = codes2[mask], labels2[mask]
    if codes2.size and codes2.max() >= num_codes:
        raise ValueError(f"code id {codes2.max()} >= num_codes ({num_codes})")
    if labels2.size and labels2.max() >= num_labels:
        raise ValueError(f"label id {labels2.max()} >= num_labels ({num_labels})")
    codes2, labels2 = _dedupe_rows(codes2), _dedupe_rows(labels2)

    fired = codes2[codes2 >= 0]
    code_counts = np.bincount(fired, minlength=num_codes).astype(np.int64)
    label_counts = np.bincount(labels2[labels2 >= 0], minlength=num_labels).astype(np.int64)

    # Every (code slot, label slot) pair of a token; keep pairs where both are present.
    pair_c = np.broadcast_to(codes2[:, :, None], (*codes2.shape, labels2.shape[1]))
    pair_l = np.broadcast_to(labels2[:, None, :], pair_c.shape)
    valid = (pair_c >= 0) & (pair_l >= 0)
    flat = pair_c[valid] * num_labels + pair_l[valid]
    joint = np.bincount(flat, minlength=num_codes * num_labels).astype(np.int64)
    joint = joint.reshape(num_codes, num_labels)

    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(code_counts[:, None] > 0, joint / code_counts[:, None], 0.0)
        recall = np.where(label_counts[None, :] > 0, joint / label_counts[None, :], 0.0)
    return {
        "precision": precision,
        "recall": recall,
        "joint": joint,
        "code_counts": code_counts,
        "label_counts": label_counts,
        "num_tokens": int(codes2.shape[0]),
    }


def best_code_per_label(
    stats: dict[str, Any],
    min_recall: float = 0.0,
    by: Literal["precision", "f1"] = "precision",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best code for every label: ``(code, precision, recall)``, each (num_labels,).

    Eligible codes co-fire with the label at least once and have recall >= ``min_recall``.
    ``by="precision"`` maximises precision (ties: higher recall, then lower id); ``by="f1"``
    maximises F1 (ties: higher precision). Labels with no eligible code get code -1 and NaN.
    """
    if by not in ("precision", "f1"):
        raise ValueError(f"by must be 'precision' or 'f1', got {by!r}")
    precision = np.asarray(stats["precision"], dtype=np.float64)
    recall = np.asarray(stats["recall"], dtype=np.float64)
    joint = np.asarray(stats["joint"])
    eligible = (joint > 0) & (recall >= min_recall)
    if by == "precision":
        primary, secondary = precision, recall
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0)
        primary, secondary = f1, precision
    primary = np.where(eligible, primary, -np.inf)
    best = primary.max(axis=0)
    tied = eligible & (primary == best[None, :])
    code = np.where(tied, secondary, -np.inf).argmax(axis=0)
    has = eligible.any(axis=0)
    cols = np.arange(precision.shape[1])
    code = np.where(has, code, -1)
    best_p = np.where(has, precision[code.clip(0), cols], np.nan)
    best_r = np.where(has, recall[code.clip(0), cols], np.nan)
    return code.astype(np.int64), best_p, best_r


def _positives_needed(target_recall: float, positives: int) -> int:
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    # Guard against float noise such as 0.3 * 10 = 3.0000000000000004.
    m = math.ceil(target_recall * positives - 1e-9)
    return min(max(m, 1), positives)


def neuron_precisions_at_recall(
    acts: np.ndarray,
    is_label: np.ndarray,
    target_recall: float,
    sign: int = 1,
    chunk_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-neuron precision at a fixed recall: ``(precision (D,), threshold (D,))``.

    For neuron ``j`` with (signed) activations ``a = sign * acts[:, j]``, the threshold is the
    ``ceil(target_recall * P)``-th largest activation among the ``P`` positive tokens; tokens
    with ``a >= threshold`` are predicted positive (ties can push recall above the target) and
    precision = positives predicted / all predicted. Neurons are processed in chunks so memory
    stays near ``T * chunk_size`` elements.
    """
    acts = np.asarray(acts)
    if acts.ndim != 2:
        raise ValueError(f"acts must be (T, D), got shape {acts.shape}")
    is_label = np.asarray(is_label, dtype=bool)
    if is_label.shape != (acts.shape[0],):
        raise ValueError(f"is_label must be ({acts.shape[0]},), got {is_label.shape}")
    if sign not in (1, -1):
        raise ValueError(f"sign must be 1 or -1, got {sign}")
    positives = int(is_label.sum())
    if positives == 0:
        raise ValueError("is_label has no positive token: recall is undefined")
    m = _positives_needed(target_recall, positives)
    num_tokens, dim = acts.shape
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(num_tokens, 1))
    precision = np.empty(dim, dtype=np.float64)
    threshold = np.empty(dim, dtype=np.float64)
    pos_idx = np.flatnonzero(is_label)
    for start in range(0, dim, chunk_size):
        stop = min(start + chunk_size, dim)
        block = acts[:, start:stop].astype(np.float32, copy=True)
        if sign == -1:
            np.negative(block, out=block)
        pos = block[pos_idx]
        thr = np.partition(pos, positives - m, axis=0)[positives - m]
        above = block >= thr[None, :]
        n_above = above.sum(axis=0)
        n_pos_above = above[pos_idx].sum(axis=0)
        precision[start:stop] = n_pos_above / np.maximum(n_above, 1)
        threshold[start:stop] = thr
    return precision, threshold


def neuron_precision_at_recall(
    acts: np.ndarray,
    is_label: np.ndarray,
    target_recall: float,
    both_signs: bool = True,
    chunk_size: int | None = None,
) -> tuple[float, int, int, float]:
    """The best single neuron at a fixed recall: ``(precision, neuron_index, sign, threshold)``.

    The neuron predicts the label where ``sign * acts[:, neuron_index] >= threshold``; see
    :func:`neuron_precisions_at_recall`. ``both_signs`` also tries ``-acts`` (sign -1).
    Ties go to the lower index, then to sign +1.
    """
    best: tuple[float, int, int, float] = (-1.0, -1, 1, math.nan)
    for sign in (1, -1) if both_signs else (1,):
        prec, thr = neuron_precisions_at_recall(acts, is_label, target_recall, sign, chunk_size)
        j = int(np.argmax(prec))
        if prec[j] > best[0]:
            best = (float(prec[j]), j, sign, float(thr[j]))
    return best


def codes_vs_neurons(
    codes: np.ndarray,
    acts: np.ndarray,
    labels: np.ndarray,
    num_codes: int,
    num_labels: int,
    mask: np.ndarray | None = None,
    min_recall: float = 0.0,
    both_signs: bool = True,
) -> dict[str, np.ndarray]:
    """For every label: the best code's precision/recall and the best neuron's precision at
    that code's recall (the paper's FSM comparison). ``labels`` is (T,) with -1 = none.

    Returns arrays of length num_labels: ``code``, ``code_precision``, ``code_recall``,
    ``neuron``, ``neuron_sign``, ``neuron_threshold``, ``neuron_precision`` (NaN / -1 where
    the label has no eligible code).
    """
    stats = code_feature_stats(codes, labels, num_codes, num_labels, mask)
    code, code_p, code_r = best_code_per_label(stats, min_recall=min_recall)
    labels1 = np.asarray(labels, dtype=np.int64)
    acts = np.asarray(acts)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        labels1, acts = labels1[mask], acts[mask]
    neuron = np.full(num_labels, -1, dtype=np.int64)
    neuron_sign = np.zeros(num_labels, dtype=np.int64)
    neuron_thr = np.full(num_labels, np.nan)
    neuron_p = np.full(num_labels, np.nan)
    for lab in np.flatnonzero(code >= 0):
        p, j, s, t = neuron_precision_at_recall(
            acts, labels1 == lab, float(code_r[lab]), both_signs=both_signs
        )
        neuron[lab], neuron_sign[lab], neuron_thr[lab], neuron_p[lab] = j, s, t, p
    return {
        "code": code,
        "code_precision": code_p,
        "code_recall": code_r,
        "neuron": neuron,
        "neuron_sign": neuron_sign,
        "neuron_threshold": neuron_thr,
        "neuron_precision": neuron_p,
    }


def precision_summary(values: np.ndarray) -> dict[str, float]:
    """``mean``, ``median``, ``frac_ge_095`` and ``n`` over the finite entries (NaN skipped)."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return {"mean": math.nan, "median": math.nan, "frac_ge_095": math.nan, "n": 0}
    return {
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "frac_ge_095": float((arr >= 0.95).mean()),
        "n": int(arr.size),
    }


def js_divergence(p: np.ndarray, q: np.ndarray, axis: int = -1) -> np.ndarray:
    """Jensen-Shannon divergence in nats along ``axis`` (inputs: probability distributions)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if (p < 0).any() or (q < 0).any():
        raise ValueError("js_divergence expects non-negative probabilities")
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_pm = np.where(p > 0, p * np.log(p / m), 0.0).sum(axis=axis)
        kl_qm = np.where(q > 0, q * np.log(q / m), 0.0).sum(axis=axis)
    return np.maximum(0.5 * (kl_pm + kl_qm), 0.0)


def normalised_jsd(p: np.ndarray, q: np.ndarray, axis: int = -1) -> np.ndarray:
    """JSD divided by its maximum ln 2, so it lies in [0, 1]."""
    return js_divergence(p, q, axis=axis) / math.log(2.0)
