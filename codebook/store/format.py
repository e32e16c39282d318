"""The code store's format and writer: which codes fired at every token, as partitioned Parquet
any tool can read.

Layout of a store folder::

    store.json                   model / tokenizer / corpus reference, sites, shard plan
    tokens/shard-00000.parquet   one row per token: doc_id, position, token_id,
                                 codes.<site> (fixed-size list: groups x k code ids, unsigned,
                                 the smallest type that holds num_codes), optional
                                 scores.<site> (fixed-size list, float16: each firing code's
                                 similarity score, aligned with codes.<site>), optional
                                 acts.<site> (fixed-size list of float16 raw site inputs)
    stats/shard-00000.parquet    per (site, group, code): count (tokens) and documents
    code_stats.parquet           the per-shard stats summed, once every shard is done

A shard is complete when its ``tokens/`` file exists: both files are written to a temp name and
renamed (stats first), so an interrupted run never leaves a partial shard that looks finished.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from codebook.errors import ConfigError
from codebook.io import atomic_write
from codebook.sites import SiteInfo

STORE_VERSION = 1
META_FILE = "store.json"
TOKENS_DIR = "tokens"
STATS_DIR = "stats"
CODE_STATS_FILE = "code_stats.parquet"
SCHEMA_KEY = b"codebook.store"


@dataclass
class StoreMeta:
    """What ``store.json`` holds: enough to interpret every shard without the run that made it."""

    model: str
    tokenizer: str | None
    source: dict[str, Any]
    sites: dict[str, SiteInfo]
    activation_sites: list[str] = field(default_factory=list)
    score_sites: list[str] = field(default_factory=list)  # sites with a scores.<site> column
    block_size: int = 512
    num_shards: int = 0
    num_documents: int = 0
    version: int = STORE_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoreMeta:
        data = dict(data)
        data["sites"] = {k: SiteInfo(**v) for k, v in data["sites"].items()}
        return cls(**data)

    def identity(self) -> dict[str, Any]:
        """The fields two runs must share to write into the same store."""
        d = asdict(self)
        return {k: d[k] for k in ("model", "tokenizer", "source", "sites", "activation_sites",
                                  "score_sites", "block_size", "num_shards", "version")}


def code_dtype(num_codes: int) -> np.dtype:
    """The smallest unsigned integer type that holds ids ``0 .. num_codes - 1``."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if num_codes - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def codes_column(site: str) -> str:
    return f"codes.{site}"


def acts_column(site: str) -> str:
    return f"acts.{site}"


def scores_column(site: str) -> str:
    return f"scores.{site}"


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.parquet"


