"""Automatic labels for every code of a code store: the best simple description of where it fires.

For each code (site, group, code) the candidates are binary labels of tokens:

* ``token``: "the token is ``t``", for the code's most frequent firing tokens;
* ``bigram``: "the previous token (same document, position - 1) is ``a``, this one is ``b``",
  for the most frequent bigrams ending at its firing tokens;
* ``regex``: every regex feature of the project's library (``features.load_features``), for
  stores with text (an FSM store has no text: no regexes).

The code is a classifier of each candidate. The store's documents are split into a selection and
a test half (``heldout.DocumentSplit``); each code's label is the candidate with the best
F1 on the selection half (kept: the ``top_candidates`` tokens and bigrams with the most joint
firings there, every regex; at least ``min_count`` joint firings there), and its precision and
recall are reported on the test half.

One pass over the shards, each reduced to sparse counts (``label_counts.shard_label_counts``)
that add up across shards (``label_counts.merge_counts``), so no process holds the store.
``build_labels`` is the local driver and writes ``labels.parquet`` into the store folder;
``codebook.ray_glue.labels`` does the same counting with Ray Data. ``read_labels`` gives the
labels keyed by code name.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from codebook.analysis.features import RegexFeature, load_features
from codebook.errors import ConfigError
from codebook.store import CodeStore, StoreMeta, codes_column, write_parquet_atomic
from codebook.store.heldout import DocumentSplit, store_split
from codebook.store.label_counts import (
    COUNT_SCHEMA,
    HALVES,
    KINDS,
    TOTALS_SITE,
    merge_counts,
    shard_label_counts,
)
from codebook.store.search import CodeRef

__all__ = ["LABELS_FILE", "LABEL_SCHEMA", "LabelJob", "ShardCounter", "build_labels",
           "choose_labels", "finish_labels", "label_text", "prepare_labels", "read_labels"]

LABELS_FILE = "labels.parquet"
METADATA_KEY = b"codebook.labels"
LABEL_KINDS = KINDS[:3]  # candidate kinds, in the order ties are broken (simplest first)
LABEL_SCHEMA = pa.schema([("site", pa.string()), ("group", pa.int32()), ("code", pa.int64()),
                          ("label", pa.string()), ("kind", pa.string()),
                          ("precision_selection", pa.float64()),
                          ("recall_selection", pa.float64()), ("f1_selection", pa.float64()),
                          ("precision", pa.float64()), ("recall", pa.float64()),
                          ("count", pa.int64())])
MERGE_ROWS = 1_000_000  # the local driver sums pending shard counts at least this many rows


# ---------------------------------------------------------------------- choosing
def label_text(kind: str, a: int, b: int, piece: Callable[[int], str],
               feature_names: Sequence[str], quote: bool = True) -> str:
    """``token " the"``, ``" of" → " the"``, ``regex:digits``; unquoted ids when ``quote`` is
    False (FSM tokens: ``token 17``, ``9 → 2``)."""
    def text(t: int) -> str:
        return json.dumps(piece(t), ensure_ascii=False) if quote else piece(t)

    if kind == "token":
        return f"token {text(a)}"
    if kind == "bigram":
        return f"{text(a)} → {text(b)}"
    return f"regex:{feature_names[a]}"


def _by_half(frame: Any, index: list[str], prefix: str) -> Any:
    """Counts summed per ``index``, one column per half (``<prefix>_sel``, ``<prefix>_test``)."""
    out = frame.groupby(index + ["half"], sort=True)["count"].sum().unstack("half", fill_value=0)
    out = out.reindex(columns=list(HALVES), fill_value=0)
    out.columns = [f"{prefix}_{h}" for h in HALVES]
    return out.reset_index()


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _nullable(values: np.ndarray) -> pa.Array:
    values = np.asarray(values, dtype=np.float64)
    return pa.array(values, pa.float64(), mask=np.isnan(values))


def choose_labels(counts: pa.Table, meta: StoreMeta, piece: Callable[[int], str],
                  feature_names: Sequence[str], top_candidates: int = 5,
                  min_count: int = 2) -> pa.Table:
    """Each code's label (``LABEL_SCHEMA``) from merged counts: among its ``top_candidates``
    tokens and bigrams by joint firings on the selection half and every regex, those with at
    least ``min_count`` (and at least 1) joint firings there, the best F1 on the selection half
    (ties: token, bigram, regex, then the smaller ids). ``precision`` / ``recall``: that label
    on the test half (null when the code never fires there / the label never holds there);
    ``count``: the code's firings in both halves. Codes without a candidate get no row."""
    df = counts.select(COUNT_SCHEMA.names).to_pandas()
    is_total = df["site"] == TOTALS_SITE
    known = df["site"].isin(list(meta.sites))
    joint = df[known & (df["kind"] != "code")]
    if joint.empty:
        return LABEL_SCHEMA.empty_table()
    joint = _by_half(joint, ["site", "group", "code", "kind", "a", "b"], "joint")
    fires = _by_half(df[known & (df["kind"] == "code")], ["site", "group", "code"], "fires")
    totals = _by_half(df[is_total], ["kind", "a", "b"], "label")

    joint = joint[joint["joint_sel"] >= max(1, min_count)]
    joint = joint.assign(kind_rank=joint["kind"].map({k: i for i, k in enumerate(LABEL_KINDS)}))
    joint = joint.sort_values(["site", "group", "code", "kind_rank", "joint_sel", "a", "b"],
                              ascending=[True, True, True, True, False, True, True],
                              kind="mergesort")
    rank = joint.groupby(["site", "group", "code", "kind"], sort=False).cumcount()
    cand = joint[(joint["kind"] == "regex") | (rank < top_candidates)]
    cand = cand.merge(fires, on=["site", "group", "code"], how="left").merge(
        totals, on=["kind", "a", "b"], how="left")
    cand = cand.fillna({c: 0 for c in ("fires_sel", "fires_test", "label_sel", "label_test")})
    if cand.empty:
        return LABEL_SCHEMA.empty_table()
    p = _ratio(cand["joint_sel"], cand["fires_sel"])
    r = _ratio(cand["joint_sel"], cand["label_sel"])
    f1 = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1.0), 0.0)
    cand = cand.assign(precision_selection=p, recall_selection=r, f1_selection=f1,
                       site_rank=cand["site"].map({s: i for i, s in enumerate(meta.sites)}))
    best = cand.sort_values(["site_rank", "group", "code", "f1_selection", "kind_rank", "a", "b"],
                            ascending=[True, True, True, False, True, True, True],
                            kind="mergesort").drop_duplicates(["site", "group", "code"])
    quote = meta.tokenizer is not None
    labels = [label_text(k, int(a), int(b), piece, feature_names, quote)
              for k, a, b in zip(best["kind"], best["a"], best["b"], strict=True)]
    return pa.table({
        "site": pa.array(best["site"].tolist(), pa.string()),
        "group": pa.array(best["group"].to_numpy(np.int32)),
        "code": pa.array(best["code"].to_numpy(np.int64)),
        "label": pa.array(labels, pa.string()),
        "kind": pa.array(best["kind"].tolist(), pa.string()),
        "precision_selection": pa.array(best["precision_selection"].to_numpy(np.float64)),
        "recall_selection": pa.array(best["recall_selection"].to_numpy(np.float64)),
        "f1_selection": pa.array(best["f1_selection"].to_numpy(np.float64)),
        "precision": _nullable(_ratio(best["joint_test"], best["fires_test"])),
        "recall": _nullable(_ratio(best["joint_test"], best["label_test"])),
        "count": pa.array((best["fires_sel"] + best["fires_test"]).to_numpy(np.int64)),
    }, schema=LABEL_SCHEMA)


