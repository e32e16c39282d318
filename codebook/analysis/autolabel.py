"""Automatic labels for every code of a code store: the best simple description of where it fires.

For each code (site, group, code) the candidates are binary labels of tokens:

* ``token``: "the token is ``t``", for the code's most frequent firing tokens;
* ``bigram``: "the previous token (same document, position - 1) is ``a``, this one is ``b``",
  for the most frequent bigrams ending at its firing tokens;
* ``regex``: every regex feature of the project's library (``features.load_features``), for
  stores with text (an FSM store has no text: no regexes).

The code is a classifier of each candidate. The store's documents are split into a selection and
a test half (``store_heldout.DocumentSplit``); each code's label is the candidate with the best
F1 on the selection half (kept: the ``top_candidates`` tokens and bigrams with the most joint
firings there, every regex; at least ``min_count`` joint firings there), and its precision and
recall are reported on the test half.

One pass over the shards, each reduced to sparse counts (``shard_label_counts``) that add up
across shards (``merge_counts``), so no process holds the store. ``build_labels`` is the local
driver and writes ``labels.parquet`` into the store folder; ``codebook.ray_glue.labels`` does
the same counting with Ray Data. ``read_labels`` gives the labels keyed by code name.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from codebook.analysis.features import RegexFeature, RegexLabels, load_features
from codebook.analysis.labels import TokenRows
from codebook.analysis.search import CodeRef
from codebook.analysis.store_heldout import DocumentSplit, store_split
from codebook.errors import ConfigError
from codebook.store import (
    CodeStore,
    StoreMeta,
    codes_column,
    list_to_numpy,
    write_parquet_atomic,
)

__all__ = ["COUNT_KEYS", "COUNT_SCHEMA", "KINDS", "LABELS_FILE", "LABEL_SCHEMA", "LabelJob",
           "ShardCounter", "build_labels", "choose_labels", "finish_labels", "label_text",
           "merge_counts", "prepare_labels", "read_labels", "shard_label_counts"]

LABELS_FILE = "labels.parquet"
METADATA_KEY = b"codebook.labels"
KINDS = ("token", "bigram", "regex", "code")  # "code": the code's own firing totals
LABEL_KINDS = KINDS[:3]  # candidate kinds, in the order ties are broken (simplest first)
HALVES = ("sel", "test")
TOTALS_SITE = ""  # rows of label totals (no code): site "", group -1, code -1
COUNT_KEYS = ["site", "group", "code", "kind", "a", "b", "half"]
COUNT_SCHEMA = pa.schema([("site", pa.string()), ("group", pa.int32()), ("code", pa.int64()),
                          ("kind", pa.string()), ("a", pa.int64()), ("b", pa.int64()),
                          ("half", pa.string()), ("count", pa.int64())])
LABEL_SCHEMA = pa.schema([("site", pa.string()), ("group", pa.int32()), ("code", pa.int64()),
                          ("label", pa.string()), ("kind", pa.string()),
                          ("precision_selection", pa.float64()),
                          ("recall_selection", pa.float64()), ("f1_selection", pa.float64()),
                          ("precision", pa.float64()), ("recall", pa.float64()),
                          ("count", pa.int64())])
MERGE_ROWS = 1_000_000  # the local driver sums pending shard counts at least this many rows
_KEY_LIMIT = 1 << 62  # combined int64 keys stay below this


# ---------------------------------------------------------------------- per shard
class _Rows:
    """Sparse count rows gathered as index arrays, made into one Arrow table at the end."""

    def __init__(self, sites: list[str]):
        self.sites = [*sites, TOTALS_SITE]
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add(self, site: int, group: np.ndarray | int, code: np.ndarray | int, kind: str,
            a: np.ndarray, b: np.ndarray | int, half: np.ndarray, count: np.ndarray) -> None:
        n = len(count)
        if n == 0:
            return
        self.parts.append(tuple(np.broadcast_to(np.asarray(v, dtype=np.int64), (n,))
                                for v in (site, group, code, KINDS.index(kind), a, b, half,
                                          count)))

    def table(self) -> pa.Table:
        if not self.parts:
            return COUNT_SCHEMA.empty_table()
        site, group, code, kind, a, b, half, count = (np.concatenate(c) for c in zip(*self.parts,
                                                                                     strict=True))

        def names(index: np.ndarray, values: Sequence[str]) -> pa.Array:
            return pa.DictionaryArray.from_arrays(pa.array(index.astype(np.int32)),
                                                  pa.array(list(values), pa.string())
                                                  ).cast(pa.string())

        return pa.table([names(site, self.sites), pa.array(group.astype(np.int32)),
                         pa.array(code), names(kind, KINDS), pa.array(a), pa.array(b),
                         names(half, HALVES), pa.array(count)], schema=COUNT_SCHEMA)


def _unique_counts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.unique(np.asarray(keys, dtype=np.int64), return_counts=True)


def _check_radix(*sizes: int) -> None:
    if math.prod(max(1, int(s)) for s in sizes) >= _KEY_LIMIT:
        raise ValueError(f"count keys of sizes {sizes} overflow int64: use smaller shards")


def _sorted_rows(table: pa.Table) -> pa.Table:
    """The shard's rows by document, then position (as extraction writes them)."""
    doc = table.column("doc_id").to_numpy()
    pos = table.column("position").to_numpy()
    if len(doc) < 2 or bool(np.all((doc[1:] > doc[:-1]) | ((doc[1:] == doc[:-1])
                                                           & (pos[1:] > pos[:-1])))):
        return table
    return table.take(pa.array(np.lexsort((pos, doc))))


