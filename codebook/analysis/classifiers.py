"""Codes as classifiers of features (FSM states, regex features), and the summaries around them.

Definitions (the paper's): for a code ``c`` and a label ``l``,
precision = #(tokens where c fires and l holds) / #(tokens where c fires) and
recall = #(tokens where c fires and l holds) / #(tokens where l holds), counted over the
positions considered (``mask``). Labels come from a labeller (``codebook.analysis.labels``);
neurons are compared at the code's recall by ``codebook.analysis.neurons``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from codebook.analysis.labels import label_ids

__all__ = [
    "best_code_per_label",
    "code_feature_stats",
    "js_divergence",
    "normalised_jsd",
    "precision_summary",
]


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
        labels: (T,) label id per token, -1 = no label; (T, m) for several labels per token;
            or (T, num_labels) bool, a labeller's output.
        num_codes, num_labels: sizes of the id spaces.
        mask: (T,) bool, positions considered (default: all). Tokens with label -1 inside the
            mask still count in a code's firing total (the precision denominator).

    Returns a dict with ``precision`` and ``recall`` (num_codes, num_labels) float64 (0 where
    the denominator is 0), ``joint`` (num_codes, num_labels) int64 counts, ``code_counts``
    (num_codes,), ``label_counts`` (num_labels,) and ``num_tokens`` (positions considered).
    """
    codes2 = _as_2d_ids(codes, "codes")
    labels = np.asarray(labels)
    labels2 = _as_2d_ids(label_ids(labels) if labels.dtype == bool else labels, "labels",
                         codes2.shape[0])
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
