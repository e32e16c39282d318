"""Automatic labels' counting: one shard of a code store reduced to sparse count rows that add up.

Per code (``site``, ``group``, ``code``) and half of the documents (``half``: ``"sel"`` or
``"test"``, ``heldout.DocumentSplit``), how often it fires together with each candidate label: a
token (``kind="token"``), a token bigram ending at the firing token (``"bigram"``) or a regex
feature (``"regex"``), plus its own firings (``"code"``) and the labels' totals (``site=""``).
``shard_label_counts`` counts one shard, ``merge_counts`` sums shards; ``codebook.store.autolabel``
chooses the labels from the sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from codebook.analysis.features import RegexFeature, RegexLabels
from codebook.analysis.labels import TokenRows
from codebook.store import StoreMeta, codes_column, list_to_numpy
from codebook.store.heldout import DocumentSplit

__all__ = ["COUNT_KEYS", "COUNT_SCHEMA", "HALVES", "KINDS", "TOTALS_SITE", "merge_counts",
           "shard_label_counts"]

KINDS = ("token", "bigram", "regex", "code")  # "code": the code's own firing totals
HALVES = ("sel", "test")
TOTALS_SITE = ""  # rows of label totals (no code): site "", group -1, code -1
COUNT_KEYS = ["site", "group", "code", "kind", "a", "b", "half"]
COUNT_SCHEMA = pa.schema([("site", pa.string()), ("group", pa.int32()), ("code", pa.int64()),
                          ("kind", pa.string()), ("a", pa.int64()), ("b", pa.int64()),
                          ("half", pa.string()), ("count", pa.int64())])
_KEY_LIMIT = 1 << 62  # combined int64 keys stay below this


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