# ---------------------------------------------------------------------- drivers
@dataclass(frozen=True)
class LabelJob:
    """One labelling run, checked and picklable (a Ray actor gets it as is)."""

    store_root: str
    sites: tuple[str, ...]
    split: DocumentSplit
    features: tuple[RegexFeature, ...]  # empty for stores without text
    top_candidates: int = 5
    min_count: int = 2

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    def info(self) -> dict[str, Any]:
        return {"split": self.split.info(), "sites": list(self.sites),
                "features": self.feature_names, "top_candidates": self.top_candidates,
                "min_count": self.min_count}


def _open(store: CodeStore | str | os.PathLike[str]) -> CodeStore:
    return store if isinstance(store, CodeStore) else CodeStore(store)


def prepare_labels(store: CodeStore | str | os.PathLike[str],
                   features: Sequence[RegexFeature] | None = None,
                   sites: Sequence[str] | None = None, seed: int = 0,
                   test_fraction: float = 0.5, top_candidates: int = 5,
                   min_count: int = 2) -> LabelJob:
    """Check the store and options (``heldout.store_split`` reads every shard's document
    ids, as ``pipelines/evaluate.py`` does); ``features=None``: the default regex library."""
    from codebook.resolve import check_site_names

    store = _open(store)
    meta = store.meta
    files = store.shard_files()
    if not files:
        raise ConfigError("store", f"{store.root} has no finished shards",
                          "run pipelines/extract.py first")
    if top_candidates < 1:
        raise ConfigError("top_candidates", f"must be >= 1, got {top_candidates}", "e.g. 5")
    if min_count < 1:
        raise ConfigError("min_count", f"must be >= 1, got {min_count}", "e.g. 2")
    split = store_split(store, seed, test_fraction, "store")
    names = check_site_names(list(sites) if sites else None, meta.sites, "sites")
    regexes: tuple[RegexFeature, ...] = ()
    if meta.tokenizer is not None:
        regexes = tuple(load_features(None) if features is None else features)
        for f in regexes:
            f.compiled()
    return LabelJob(str(store.root), tuple(names), split, regexes, top_candidates, min_count)