def fixed_list(values: np.ndarray) -> pa.FixedSizeListArray:
    """A (rows, width) array as an Arrow fixed-size-list column (no per-row offsets)."""
    values = np.ascontiguousarray(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def list_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list column (or a list column whose rows have one length, as DuckDB
    returns them) back to a (rows, width) numpy array."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    width = getattr(arr.type, "list_size", None)
    if width is None:
        width = len(flat) // len(arr) if len(arr) else 0
    return flat.reshape(len(arr), width)


def token_table(doc_ids: np.ndarray, positions: np.ndarray, token_ids: np.ndarray,
                codes: dict[str, np.ndarray], meta: StoreMeta,
                acts: dict[str, np.ndarray] | None = None,
                scores: dict[str, np.ndarray] | None = None) -> pa.Table:
    """One shard's token rows. ``codes[site]`` is (tokens, groups, k) (or (tokens, width));
    ``scores[site]`` the same shape, for ``meta.score_sites``."""
    cols: dict[str, pa.Array] = {
        "doc_id": pa.array(np.asarray(doc_ids, dtype=np.int64)),
        "position": pa.array(np.asarray(positions, dtype=np.int32)),
        "token_id": pa.array(np.asarray(token_ids, dtype=np.int32)),
    }
    for site, info in meta.sites.items():
        ids = np.asarray(codes[site]).reshape(len(doc_ids), info.width)
        if ids.size and (ids.min() < 0 or ids.max() >= info.num_codes):
            raise ValueError(f"{site}: code ids outside [0, {info.num_codes})")
        cols[codes_column(site)] = fixed_list(ids.astype(code_dtype(info.num_codes)))
    for site in meta.score_sites:
        width = meta.sites[site].width
        cols[scores_column(site)] = fixed_list(
            np.asarray(scores[site], dtype=np.float16).reshape(len(doc_ids), width))
    for site in meta.activation_sites:
        cols[acts_column(site)] = fixed_list(np.asarray(acts[site], dtype=np.float16))
    table = pa.table(cols)
    return table.replace_schema_metadata({SCHEMA_KEY: json.dumps(
        {"version": STORE_VERSION, "sites": list(meta.sites), "model": meta.model})})


def code_stats_table(table: pa.Table, meta: StoreMeta) -> pa.Table:
    """Per (site, group, code): tokens where it fired and documents where it fired."""
    docs = table.column("doc_id").to_numpy()
    _, doc_index = np.unique(docs, return_inverse=True)
    rows: dict[str, list] = {"site": [], "group": [], "code": [], "count": [], "documents": []}
    for site, info in meta.sites.items():
        ids = list_to_numpy(table.column(codes_column(site))).astype(np.int64)
        ids = ids.reshape(len(docs), info.groups, info.k)
        for g in range(info.groups):
            per_token = ids[:, g, :]
            count = np.bincount(per_token.ravel(), minlength=info.num_codes)
            pairs = np.unique(doc_index[:, None] * info.num_codes + per_token)
            documents = np.bincount(pairs % info.num_codes, minlength=info.num_codes)
            used = np.flatnonzero(count)
            rows["site"] += [site] * len(used)
            rows["group"] += [g] * len(used)
            rows["code"] += used.tolist()
            rows["count"] += count[used].tolist()
            rows["documents"] += documents[used].tolist()
    return pa.table({"site": pa.array(rows["site"], pa.string()),
                     "group": pa.array(rows["group"], pa.int32()),
                     "code": pa.array(rows["code"], pa.int64()),
                     "count": pa.array(rows["count"], pa.int64()),
                     "documents": pa.array(rows["documents"], pa.int64())})


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` under a temp name, then rename: all or nothing."""
    with atomic_write(path, "wb") as fh:
        pq.write_table(table, fh, compression="zstd")


class CodeStore:
    """A code store folder: its metadata, complete shards and readers over them."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()
        meta_file = self.root / META_FILE
        if not meta_file.is_file():
            raise ConfigError("store", f"{self.root} has no {META_FILE}: not a code store",
                              "point at a folder written by pipelines/extract.py")
        try:
            self.meta = StoreMeta.from_dict(json.loads(meta_file.read_text()))
        except (ValueError, TypeError, KeyError) as err:
            raise ConfigError("store", f"{meta_file} is not a valid store description: {err}",
                              "re-run pipelines/extract.py into a fresh folder") from err

    @staticmethod
    def create(root: str | os.PathLike[str], meta: StoreMeta) -> CodeStore:
        """Create the store (or reopen it if ``meta`` matches the one already there)."""
        root = Path(root).expanduser().resolve()
        meta_file = root / META_FILE
        if meta_file.is_file():
            old = StoreMeta.from_dict(json.loads(meta_file.read_text()))
            if old.identity() != meta.identity():
                diff = sorted(k for k, v in meta.identity().items() if old.identity()[k] != v)
                raise ConfigError("--out", f"{root} holds a store made with different {diff}",
                                  "use a new --out folder, or the same model/corpus/options")
        else:
            root.mkdir(parents=True, exist_ok=True)
            with atomic_write(meta_file) as fh:
                fh.write(meta.to_json())
        (root / TOKENS_DIR).mkdir(exist_ok=True)
        (root / STATS_DIR).mkdir(exist_ok=True)
        return CodeStore(root)

    # ---------------------------------------------------------------- shards
    def shard_path(self, shard: int) -> Path:
        return self.root / TOKENS_DIR / shard_name(shard)

    def stats_path(self, shard: int) -> Path:
        return self.root / STATS_DIR / shard_name(shard)

    def done_shards(self) -> list[int]:
        """Shards whose token file exists (written last, atomically)."""
        done = []
        for f in sorted((self.root / TOKENS_DIR).glob("shard-*.parquet")):
            try:
                done.append(int(f.stem.split("-")[1]))
            except (IndexError, ValueError):
                continue
        return done

    def shard_files(self) -> list[Path]:
        return [self.shard_path(s) for s in self.done_shards()]

    @property
    def complete(self) -> bool:
        return len(self.done_shards()) == self.meta.num_shards

    def write_shard(self, shard: int, table: pa.Table) -> None:
        """Stats first, then tokens: the token file's presence marks the shard finished."""
        write_parquet_atomic(code_stats_table(table, self.meta), self.stats_path(shard))
        write_parquet_atomic(table, self.shard_path(shard))

    def read_shard(self, path: str | os.PathLike[str], columns: list[str] | None = None
                   ) -> pa.Table:
        """One shard's rows, checked: a foreign or corrupt file raises an error naming it."""
        return read_token_file(path, self.meta, columns)

    def iter_shards(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        for path in self.shard_files():
            yield self.read_shard(path, columns)

    def finalize_stats(self) -> pa.Table:
        """Sum the per-shard code statistics into ``code_stats.parquet``."""
        parts = [pq.read_table(self.stats_path(s)) for s in self.done_shards()
                 if self.stats_path(s).is_file()]
        if not parts:
            raise ConfigError("store", f"{self.root} has no finished shards", "run the extraction")
        table = pa.concat_tables(parts).group_by(["site", "group", "code"]).aggregate(
            [("count", "sum"), ("documents", "sum")]).rename_columns(
            ["site", "group", "code", "count", "documents"])
        table = table.sort_by([("site", "ascending"), ("group", "ascending"),
                               ("code", "ascending")])
        write_parquet_atomic(table, self.root / CODE_STATS_FILE)
        return table

    def code_stats(self) -> pa.Table:
        path = self.root / CODE_STATS_FILE
        return pq.read_table(path) if path.is_file() else self.finalize_stats()


def read_token_file(path: str | os.PathLike[str], meta: StoreMeta,
                    columns: list[str] | None = None) -> pa.Table:
    """Read a token shard; a file that is not Parquet or not this store's raises ConfigError."""
    path = Path(path)
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise ConfigError(str(path), f"cannot read it as Parquet ({err})",
                          "delete the file and re-run pipelines/extract.py to redo that shard"
                          ) from err
    expected = ["doc_id", "position", "token_id", *(codes_column(s) for s in meta.sites)]
    missing = [c for c in expected if c not in schema.names]
    if (schema.metadata or {}).get(SCHEMA_KEY) is None or missing:
        raise ConfigError(str(path), f"is not a shard of this code store (missing columns "
                          f"{missing} or the {SCHEMA_KEY.decode()} metadata)",
                          "keep only files written by pipelines/extract.py under tokens/")
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowInvalid) as err:
        raise ConfigError(str(path), f"is corrupt ({err})",
                          "delete the file and re-run pipelines/extract.py to redo that shard"
                          ) from err
