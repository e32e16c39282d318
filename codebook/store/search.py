"""Code search over a code store: codes by regex or token, a code's contexts, similar codes.

Codes are named ``site.group.code`` (e.g. ``attn_heads_7.12.7884``: layer 7, head 12, code 7884,
the paper's ``7.12.7884``). Token and context queries run as SQL in DuckDB over the Parquet
shards (``query.StoreQuery``); a regex search labels the documents' text shard by shard in
Python (the regex runs on text, not on the store) and counts with numpy. ``pipelines/evaluate.py``
does the regex counting with Ray Data for larger stores.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from codebook.errors import ConfigError
from codebook.store import CodeStore


@dataclass(frozen=True)
class CodeRef:
    """One code: its site, group (head) and id."""

    site: str
    group: int
    code: int

    @property
    def name(self) -> str:
        return f"{self.site}.{self.group}.{self.code}"

    @staticmethod
    def parse(name: str) -> CodeRef:
        parts = name.rsplit(".", 2)
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise ConfigError("code", f"{name!r} is not site.group.code",
                              "write codes like attn_heads_3.1.42 (site, head/group, id)")
        return CodeRef(parts[0], int(parts[1]), int(parts[2]))


class StoreSearch:
    """Search one code store (and, for similar codes, its model's codebooks)."""

    def __init__(self, store: CodeStore | str | Path):
        self.store = store if isinstance(store, CodeStore) else CodeStore(store)
        self.meta = self.store.meta
        self._tokenizer: Any = None
        self._pieces: dict[int, str] = {}
        self._stats: Any = None
        self._query: Any = None
        self._codebooks: dict[str, np.ndarray] = {}  # code vectors per site, read once

    # ---------------------------------------------------------------- helpers
    @property
    def query(self) -> Any:
        """The store's DuckDB queries (``query.StoreQuery``), opened once."""
        if self._query is None:
            from codebook.store.query import StoreQuery

            self._query = StoreQuery(self.store)
        return self._query

    def check(self, ref: CodeRef) -> CodeRef:
        """``ref`` checked against the store: known site, group and code id in range."""
        self._sites([ref.site])
        info = self.meta.sites[ref.site]
        if not 0 <= ref.group < info.groups:
            raise ConfigError("group", f"{ref.site} has groups 0..{info.groups - 1}, "
                              f"got {ref.group}", "pick a head/group in range")
        if not 0 <= ref.code < info.num_codes:
            raise ConfigError("code", f"code id {ref.code} out of range for {ref.site}",
                              f"use ids in 0..{info.num_codes - 1}")
        return ref

    def _sites(self, sites: list[str] | None) -> list[str]:
        from codebook.resolve import check_site_names

        return check_site_names(sites or None, self.meta.sites, "site")

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None and self.meta.tokenizer:
            from codebook.data.text import load_tokenizer

            self._tokenizer = load_tokenizer(self.meta.tokenizer)
        return self._tokenizer

    def piece(self, token_id: int) -> str:
        """The text of one token (the id itself for the FSM)."""
        if token_id not in self._pieces:
            tok = self.tokenizer
            self._pieces[token_id] = str(token_id) if tok is None else tok.decode([token_id])
        return self._pieces[token_id]

    def token_id(self, token: str | int) -> int:
        """A token id from an id or a token's text (must be a single token; stores without a
        tokenizer take ids only)."""
        if isinstance(token, int) or (isinstance(token, str) and token.isdigit()
                                      and self.tokenizer is None):
            return int(token)
        if self.tokenizer is None:  # FSM: tokens are ids, there is no text to tokenise
            raise ConfigError("token", f"{token!r} is not a token id, and this store has no "
                              "tokenizer (FSM tokens)", "search FSM stores by token id "
                              "(e.g. 17), or by token text on a text model's store")
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ConfigError("token", f"{token!r} is {len(ids)} tokens, not one",
                              "search a single token (mind the leading space)")
        return int(ids[0])

    def usage(self, site: str) -> np.ndarray:
        """(groups, num_codes) how many tokens each code fired on."""
        self._sites([site])
        info = self.meta.sites[site]
        if self._stats is None:  # read once: the browser asks on every request
            self._stats = self.store.code_stats().to_pandas()
        stats = self._stats[self._stats["site"] == site]
        out = np.zeros((info.groups, info.num_codes), dtype=np.int64)
        out[stats["group"].to_numpy(), stats["code"].to_numpy()] = stats["count"].to_numpy()
        return out

    # ---------------------------------------------------------------- searches
    def codes_for_token(self, token: str | int, sites: list[str] | None = None,
                        top: int = 20) -> list[dict[str, Any]]:
        """Codes that fire on ``token``, ranked by recall (share of its occurrences), with
        precision (share of the code's firings that are on this token)."""
        tid = self.token_id(token)
        sites = self._sites(sites)
        on_token, occurrences = self.query.code_counts_on_sites(sites, f"token_id = {tid}")
        if occurrences == 0:
            return []
        rows = []
        for s in sites:
            firings = self.usage(s)
            for g, c in zip(*np.nonzero(on_token[s]), strict=True):
                n = int(on_token[s][g, c])
                rows.append({"code": CodeRef(s, int(g), int(c)).name, "count": n,
                             "recall": n / occurrences, "precision": n / int(firings[g, c])})
        rows.sort(key=lambda r: (-r["recall"], -r["precision"], r["code"]))
        return rows[:top]

    def codes_for_regex(self, regex: str, sites: list[str] | None = None,
                        min_recall: float = 0.0, top: int = 20, ignore_case: bool = False
                        ) -> list[dict[str, Any]]:
        """Codes ranked as classifiers of a regex feature: precision at recall >=
        ``min_recall`` (ties: recall), with recall and F1."""
        from codebook.analysis.features import RegexFeature
        from codebook.store.evaluate import merge_partials

        feature = RegexFeature("query", regex, ignore_case)
        feature.compiled()
        sites = self._sites(sites)
        merged: dict[str, Any] = {}
        for path in self.store.shard_files():
            table = self.store.read_shard(path)
            labels, mask = self._labels(table, [feature])
            merged = merge_partials(merged, _counts(table, self.meta, labels, mask, sites))
        return rank_codes(merged, self.meta, sites, min_recall, top)

    def _labels(self, table: Any, features: list) -> tuple[np.ndarray, np.ndarray]:
        from codebook.analysis.features import RegexLabels
        from codebook.analysis.labels import TokenRows, label_rows
        from codebook.corpus import read_documents

        if self.tokenizer is None:  # FSM: there is no text to match
            raise ConfigError("regex", "this store has no tokenizer (FSM tokens)",
                              "search FSM stores by token id or state with evaluate.py")
        labeller = RegexLabels(features, self.tokenizer,
                               functools.partial(read_documents, self.meta.source))
        labels, mask = label_rows(labeller, TokenRows.from_table(table))
        return labels[:, 0], mask

    def contexts(self, ref: CodeRef, n: int = 20, window: int = 10) -> list[dict[str, Any]]:
        """Up to ``n`` places where the code fires (at most 3 per document, spread over the
        store): the tokens around it and which one fired."""
        ref = self.check(ref)
        first = self.query.first_firings(ref.site, ref.group, ref.code, n, per_doc=3)
        return [{"doc_id": int(d), "position": int(p), **self.context(w, int(p))}
                for d, p, w in zip(first["doc_id"], first["position"],
                                   self.query.windows(first["doc_id"], first["position"], window),
                                   strict=True)]

    def context(self, rows: dict[str, np.ndarray], position: int) -> dict[str, Any]:
        """A window of ``StoreQuery.windows`` as token texts and the index of ``position``."""
        return {"tokens": [self.piece(int(t)) for t in rows["token_id"]],
                "highlight": int(np.flatnonzero(rows["position"] == position)[0])}

    def code_stats(self, ref: CodeRef, regex: str | None = None) -> dict[str, Any]:
        """A code's firing count and documents, and its precision/recall for ``regex``."""
        ref = self.check(ref)
        usage = self.usage(ref.site)
        out: dict[str, Any] = {"code": ref.name, "count": int(usage[ref.group, ref.code])}
        if regex:
            rows = self.codes_for_regex(regex, [ref.site], top=10**9)
            row = next((r for r in rows if r["code"] == ref.name), None)
            out.update(precision=row["precision"] if row else 0.0,
                       recall=row["recall"] if row else 0.0)
        return out

    def similar_codes(self, ref: CodeRef, top: int = 10) -> list[dict[str, Any]]:
        """Codes of the same codebook closest to ``ref`` by cosine similarity of their vectors."""
        ref = self.check(ref)
        vectors = self.codebook(ref.site)[ref.group]  # (num_codes, dim)
        unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        sims = unit @ unit[ref.code]
        sims[ref.code] = -np.inf
        order = np.argsort(-sims)[:top]
        return [{"code": CodeRef(ref.site, ref.group, int(c)).name,
                 "cosine": float(sims[c])} for c in order]

    def codebook(self, site: str) -> np.ndarray:
        """(groups, num_codes, dim) code vectors of ``site`` from the model's safetensors."""
        from safetensors import safe_open

        from codebook.checkpoint import CODEBOOK_WEIGHTS_FILE

        if site in self._codebooks:
            return self._codebooks[site]
        path = Path(self.meta.model) / CODEBOOK_WEIGHTS_FILE
        if not path.is_file():
            raise ConfigError("model", f"{path} is missing", "keep the model folder the store "
                              "was extracted from (its path is in store.json)")
        key = f"codebooks.{site}.codes"
        with safe_open(str(path), "pt") as fh:  # only this site's tensor
            if key not in fh.keys():  # noqa: SIM118 (safe_open has keys(), no __contains__)
                raise ConfigError("site", f"{site} is not in {path}", "check the site name")
            self._codebooks[site] = fh.get_tensor(key).float().numpy()
        return self._codebooks[site]


def _counts(table: Any, meta: Any, labels: np.ndarray, mask: np.ndarray, sites: list[str]
            ) -> dict[str, Any]:
    """``evaluate.count_partials`` for one feature (``labels`` (T,) bool): ``positives``
    and per site ``joint/<site>`` (groups*num_codes,) and ``codes/<site>``."""
    from codebook.store.evaluate import count_partials

    part = count_partials(table, meta, labels.astype(bool)[:, None], mask, 1, sites, [])
    part["positives"] = part.pop("label_counts")[0]
    for s in sites:
        part[f"joint/{s}"] = part[f"joint/{s}"][:, 0]
    return part


def rank_codes(merged: dict[str, Any], meta: Any, sites: list[str], min_recall: float,
               top: int) -> list[dict[str, Any]]:
    """Codes as classifiers of a feature from merged counts: precision, recall, F1 of every
    code at recall >= ``min_recall``, best precision first (ties: recall, then name)."""
    positives = int(merged.get("positives", 0))
    if positives == 0:
        return []
    rows = []
    for s in sites:
        info = meta.sites[s]
        joint, firings = merged[f"joint/{s}"], merged[f"codes/{s}"]
        for flat in np.flatnonzero(joint):
            p, r = joint[flat] / firings[flat], joint[flat] / positives
            if r < min_recall:
                continue
            rows.append({"code": CodeRef(s, int(flat // info.num_codes),
                                         int(flat % info.num_codes)).name,
                         "precision": float(p), "recall": float(r),
                         "f1": float(2 * p * r / (p + r)), "count": int(joint[flat]),
                         "positives": positives})
    rows.sort(key=lambda r: (-r["precision"], -r["recall"], r["code"]))
    return rows[:top]
