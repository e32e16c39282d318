"""Codes vs neurons as feature classifiers over a code store, one shard at a time.

The held-out protocol on top of these steps (documents split into a selection and a test
half, everything chosen on the first and scored on the second, plus a permutation null) is
``codebook.store.heldout``.

Two passes, each a map over shards whose partial results add up (so a Ray Data aggregation can
combine them, and no process ever holds the whole store):

1. ``count_partials``: per site, (code, feature) co-occurrence counts, code firing counts and
   feature counts; plus the raw activations of each feature's positive tokens.
2. The driver picks each feature's best code per site (``best_code_rows``) and, for every
   neuron, the threshold that gives the code's recall on the positives
   (``neuron_thresholds``); ``above_counts`` then counts, per shard, the tokens at or above
   each threshold, which gives each neuron's precision at matched recall (``neuron_rows``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import pyarrow as pa

from codebook.analysis.classifiers import best_code_per_label, code_feature_stats
from codebook.analysis.labels import FSMStates, TokenRows, label_ids, label_rows
from codebook.analysis.neurons import (
    SIGNS,
    choose_neurons,
    count_at_or_above,
    recall_thresholds,
)
from codebook.store import StoreMeta, acts_column, codes_column, list_to_numpy

Partial = dict[str, Any]


def fsm_labels(table: pa.Table, fsm: Any) -> tuple[np.ndarray, np.ndarray]:
    """(T, states) bool labels of a shard's tokens (``labels.FSMStates``) and the (T,) mask
    of the tokens counted: the state positions."""
    return label_rows(FSMStates(fsm), TokenRows.from_table(table))


def regex_labels(table: pa.Table, source: dict[str, Any], tokenizer: Any, features: list,
                 where: str = "shard") -> np.ndarray:
    """(T, features) bool labels of a shard's tokens, from re-reading its source documents
    (``features.RegexLabels``)."""
    from codebook.analysis.features import RegexLabels
    from codebook.corpus import read_documents

    labeller = RegexLabels(features, tokenizer, functools.partial(read_documents, source), where)
    return labeller.labels(TokenRows.from_table(table))


def _is_positive(labels: np.ndarray, feature: int) -> np.ndarray:
    return labels[:, feature] if labels.dtype == bool else labels == feature


def shard_codes(table: pa.Table, meta: StoreMeta, site: str) -> np.ndarray:
    """(T, groups, k) int64 code ids of one site in a shard."""
    info = meta.sites[site]
    codes = list_to_numpy(table.column(codes_column(site))).astype(np.int64)
    return codes.reshape(-1, info.groups, info.k)


def count_partials(table: pa.Table, meta: StoreMeta, labels: np.ndarray, mask: np.ndarray,
                   num_features: int, sites: list[str], activation_sites: list[str],
                   codes: dict[str, np.ndarray] | None = None) -> Partial:
    """Pass 1 over one shard (see the module docstring). ``labels``: a labeller's (T, F) bool
    (or (T,) ids, -1 none); ``mask``: the tokens counted. Keys: ``tokens``, ``label_counts``,
    ``joint/<site>`` (groups*num_codes, F), ``codes/<site>`` (groups*num_codes,),
    ``pos/<site>/<feature>`` (positives, dim) float16. ``codes``: per site, (T, groups, k)
    ids to count instead of the shard's own (the permutation null)."""
    mask = np.asarray(mask, dtype=bool)
    labels = labels[mask]
    ids = label_ids(labels) if labels.dtype == bool else labels
    counts = np.bincount(ids[ids >= 0], minlength=num_features)[:num_features]
    out: Partial = {"tokens": np.array([int(mask.sum())]), "label_counts": counts}
    for site in sites:
        info = meta.sites[site]
        codes_here = shard_codes(table, meta, site) if codes is None else codes[site]
        flat = codes_here[mask] + (np.arange(info.groups) * info.num_codes)[None, :, None]
        stats = code_feature_stats(flat.reshape(len(flat), info.width), ids,
                                   info.groups * info.num_codes, num_features)
        out[f"joint/{site}"] = stats["joint"]
        out[f"codes/{site}"] = stats["code_counts"]
    for site in activation_sites:
        acts = list_to_numpy(table.column(acts_column(site)))[mask]
        for f in np.flatnonzero(counts):
            out[f"pos/{site}/{f}"] = acts[_is_positive(labels, int(f))]
    return out


def _stacked(key: str) -> bool:
    """Positives' activations (``pos/...``, also under a prefix such as ``sel/pos/...``)."""
    return key.startswith("pos/") or "/pos/" in key


def merge_partials(a: Partial, b: Partial) -> Partial:
    """Add counts; stack positives (``pos/`` keys, prefixed or not)."""
    if not a:
        return b
    if not b:
        return a
    out = {key: np.asarray(value) for key, value in a.items()}  # rows may come back as lists
    for key, value in b.items():
        value = np.asarray(value)
        if key not in out:
            out[key] = value
        elif _stacked(key):
            out[key] = np.concatenate([out[key], value])
        else:
            out[key] = out[key] + value
    return out


NO_POSITIVES = "no positives"
NO_CODE = "no code at recall floor"


