"""Held-out store evaluation: choose on one half of the documents, report on the other.

The documents of a code store are split (seeded, ``codebook.analysis.heldout.split_halves``)
into a *selection* half and a *test* half; every token goes with its document. Pass 1
(``heldout_count_partials``) keeps two sets of ``evaluate.count_partials`` counts, one per half
(keys prefixed ``sel/`` and ``test/``), plus the same code counts after each codebook's
assignments are shuffled across the shard's counted tokens (``null/sel/``, ``null/test/``: the
permutation null, every code's frequency in the shard kept). The driver then

* chooses each feature's best code per site on the selection half (``heldout_code_rows``) and
  scores that code on the test half (``code_precision_test``, ``code_recall_test``); the null
  does the same on the shuffled counts (``code_precision_null``, to set beside ``base_rate``,
  the feature's share of the test tokens);
* takes each neuron's threshold from the selection positives (``evaluate.neuron_thresholds``
  on the ``sel/`` counts); pass 2 (``heldout_above_counts``) counts tokens at or above every
  threshold in each half; the neuron and its threshold are chosen on the selection half and
  scored on the test half (``heldout_neuron_rows``);
* ``heldout_summary`` accounts for every feature: one without a qualifying code says why, and
  each mean stands beside its coverage (features it is over / all features).

All partials still add up across shards, so the store is streamed shard by shard as before.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from codebook.analysis.heldout import permute_codes, split_halves
from codebook.errors import ConfigError
from codebook.store import CodeStore, StoreMeta, acts_column, list_to_numpy, read_token_file
from codebook.store.evaluate import (
    NO_CODE,
    NO_POSITIVES,
    Partial,
    best_code_rows,
    count_partials,
    feature_summary,
    neuron_rows,
    shard_codes,
)

SELECTION, TEST = "sel/", "test/"
NULL_SELECTION, NULL_TEST = "null/sel/", "null/test/"
NO_SELECTION_POSITIVES = "no positives in the selection half"
NO_ACTIVATIONS = "no activations stored for this site"
MEANS_OVER = ("code means: the features with a qualifying code (features_with_code, "
              "coverage); neuron means: the features with a neuron (features_with_neuron, "
              "neuron_coverage); code_precision_null and base_rate_mean: the covered features "
              "whose shuffled codes also reach the recall floor (features_with_null_code)")


@dataclass(frozen=True)
class DocumentSplit:
    """Documents ``0 .. num_documents - 1`` split into selection and test halves by ``seed``."""

    num_documents: int
    seed: int = 0
    test_fraction: float = 0.5

    @functools.cached_property
    def halves(self) -> tuple[np.ndarray, np.ndarray]:
        """``(selection, test)`` sorted document ids (``analysis.heldout.split_halves``)."""
        return split_halves(self.num_documents, self.seed, self.test_fraction)

    @functools.cached_property
    def is_test(self) -> np.ndarray:
        """(num_documents,) bool: the test half's documents."""
        out = np.zeros(self.num_documents, dtype=bool)
        out[self.halves[1]] = True
        return out

    def test_tokens(self, doc_ids: np.ndarray) -> np.ndarray:
        """(T,) bool: the tokens whose document is in the test half."""
        doc_ids = np.asarray(doc_ids, dtype=np.int64)
        if doc_ids.size and (doc_ids.min() < 0 or doc_ids.max() >= self.num_documents):
            raise ValueError(f"document ids outside [0, {self.num_documents}) in the split")
        return self.is_test[doc_ids]

    def kwargs(self) -> dict[str, Any]:
        return {"num_documents": self.num_documents, "seed": self.seed,
                "test_fraction": self.test_fraction}

    def info(self) -> dict[str, Any]:
        sel, test = self.halves
        return {"unit": "document", **self.kwargs(), "documents_selection": int(sel.size),
                "documents_test": int(test.size)}