def _previous_rows(doc: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """(T,) the row of the token before each one in its document (position - 1), -1 none.
    A document never spans shards (``extraction.plan_shards``), so a shard has them all."""
    prev = np.full(len(doc), -1, dtype=np.int64)
    if len(doc) > 1:
        same = (doc[1:] == doc[:-1]) & (pos[1:] == pos[:-1] + 1)
        prev[1:][same] = np.flatnonzero(same)
    return prev


def shard_label_counts(table: pa.Table, meta: StoreMeta, split: DocumentSplit,
                       features: Sequence[RegexFeature] | None = None, tokenizer: Any = None,
                       texts_reader: Callable[[int, int], Sequence[str]] | None = None,
                       sites: Sequence[str] | None = None, where: str = "shard") -> pa.Table:
    """One shard's sparse counts (``COUNT_SCHEMA``), per half (``half``: ``"sel"``/``"test"``).

    Per code (``site``, ``group``, ``code``): ``kind="token"`` joint firings on token ``a``;
    ``"bigram"`` on token ``b`` preceded by ``a`` in its document; ``"regex"`` on tokens of
    regex feature ``a`` (its index in ``features``); ``"code"`` all its firings. Label totals
    have ``site=""`` (group and code -1): tokens ``a``, bigrams ``(a, b)``, regex feature ``a``.
    Unused ``a``/``b`` are -1. A code listed twice in a token's ``k`` slots fires once.

    Regexes count only for stores with text (``meta.tokenizer``) and need ``tokenizer`` and
    ``texts_reader(start, stop)`` (documents ``[start, stop)``, as ``corpus.read_documents``).
    """
    table = _sorted_rows(table)
    doc = table.column("doc_id").to_numpy().astype(np.int64)
    pos = table.column("position").to_numpy().astype(np.int64)
    tok = table.column("token_id").to_numpy().astype(np.int64)
    sites = list(meta.sites) if sites is None else list(sites)
    out = _Rows(sites)
    totals = len(sites)
    half = split.test_tokens(doc).astype(np.int64)
    n = len(doc)

    # token, bigram and regex ids of each row, compacted to this shard's distinct values
    utok, tinv = np.unique(tok, return_inverse=True)
    tinv = tinv.reshape(-1)
    prev = _previous_rows(doc, pos)
    has_prev = prev >= 0
    num_tok = len(utok)
    _check_radix(num_tok, num_tok)
    ubg, binv = np.unique(tinv[prev[has_prev]] * num_tok + tinv[has_prev], return_inverse=True)
    bigram = np.full(n, -1, dtype=np.int64)
    bigram[has_prev] = binv.reshape(-1)
    bg_a, bg_b = utok[ubg // max(num_tok, 1)], utok[ubg % max(num_tok, 1)]
    regex_rows = regex_feats = np.zeros(0, dtype=np.int64)
    num_feat = 0
    if features and meta.tokenizer is not None:
        if tokenizer is None or texts_reader is None:
            raise ValueError("regex features need the tokenizer and a texts_reader")
        num_feat = len(features)
        labels = RegexLabels(list(features), tokenizer, texts_reader, where).labels(
            TokenRows(doc, pos, tok))
        regex_rows, regex_feats = np.nonzero(labels)

    keys, counts = _unique_counts(tinv * 2 + half)
    out.add(totals, -1, -1, "token", utok[keys // 2], -1, keys % 2, counts)
    keys, counts = _unique_counts(bigram[has_prev] * 2 + half[has_prev])
    out.add(totals, -1, -1, "bigram", bg_a[keys // 2], bg_b[keys // 2], keys % 2, counts)
    keys, counts = _unique_counts(regex_feats * 2 + half[regex_rows])
    out.add(totals, -1, -1, "regex", keys // 2, -1, keys % 2, counts)

    for s, site in enumerate(sites):
        info = meta.sites[site]
        ids = list_to_numpy(table.column(codes_column(site))).astype(np.int64)
        ids = np.sort(ids.reshape(n, info.groups, info.k), axis=2)
        fresh = np.ones(ids.shape, dtype=bool)  # the first of equal codes in a group's slots
        fresh[:, :, 1:] = ids[:, :, 1:] != ids[:, :, :-1]
        flat = (ids + (np.arange(info.groups) * info.num_codes)[None, :, None]).reshape(
            n, info.width)
        fresh = fresh.reshape(n, info.width)
        row, slot = np.nonzero(fresh)
        code = flat[row, slot]
        n_codes = info.groups * info.num_codes
        _check_radix(n_codes, max(num_tok, len(ubg), num_feat), 2)

        def add(kind: str, keys: np.ndarray, size: int, decode: Callable[[np.ndarray], tuple],
                s: int = s, num_codes: int = info.num_codes) -> None:
            keys, counts = _unique_counts(keys)
            c, label = keys // 2 // size, keys // 2 % size
            a, b = decode(label)
            out.add(s, c // num_codes, c % num_codes, kind, a, b, keys % 2, counts)

        add("code", code * 2 + half[row], 1, lambda lab: (np.full(len(lab), -1), -1))
        add("token", (code * num_tok + tinv[row]) * 2 + half[row], num_tok,
            lambda lab: (utok[lab], -1))
        on = has_prev[row]
        add("bigram", (code[on] * len(ubg) + bigram[row[on]]) * 2 + half[row[on]], len(ubg),
            lambda lab: (bg_a[lab], bg_b[lab]))
        if num_feat:
            keep = fresh[regex_rows]  # (P, width): each labelled token's codes
            r_code = flat[regex_rows][keep]
            r_feat = np.repeat(regex_feats, flat.shape[1])[keep.reshape(-1)]
            r_half = np.repeat(half[regex_rows], flat.shape[1])[keep.reshape(-1)]
            add("regex", (r_code * num_feat + r_feat) * 2 + r_half, num_feat,
                lambda lab: (lab, -1))
    return out.table()


def merge_counts(tables: Iterable[pa.Table], sort: bool = True) -> pa.Table:
    """Sparse count tables summed by key (``COUNT_KEYS``; pyarrow ``group_by``), sorted by key
    unless ``sort`` is False (the sums are the same either way)."""
    tables = [t.select(COUNT_SCHEMA.names).cast(COUNT_SCHEMA) for t in tables]
    if not tables:
        return COUNT_SCHEMA.empty_table()
    merged = pa.concat_tables(tables).group_by(COUNT_KEYS).aggregate([("count", "sum")])
    merged = merged.rename_columns([*COUNT_KEYS, "count"]).select(COUNT_SCHEMA.names)
    merged = merged.cast(COUNT_SCHEMA)
    return merged.sort_by([(k, "ascending") for k in COUNT_KEYS]) if sort else merged


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
    """Check the store and options (``store_heldout.store_split`` reads every shard's document
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
        from codebook.analysis.search import StoreSearch

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