def best_code_rows(merged: Partial, meta: StoreMeta, sites: list[str],
                   feature_names: list[str], min_recall: float,
                   all_features: bool = False) -> list[dict[str, Any]]:
    """One row per (feature with positives, site): the best code by precision at
    recall >= ``min_recall`` and the best code by F1 (codes named ``group:code``).

    Every row has ``status``: ``"ok"``, or ``NO_CODE`` when no code co-fires with the feature
    at that recall (code fields None); ``eligible_codes`` (codes at the recall floor) and
    ``code_candidates`` (codes searched). ``all_features``: features without positives get
    their rows too (status ``NO_POSITIVES``), so that every feature is accounted for."""
    rows = []
    label_counts = merged["label_counts"]
    for site in sites:
        info = meta.sites[site]
        joint, code_counts = merged[f"joint/{site}"], merged[f"codes/{site}"]
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(code_counts[:, None] > 0, joint / code_counts[:, None], 0.0)
            recall = np.where(label_counts[None, :] > 0, joint / label_counts[None, :], 0.0)
        stats = {"precision": precision, "recall": recall, "joint": joint}
        code, p, r = best_code_per_label(stats, min_recall=min_recall)
        f1_code, f1_p, f1_r = best_code_per_label(stats, by="f1")
        eligible = ((joint > 0) & (recall >= min_recall)).sum(axis=0)
        for f, name in enumerate(feature_names):
            if label_counts[f] == 0 and not all_features:
                continue
            status = NO_POSITIVES if label_counts[f] == 0 else "ok" if code[f] >= 0 else NO_CODE
            rows.append({
                "feature": name, "site": site, "positives": int(label_counts[f]),
                "status": status,
                "code": _code_name(code[f], info.num_codes),
                "code_precision": _num(p[f]), "code_recall": _num(r[f]),
                "code_firings": int(code_counts[code[f]]) if code[f] >= 0 else 0,
                "f1_code": _code_name(f1_code[f], info.num_codes),
                "f1_precision": _num(f1_p[f]), "f1_recall": _num(f1_r[f]),
                "f1": _f1(f1_p[f], f1_r[f]),
                "eligible_codes": int(eligible[f]),
                "code_candidates": info.groups * info.num_codes,
                "feature_index": f,
            })
    return rows


def _code_name(code: int, num_codes: int) -> str | None:
    return None if code < 0 else f"{code // num_codes}:{code % num_codes}"


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def _f1(p: float, r: float) -> float | None:
    if not (math.isfinite(p) and math.isfinite(r)) or p + r == 0:
        return None
    return float(2 * p * r / (p + r))


def neuron_thresholds(merged: Partial, rows: list[dict[str, Any]],
                      activation_sites: list[str]) -> dict[str, np.ndarray]:
    """Per (site, feature, sign): each neuron's threshold at the best code's recall, and how
    many positives reach it (``thr/...`` and ``pos_above/...``, both (dim,);
    ``neurons.recall_thresholds``)."""
    out: dict[str, np.ndarray] = {}
    for row in rows:
        site, f = row["site"], row["feature_index"]
        key = f"pos/{site}/{f}"
        if site not in activation_sites or row["code_recall"] is None or key not in merged:
            continue
        for sign in SIGNS:
            thr, pos_above = recall_thresholds(merged[key], row["code_recall"], sign)
            out[f"thr/{site}/{f}/{sign}"] = thr
            out[f"pos_above/{site}/{f}/{sign}"] = pos_above
    return out


def above_counts(table: pa.Table, mask: np.ndarray, thresholds: dict[str, np.ndarray]
                 ) -> Partial:
    """Pass 2 over one shard: tokens (inside ``mask``) at or above every threshold."""
    out: Partial = {}
    cache: dict[str, np.ndarray] = {}
    for key, thr in thresholds.items():
        if not key.startswith("thr/"):
            continue
        _, site, f, sign = key.split("/")
        if site not in cache:
            cache[site] = list_to_numpy(table.column(acts_column(site)))[mask].astype(
                np.float32)
        out[f"above/{site}/{f}/{sign}"] = count_at_or_above(cache[site], thr, int(sign))
    return out


def neuron_rows(rows: list[dict[str, Any]], thresholds: dict[str, np.ndarray],
                above: Partial) -> None:
    """Fill each row's best neuron at matched recall (``neuron``, ``neuron_sign``,
    ``neuron_threshold`` in activation units, ``neuron_precision``, ``neuron_recall``; None
    where no activations were stored) with ``neurons.choose_neurons``."""
    for row in rows:
        row.update(neuron=None, neuron_sign=None, neuron_threshold=None, neuron_precision=None,
                   neuron_recall=None)
        candidates = []
        for sign in SIGNS:
            key = f"{row['site']}/{row['feature_index']}/{sign}"
            if f"thr/{key}" in thresholds:
                precision = thresholds[f"pos_above/{key}"] / np.maximum(above[f"above/{key}"], 1)
                candidates.append((sign, precision, thresholds[f"thr/{key}"]))
        if candidates:
            best = choose_neurons(candidates)
            sign, j = int(best["sign"]), int(best["neuron"])
            pos_above = thresholds[f"pos_above/{row['site']}/{row['feature_index']}/{sign}"][j]
            row.update(neuron=j, neuron_sign=sign, neuron_precision=float(best["precision"]),
                       neuron_threshold=float(sign * best["threshold"]),
                       neuron_recall=float(pos_above) / max(_positives(row), 1))


def _positives(row: dict[str, Any]) -> int:
    """The positives the row's choices were made on (the selection half when held out)."""
    return int(row.get("positives_selection", row["positives"]))


def feature_summary(rows: list[dict[str, Any]], sites: list[str] | None = None
                    ) -> list[dict[str, Any]]:
    """Per feature, the site (among ``sites``, default all) whose best code is most precise
    (ties: higher recall)."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["code_precision"] is None or (sites is not None and row["site"] not in sites):
            continue
        cur = best.get(row["feature"])
        key = (row["code_precision"], row["code_recall"] or 0.0)
        if cur is None or key > (cur["code_precision"], cur["code_recall"] or 0.0):
            best[row["feature"]] = row
    return list(best.values())