class ShardCounter:
    """``shard_label_counts`` for a job's shards (the tokenizer is loaded once, on first use)."""

    def __init__(self, job: LabelJob):
        from codebook.store.search import StoreSearch

        self.job = job
        self.search = StoreSearch(job.store_root)  # its tokenizer and token texts, loaded once
        self.store = self.search.store

    @property
    def tokenizer(self) -> Any:
        return self.search.tokenizer

    def piece(self, token_id: int) -> str:
        """A token's text (its id for stores without a tokenizer)."""
        return self.search.piece(token_id)

    def __call__(self, path: str | os.PathLike[str]) -> pa.Table:
        from codebook.corpus import read_documents

        meta = self.store.meta
        columns = ["doc_id", "position", "token_id", *(codes_column(s) for s in self.job.sites)]
        table = self.store.read_shard(path, columns)
        features = self.job.features if meta.tokenizer is not None else ()
        return shard_label_counts(
            table, meta, self.job.split, features, self.tokenizer if features else None,
            functools.partial(read_documents, meta.source) if features else None,
            self.job.sites, str(path))


def finish_labels(job: LabelJob, counts: pa.Table, counter: ShardCounter | None = None
                  ) -> pa.Table:
    """Choose every code's label from the merged counts and write ``labels.parquet``."""
    counter = counter or ShardCounter(job)
    labels = choose_labels(counts, counter.store.meta, counter.piece,
                           job.feature_names, job.top_candidates, job.min_count)
    labels = labels.replace_schema_metadata({METADATA_KEY: json.dumps(job.info(),
                                                                      sort_keys=True)})
    write_parquet_atomic(labels, Path(job.store_root) / LABELS_FILE)
    return labels


def build_labels(store: CodeStore | str | os.PathLike[str],
                 features: Sequence[RegexFeature] | None = None,
                 sites: Sequence[str] | None = None, seed: int = 0, test_fraction: float = 0.5,
                 top_candidates: int = 5, min_count: int = 2,
                 progress: bool | None = None) -> pa.Table:
    """Label every code of the store, shard by shard in this process (no Ray); writes
    ``labels.parquet`` in the store folder (atomically) and returns it."""
    job = prepare_labels(store, features, sites, seed, test_fraction, top_candidates, min_count)
    counter = ShardCounter(job)
    merged = COUNT_SCHEMA.empty_table()
    pending: list[pa.Table] = []
    for path in tqdm(counter.store.shard_files(), desc="labels", unit="shard",
                     disable=None if progress is None else not progress):
        pending.append(counter(path))
        # merge once the new rows outnumber the merged ones: each row is regrouped O(1) times
        if sum(t.num_rows for t in pending) >= max(merged.num_rows, MERGE_ROWS):
            merged, pending = merge_counts([merged, *pending], sort=False), []
    return finish_labels(job, merge_counts([merged, *pending]), counter)


def read_labels(store: CodeStore | str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """``labels.parquet`` as ``{code name: row}`` (names as ``CodeRef.name``); {} if missing."""
    root = store.root if isinstance(store, CodeStore) else Path(store).expanduser().resolve()
    path = root / LABELS_FILE
    if not path.is_file():
        return {}
    return {CodeRef(r["site"], int(r["group"]), int(r["code"])).name: r
            for r in pq.read_table(path).to_pylist()}
