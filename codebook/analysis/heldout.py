"""Held-out scoring: choose on one half of the data, report on the other.

Anything picked as "best" (a state's code, a feature's neuron and its threshold, a topic's
effect codes) is picked on the *selection* half and scored on the *test* half, so that the
number of candidates cannot inflate the headline. The halves are split by unit (FSM
sequences, corpus documents), deterministically from a seed.

The *permutation null* (:func:`permute_codes`) shuffles each codebook's assignments across
tokens, which keeps every code's frequency and breaks any link to the labels: the best code's
test precision under it should sit near the label's base rate. A null far above the base rate
would mean the selection alone can produce the result.
"""

from __future__ import annotations

import numpy as np

from codebook.analysis.classifiers import code_feature_stats

__all__ = ["code_scores_at", "neuron_scores_at", "permute_codes", "split_halves"]


def split_halves(n: int, seed: int, test_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint, sorted ``(selection, test)`` index arrays over ``range(n)`` drawn with ``seed``.

    The test half gets ``round(test_fraction * n)`` units, at least one of each side when
    ``n >= 2``. The same ``(n, seed, test_fraction)`` always gives the same split.
    """
    if n < 2:
        raise ValueError(f"a held-out split needs at least 2 units (sequences, documents); got {n}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = min(n - 1, max(1, round(test_fraction * n)))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def code_scores_at(
    codes: np.ndarray,
    labels: np.ndarray,
    chosen: np.ndarray,
    num_codes: int,
    num_labels: int,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall (num_labels,) of a *given* code per label on this data.

    ``codes`` (T, k) one codebook's ids (-1 inactive); ``labels`` as
    :func:`~codebook.analysis.classifiers.code_feature_stats` takes them; ``chosen``
    (num_labels,) the code chosen for each label elsewhere (-1: none, NaN out). A chosen code
    that never fires here has precision 0 (it predicts nothing correctly) and recall 0.
    """
    chosen = np.asarray(chosen, dtype=np.int64).ravel()
    if chosen.size != num_labels:
        raise ValueError(f"chosen has {chosen.size} entries, expected {num_labels}")
    stats = code_feature_stats(codes, labels, num_codes, num_labels, mask)
    cols = np.arange(num_labels)
    has = chosen >= 0
    p = np.where(has, stats["precision"][chosen.clip(0), cols], np.nan)
    r = np.where(has, stats["recall"][chosen.clip(0), cols], np.nan)
    return p, r


def neuron_scores_at(
    acts: np.ndarray,
    labels: np.ndarray,
    neuron: np.ndarray,
    sign: np.ndarray,
    threshold: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall of given neurons, signs and thresholds (one per label) on ``acts``
    (M, D) with ``labels`` (M,) (-1: none). A neuron predicts its label where
    ``sign * act >= threshold`` (``codebook.analysis.neurons``); -1 neurons give NaN."""
    acts = np.asarray(acts)
    labels = np.asarray(labels, dtype=np.int64).ravel()
    neuron = np.asarray(neuron, dtype=np.int64).ravel()
    p = np.full(neuron.size, np.nan)
    r = np.full(neuron.size, np.nan)
    for s in np.flatnonzero(neuron >= 0):
        fires = sign[s] * acts[:, neuron[s]].astype(np.float32) >= np.float32(threshold[s])
        pos = labels == s
        hits = int((fires & pos).sum())
        p[s] = hits / int(fires.sum()) if fires.any() else 0.0
        r[s] = hits / int(pos.sum()) if pos.any() else np.nan
    return p, r


def permute_codes(codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``codes`` (M, groups, k) or (M, k) with each group's rows shuffled across
    tokens independently: every code keeps its frequency, any tie to the labels is gone."""
    arr = np.asarray(codes)
    flat = arr[:, None, :] if arr.ndim == 2 else arr
    out = np.empty_like(flat)
    for g in range(flat.shape[1]):
        out[:, g] = flat[rng.permutation(flat.shape[0]), g]
    return out[:, 0] if arr.ndim == 2 else out
