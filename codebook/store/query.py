"""SQL over a code store: DuckDB reads the token shards' Parquet files in place.

One view, ``tokens``, spans every finished shard (``doc_id``, ``position``, ``token_id``,
``codes.<site>``, and ``scores.<site>`` where the store has them). A code fires on a row when its
id is in its group's slice of ``codes.<site>``; the queries below push that test, the column
selection and the joins into DuckDB, which scans the files with its own threads and never loads
a whole store into memory.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pyarrow as pa

from codebook.store import CodeStore, codes_column, list_to_numpy, scores_column


def _arrow(relation: Any) -> pa.Table:
    """A DuckDB relation as an Arrow table (``to_arrow_table`` in DuckDB >= 1.4, before it
    ``arrow``)."""
    fetch = getattr(relation, "to_arrow_table", None) or relation.arrow
    return fetch()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class StoreQuery:
    """DuckDB queries over one store's token shards (the file list is refreshed when shards
    are added). Safe to share between threads (the browser's request pool): each query runs on
    its own cursor of one in-memory database."""

    def __init__(self, store: CodeStore, threads: int | None = None):
        import duckdb

        self.store, self.meta = store, store.meta
        self.con = duckdb.connect()
        self.con.execute("SET parquet_metadata_cache = true")  # footers read once, not per query
        if threads:
            self.con.execute(f"SET threads TO {int(threads)}")
        self._files: list[str] = []
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- the view
    def _cursor(self) -> Any:
        """A cursor over the ``tokens`` view of the finished shards (redefined when shards
        were added)."""
        complete = len(self._files) == self.meta.num_shards  # then no shard can be added
        files = self._files if complete else [str(p) for p in self.store.shard_files()]
        if not files:
            from codebook.errors import ConfigError

            raise ConfigError("store", f"{self.store.root} has no finished shards",
                              "run pipelines/extract.py")
        with self._lock:
            if files != self._files:
                listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
                self.con.execute("CREATE OR REPLACE VIEW tokens AS SELECT * FROM "
                                 f"read_parquet([{listed}])")
                self._files = files
            return self.con.cursor()

    def sql(self, query: str, params: list[Any] | None = None) -> pa.Table:
        """Run ``query`` (over the ``tokens`` view) and return an Arrow table."""
        cur = self._cursor()
        try:
            return _arrow(cur.sql(query, params=params or None))
        finally:
            cur.close()

    def has_scores(self, site: str) -> bool:
        return site in self.meta.score_sites

    # ---------------------------------------------------------------- predicates
    def _slice(self, site: str, group: int, column: str) -> str:
        k = self.meta.sites[site].k
        col = _quote(column)
        return f"{col}[{group * k + 1}]" if k == 1 else \
            f"{col}[{group * k + 1}:{(group + 1) * k}]"

    def fires(self, site: str, group: int, code: int) -> str:
        """SQL: the code fires on this row."""
        part = self._slice(site, group, codes_column(site))
        return f"({part} = {int(code)})" if self.meta.sites[site].k == 1 else \
            f"list_contains({part}, {int(code)})"

    def score(self, site: str, group: int, code: int) -> str:
        """SQL: the code's score on a row where it fires (NULL without scores)."""
        if not self.has_scores(site):
            return "NULL::FLOAT"
        k = self.meta.sites[site].k
        col = _quote(scores_column(site))
        if k == 1:
            return f"{col}[{group + 1}]::FLOAT"
        slot = f"list_position({self._slice(site, group, codes_column(site))}, {int(code)})"
        return f"{col}[{group * k} + {slot}]::FLOAT"

    # ---------------------------------------------------------------- queries
    def firings(self, site: str, group: int, code: int) -> dict[str, np.ndarray]:
        """Every row where the code fires: ``doc_id``, ``position``, ``token_id``, ``score``
        (NaN without scores), in store order."""
        t = self.sql(f"SELECT doc_id, position, token_id, {self.score(site, group, code)} AS "
                     f"score FROM tokens WHERE {self.fires(site, group, code)} "
                     "ORDER BY doc_id, position")
        out = {c: t.column(c).to_numpy() for c in ("doc_id", "position", "token_id")}
        out["score"] = t.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
        return out

    def first_firings(self, site: str, group: int, code: int, n: int, per_doc: int
                      ) -> dict[str, np.ndarray]:
        """The first ``n`` firings in store order, at most ``per_doc`` per document. Reads
        only as far into the store as it must: the scan stops at a LIMIT, raised until enough
        firings survive the per-document cap (DuckDB keeps the files' row order)."""
        limit = max(4 * n, 64)
        while True:
            t = self.sql(f"SELECT doc_id, position FROM tokens WHERE "
                         f"{self.fires(site, group, code)} LIMIT {limit}")
            docs, pos = t.column("doc_id").to_numpy(), t.column("position").to_numpy()
            order = np.lexsort((pos, docs))
            docs, pos = docs[order], pos[order]
            starts = np.r_[0, np.flatnonzero(np.diff(docs)) + 1]
            rank = np.arange(len(docs)) - np.repeat(starts, np.diff(np.r_[starts, len(docs)]))
            keep = rank < per_doc
            if keep.sum() >= n or t.num_rows < limit:
                return {"doc_id": docs[keep][:n], "position": pos[keep][:n]}
            limit *= 4

    def windows(self, doc_ids: np.ndarray, positions: np.ndarray, window: int,
                site: str | None = None, group: int = 0, code: int = 0
                ) -> list[dict[str, np.ndarray]]:
        """The tokens ``[position - window, position + window]`` of each (doc, position), in
        the same document; with ``site`` also that code's score (NaN where it does not fire)
        on every context token."""
        if len(doc_ids) == 0:
            return []
        wanted = pa.table({"i": pa.array(np.arange(len(doc_ids)), pa.int64()),
                           "d": pa.array(np.asarray(doc_ids, dtype=np.int64)),
                           "lo": pa.array(np.asarray(positions, dtype=np.int64) - window),
                           "hi": pa.array(np.asarray(positions, dtype=np.int64) + window)})
        docs = ", ".join(str(int(d)) for d in np.unique(doc_ids))  # lets DuckDB skip files
        cur = self._cursor()
        cur.register("wanted", wanted)
        try:
            act = "NULL::FLOAT"
            if site is not None:
                act = (f"CASE WHEN {self.fires(site, group, code)} THEN "
                       f"{self.score(site, group, code)} ELSE NULL END")
                fired = f"{self.fires(site, group, code)}"
            else:
                fired = "false"
            t = _arrow(cur.sql(
                f"SELECT w.i, t.position, t.token_id, {act} AS act, {fired} AS fired "
                "FROM tokens t JOIN wanted w ON t.doc_id = w.d AND t.position BETWEEN w.lo "
                f"AND w.hi WHERE t.doc_id IN ({docs}) ORDER BY w.i, t.position"))
        finally:
            cur.close()
        i = t.column("i").to_numpy()
        bounds = np.searchsorted(i, np.arange(len(doc_ids) + 1))
        cols = {c: t.column(c).to_numpy(zero_copy_only=False) for c in
                ("position", "token_id", "act", "fired")}
        cols["act"] = cols["act"].astype(np.float64)
        return [{c: v[bounds[j]:bounds[j + 1]] for c, v in cols.items()}
                for j in range(len(doc_ids))]

    def codes_on(self, site: str, where: str) -> np.ndarray:
        """(rows, groups*k) code ids of ``site`` on the rows matching SQL ``where``."""
        t = self.sql(f"SELECT {_quote(codes_column(site))} AS c FROM tokens WHERE {where}")
        if t.num_rows == 0:
            return np.zeros((0, self.meta.sites[site].width), dtype=np.int64)
        return list_to_numpy(t.column("c")).astype(np.int64)

    def code_counts_on(self, site: str, where: str) -> tuple[np.ndarray, int]:
        """(groups, num_codes) how often each code of ``site`` fires on the rows matching
        ``where``, and how many rows match."""
        counts, rows = self.code_counts_on_sites([site], where)
        return counts[site], rows

    def code_counts_on_sites(self, sites: list[str], where: str
                             ) -> tuple[dict[str, np.ndarray], int]:
        """``code_counts_on`` for several sites in one scan."""
        cols = ", ".join(f"{_quote(codes_column(s))} AS c{i}" for i, s in enumerate(sites))
        t = self.sql(f"SELECT {cols} FROM tokens WHERE {where}")
        out = {}
        for i, site in enumerate(sites):
            info = self.meta.sites[site]
            codes = (list_to_numpy(t.column(f"c{i}")).astype(np.int64) if t.num_rows
                     else np.zeros((0, info.width), dtype=np.int64))
            codes = codes.reshape(-1, info.groups, info.k)
            counts = np.zeros((info.groups, info.num_codes), dtype=np.int64)
            for g in range(info.groups):
                counts[g] = np.bincount(codes[:, g].ravel(), minlength=info.num_codes)
            out[site] = counts
        return out, t.num_rows

    def num_tokens(self) -> int:
        return int(self.sql("SELECT count(*) AS n FROM tokens").column("n")[0].as_py())