def store_split(store: CodeStore, seed: int, test_fraction: float,
                where: str = "--store") -> DocumentSplit:
    """The held-out split of a store's documents, checked before any work: every finished
    shard is opened (a foreign or corrupt file fails here, named) for its document ids, so a
    partial store splits the documents it holds."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError("--test-fraction", f"must be in (0, 1), got {test_fraction}",
                          "e.g. 0.5")
    last_doc = -1
    for f in store.shard_files():
        docs = read_token_file(f, store.meta, columns=["doc_id"]).column("doc_id").to_numpy()
        last_doc = max(last_doc, int(docs.max()) if docs.size else -1)
    split = DocumentSplit(max(store.meta.num_documents, last_doc + 1), seed, test_fraction)
    if split.num_documents < 2:
        raise ConfigError(where, f"{split.num_documents} document(s): a held-out split needs "
                          "at least 2", "extract more documents")
    return split


def _prefixed(prefix: str, partial: Partial, keep: tuple[str, ...] | None = None) -> Partial:
    return {prefix + k: v for k, v in partial.items() if keep is None or k.startswith(keep)}


def sub_partial(merged: Partial, prefix: str) -> Partial:
    """The keys under ``prefix``, with the prefix taken off."""
    return {k[len(prefix):]: np.asarray(v) for k, v in merged.items() if k.startswith(prefix)}


def heldout_count_partials(table: pa.Table, meta: StoreMeta, labels: np.ndarray,
                           mask: np.ndarray, num_features: int, sites: list[str],
                           activation_sites: list[str], split: DocumentSplit, shard: int,
                           null: bool = True) -> Partial:
    """Pass 1 over one shard, per half (see the module docstring). The null shuffles each
    codebook group's rows across the shard's counted tokens with
    ``default_rng([split.seed, shard])``, so it is the same on every rerun."""
    mask = np.asarray(mask, dtype=bool)
    test_tok = split.test_tokens(table.column("doc_id").to_numpy())
    halves = ((SELECTION, mask & ~test_tok), (TEST, mask & test_tok))
    out: Partial = {}
    for prefix, half in halves:
        out.update(_prefixed(prefix, count_partials(table, meta, labels, half, num_features,
                                                    sites, activation_sites)))
    if null:
        rng = np.random.default_rng([split.seed, shard])
        permuted = {}
        for site in sites:
            codes = shard_codes(table, meta, site)
            codes[mask] = permute_codes(codes[mask], rng)
            permuted[site] = codes
        for prefix, (_, half) in zip((NULL_SELECTION, NULL_TEST), halves, strict=True):
            part = count_partials(table, meta, labels, half, num_features, sites, [],
                                  codes=permuted)
            out.update(_prefixed(prefix, part, keep=("joint/", "codes/")))
    return out


def heldout_above_counts(table: pa.Table, mask: np.ndarray, thresholds: dict[str, np.ndarray],
                         split: DocumentSplit) -> Partial:
    """Pass 2 over one shard: per half, the tokens (inside ``mask``) at or above every
    threshold (``above/<site>/<feature>/<sign>`` under ``sel/`` and ``test/``)."""
    from codebook.analysis.neurons import count_at_or_above

    mask = np.asarray(mask, dtype=bool)
    test_tok = split.test_tokens(table.column("doc_id").to_numpy())
    out: Partial = {}
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, thr in thresholds.items():
        if not key.startswith("thr/"):
            continue
        _, site, f, sign = key.split("/")
        if site not in cache:
            acts = list_to_numpy(table.column(acts_column(site))).astype(np.float32)
            cache[site] = acts[mask & ~test_tok], acts[mask & test_tok]
        for prefix, acts in zip((SELECTION, TEST), cache[site], strict=True):
            out[f"{prefix}above/{site}/{f}/{sign}"] = count_at_or_above(acts, thr, int(sign))
    return out


def _code_index(name: str | None, num_codes: int) -> int:
    if name is None:
        return -1
    group, code = map(int, name.split(":"))
    return group * num_codes + code


def _score(counts: Partial, site: str, code: int, f: int) -> tuple[float | None, float | None]:
    """Precision and recall of one code for feature ``f`` on a half's counts (precision 0 when
    the code never fires there; recall None when the feature has no positive there)."""
    if code < 0:
        return None, None
    joint = int(counts[f"joint/{site}"][code, f])
    fired = int(counts[f"codes/{site}"][code])
    positives = int(counts["label_counts"][f])
    return (joint / fired if fired else 0.0), (joint / positives if positives else None)


def heldout_code_rows(merged: Partial, meta: StoreMeta, sites: list[str],
                      feature_names: list[str], min_recall: float) -> list[dict[str, Any]]:
    """One row per (feature, site), every feature included: the codes chosen on the selection
    half (``evaluate.best_code_rows``: ``code_precision``, ``code_recall``, the F1 code)
    with their test-half figures (``*_test``), the null (``code_precision_null``: the test
    precision of the code the same choice finds on shuffled codes), the feature's test
    ``base_rate`` and ``positives`` (both halves) / ``positives_selection`` /
    ``positives_test``. ``status``: ``"ok"`` or why there is no code."""
    sel, test = sub_partial(merged, SELECTION), sub_partial(merged, TEST)
    rows = best_code_rows(sel, meta, sites, feature_names, min_recall, all_features=True)
    null_rows: list[dict[str, Any]] = [{} for _ in rows]
    null_test: Partial = {}
    if any(k.startswith(NULL_SELECTION) for k in merged):
        null_sel = {**sub_partial(merged, NULL_SELECTION), "label_counts": sel["label_counts"]}
        null_test = {**sub_partial(merged, NULL_TEST), "label_counts": test["label_counts"]}
        null_rows = best_code_rows(null_sel, meta, sites, feature_names, min_recall,
                                   all_features=True)
    tokens_test = int(test["tokens"].sum())
    for row, null_row in zip(rows, null_rows, strict=True):
        site, f = row["site"], row["feature_index"]
        num_codes = meta.sites[site].num_codes
        p_sel, p_test = row["positives"], int(test["label_counts"][f])
        row.update(positives=p_sel + p_test, positives_selection=p_sel, positives_test=p_test,
                   base_rate=p_test / tokens_test if tokens_test else None)
        if row["status"] == NO_POSITIVES and p_test:
            row["status"] = NO_SELECTION_POSITIVES
        row["code_precision_test"], row["code_recall_test"] = _score(
            test, site, _code_index(row["code"], num_codes), f)
        f1_p, f1_r = _score(test, site, _code_index(row["f1_code"], num_codes), f)
        row.update(f1_precision_test=f1_p, f1_recall_test=f1_r,
                   f1_test=_f1(f1_p, f1_r))
        row.update(code_precision_null=None, code_precision_null_selection=None)
        if null_row.get("code") is not None:
            row["code_precision_null"] = _score(
                null_test, site, _code_index(null_row["code"], num_codes), f)[0]
            row["code_precision_null_selection"] = null_row["code_precision"]
    return rows


def _f1(p: float | None, r: float | None) -> float | None:
    return None if p is None or r is None or p + r == 0 else 2 * p * r / (p + r)


def heldout_neuron_rows(rows: list[dict[str, Any]], thresholds: dict[str, np.ndarray],
                        above: Partial, merged: Partial, activation_sites: list[str]) -> None:
    """Each row's neuron, sign and threshold chosen on the selection half
    (``evaluate.neuron_rows`` on the ``sel/`` counts: ``neuron_precision``,
    ``neuron_recall``) and scored on the test half (``neuron_precision_test``,
    ``neuron_recall_test``: the test positives at or above the threshold, from pass 1's
    activations, over the test tokens at or above it, from pass 2). ``neuron_status``."""
    neuron_rows(rows, thresholds, sub_partial(above, SELECTION))
    test_above, test = sub_partial(above, TEST), sub_partial(merged, TEST)
    for row in rows:
        site, f = row["site"], row["feature_index"]
        row.update(neuron_precision_test=None, neuron_recall_test=None)
        if site not in activation_sites:
            row["neuron_status"] = NO_ACTIVATIONS
            continue
        if row["neuron"] is None:
            row["neuron_status"] = row["status"] if row["status"] != "ok" else "no neuron"
            continue
        row["neuron_status"] = "ok"
        sign, j = row["neuron_sign"], row["neuron"]
        key = f"{site}/{f}/{sign}"
        thr = np.float32(thresholds[f"thr/{key}"][j])
        fired = int(test_above[f"above/{key}"][j])
        pos = test.get(f"pos/{site}/{f}")
        hits = 0 if pos is None else int((sign * pos[:, j].astype(np.float32) >= thr).sum())
        row["neuron_precision_test"] = hits / fired if fired else 0.0
        row["neuron_recall_test"] = hits / row["positives_test"] if row["positives_test"] else None


def _mean(values: list[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(vals)) if vals else None


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


PER_FEATURE_KEYS = ("feature", "status", "site", "code", "code_precision", "code_precision_test",
                    "code_recall", "code_recall_test", "code_precision_null", "base_rate",
                    "eligible_codes", "neuron", "neuron_precision", "neuron_precision_test",
                    "neuron_status", "positives", "positives_selection", "positives_test")


def heldout_summary(rows: list[dict[str, Any]], feature_names: list[str], meta: StoreMeta,
                    sites: list[str], activation_sites: list[str]) -> dict[str, Any]:
    """The summary's held-out part: every feature in ``per_feature`` (in the order given; a
    feature without a qualifying code has ``status`` saying why and None figures), means over
    the covered features beside their coverage, the null beside the base rates, and the
    number of candidates. Codes and neurons are compared at the same (feature, site): the best
    site among those with stored activations when there are any, chosen by the selection
    half's code precision."""
    compare = activation_sites or None
    best = {r["feature"]: r for r in feature_summary(rows, compare)}
    best_any = feature_summary(rows)
    n = len(feature_names)
    per_feature = []
    for name in feature_names:
        row = best.get(name)
        if row is None:
            mine = [r for r in rows if r["feature"] == name
                    and (compare is None or r["site"] in compare)]
            first = mine[0] if mine else {"status": NO_POSITIVES}
            per_feature.append({k: first.get(k) for k in PER_FEATURE_KEYS}
                               | {"feature": name, "status": first["status"], "site": None,
                                  "code_precision_null": None})
        else:
            per_feature.append({k: row.get(k) for k in PER_FEATURE_KEYS})
    # the null repeats the whole choice (site included) on shuffled codes
    null: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["code_precision_null_selection"] is None or r["feature"] not in best or (
                compare is not None and r["site"] not in compare):
            continue
        cur = null.get(r["feature"])
        if cur is None or r["code_precision_null_selection"] > cur["code_precision_null_selection"]:
            null[r["feature"]] = r
    for entry in per_feature:
        if entry["feature"] in null:
            entry["code_precision_null"] = null[entry["feature"]]["code_precision_null"]
    covered = list(best.values())
    with_neuron = [r for r in covered if r["neuron"] is not None]
    codes = {s: meta.sites[s].groups * meta.sites[s].num_codes for s in sites}
    neurons = {s: 2 * meta.sites[s].dim for s in activation_sites}
    return {
        "features": n,
        "features_with_code": len(covered),
        "coverage": _share(len(covered), n),
        "code_precision_mean": _mean([r["code_precision"] for r in covered]),
        "code_precision_test_mean": _mean([r["code_precision_test"] for r in covered]),
        "code_recall_mean": _mean([r["code_recall"] for r in covered]),
        "code_recall_test_mean": _mean([r["code_recall_test"] for r in covered]),
        "features_with_code_all_sites": len(best_any),
        "coverage_all_sites": _share(len(best_any), n),
        "code_precision_mean_all_sites": _mean([r["code_precision"] for r in best_any]),
        "code_precision_test_mean_all_sites": _mean([r["code_precision_test"]
                                                     for r in best_any]),
        "features_with_neuron": len(with_neuron),
        "neuron_coverage": _share(len(with_neuron), n),
        "neuron_precision_mean": _mean([r["neuron_precision"] for r in with_neuron]),
        "neuron_precision_test_mean": _mean([r["neuron_precision_test"] for r in with_neuron]),
        "neuron_recall_test_mean": _mean([r["neuron_recall_test"] for r in with_neuron]),
        "features_with_null_code": len(null),
        "code_precision_null": _mean([r["code_precision_null"] for r in null.values()]),
        "base_rate_mean": _mean([r["base_rate"] for r in null.values()]),
        "means_over": MEANS_OVER,
        "candidates": {
            "codes": sum(codes[s] for s in (compare or sites)),
            "codes_all_sites": sum(codes.values()),
            "neurons": sum(neurons.values()),
            "per_site": {s: {"codes": codes[s], "neurons": neurons.get(s, 0)} for s in sites},
            "note": "codes: every code of the compared sites is a candidate for each feature; "
                    "neurons: site-input neurons x 2 signs, searched at the feature's chosen "
                    "site; eligible_codes (per feature): codes at the recall floor on the "
                    "selection half",
        },
        "per_feature": per_feature,
    }


__all__ = ["DocumentSplit", "NO_ACTIVATIONS", "NO_CODE", "NO_POSITIVES",
           "NO_SELECTION_POSITIVES", "heldout_above_counts", "heldout_code_rows",
           "heldout_count_partials", "heldout_neuron_rows", "heldout_summary", "sub_partial"]
