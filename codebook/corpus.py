"""Corpora for extraction: documents with stable ids ``0 .. N-1``, described once, read by range.

Text files in sorted order, Parquet rows in file order, rows of a Hugging Face split
(``load_hf_source``: the one place this reads ``datasets``, through ``codebook.data.hf``), or
an FSM's evaluation sequences.
``describe_corpus`` gives the JSON-able description a code store keeps (``store.json``);
``read_documents`` reads any range of it back, in any process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from codebook.errors import ConfigError

SourceKind = Literal["text", "parquet", "hf", "fsm"]


@dataclass
class Corpus:
    """Where the documents come from (``source`` picks which fields matter)."""

    source: SourceKind
    paths: list[str] = field(default_factory=list)  # text / parquet files or folders
    text_column: str = "text"
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    hf_data_files: list[str] | None = None  # with a builder (parquet) or a local folder
    fsm_file: str | None = None  # the FSM's JSON (pipelines/fsm.py writes analysis/fsm.json)
    fsm_sequences: int = 1024  # the FSM's fixed evaluation sequences
    max_documents: int | None = None


def describe_corpus(corpus: Corpus) -> dict[str, Any]:
    """A JSON-able, stable description of the documents (stored in ``store.json``).

    Checks everything a worker will need (files exist, the column exists, the FSM loads) so bad
    input fails here, before any actor starts.
    """
    from codebook.data.text import expand_paths

    limit = corpus.max_documents
    if corpus.source == "text":
        files = expand_paths(corpus.paths, (".txt", ".md", ".text"))[:limit]
        return {"kind": "text", "files": files, "num_documents": len(files)}
    if corpus.source == "parquet":
        import pyarrow.parquet as pq

        files, rows = [], []
        for f in expand_paths(corpus.paths, (".parquet",)):
            try:
                schema, n = pq.read_schema(f), pq.ParquetFile(f).metadata.num_rows
            except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
                raise ConfigError("--paths", f"{f} is not a readable Parquet file ({err})",
                                  "remove it or fix the path") from err
            if corpus.text_column not in schema.names:
                raise ConfigError("--text-column", f"{f} has no column {corpus.text_column!r} "
                                  f"(columns: {schema.names})", "pass the text column's name")
            files.append(f)
            rows.append(n)
        total = sum(rows) if limit is None else min(sum(rows), limit)
        return {"kind": "parquet", "files": files, "rows": rows, "column": corpus.text_column,
                "num_documents": total}
    if corpus.source == "hf":
        from codebook.data.hf import cli_flag, hf_location

        name, files = (hf_location(corpus.hf_dataset, corpus.hf_data_files, cli_flag)
                       if corpus.hf_dataset else (corpus.hf_dataset, None))
        source = {"kind": "hf", "dataset": name, "config": corpus.hf_config,
                  "split": corpus.hf_split, "column": corpus.text_column,
                  **({"data_files": files} if files else {})}
        ds = load_hf_source(source)
        n = len(ds) if limit is None else min(len(ds), limit)
        return {**source, "num_documents": n}
    if corpus.source == "fsm":
        from codebook.data.fsm import TokFSM

        if not corpus.fsm_file or not Path(corpus.fsm_file).is_file():
            raise ConfigError("--fsm-file", f"{corpus.fsm_file!r} is not a file",
                              "pass the fsm.json saved by pipelines/fsm.py (analysis/fsm.json)")
        fsm = TokFSM.load(corpus.fsm_file)
        n = corpus.fsm_sequences if limit is None else min(corpus.fsm_sequences, limit)
        return {"kind": "fsm", "fsm": fsm.to_dict(), "num_documents": n}
    raise ConfigError("--source", f"unknown source {corpus.source!r}",
                      "use text, parquet, hf or fsm")


def load_hf_source(source: dict[str, Any]) -> Any:
    """The split an ``hf`` source describes, read as training reads it (``codebook.data.hf``);
    once per process, not once per shard."""
    files = source.get("data_files")
    return _load_hf_split(source["dataset"], source["config"], source["split"],
                          tuple(files) if files else None, source["column"])


@functools.lru_cache(maxsize=2)  # once per process, not once per shard
def _load_hf_split(name: str | None, config: str | None, split: str,
                   data_files: tuple[str, ...] | None, column: str) -> Any:
    from codebook.data.hf import cli_flag, load_hf_split

    return load_hf_split(name, config, split, data_files, column, cli_flag)


def read_documents(source: dict[str, Any], start: int, stop: int) -> list[str] | np.ndarray:
    """Documents ``[start, stop)``: texts, or for the FSM an int array of token sequences."""
    kind = source["kind"]
    if kind == "text":
        return [Path(f).read_bytes().decode("utf-8", errors="replace")
                for f in source["files"][start:stop]]
    if kind == "parquet":
        return _parquet_rows(source, start, stop)
    if kind == "hf":
        ds = load_hf_source(source)
        return [str(t) for t in ds.select(range(start, stop))[source["column"]]]
    from codebook.data.fsm import TokFSM

    fsm = TokFSM.from_dict(source["fsm"])
    return fsm.eval_set(stop)[start:stop]


def _parquet_rows(source: dict[str, Any], start: int, stop: int) -> list[str]:
    import pyarrow.parquet as pq

    texts: list[str] = []
    offset = 0
    for f, n in zip(source["files"], source["rows"], strict=True):
        lo, hi = max(start - offset, 0), min(stop - offset, n)
        if lo < hi:  # read only the row groups that overlap [lo, hi)
            pf = pq.ParquetFile(f)
            first = 0
            for g in range(pf.num_row_groups):
                size = pf.metadata.row_group(g).num_rows
                a, b = max(lo - first, 0), min(hi - first, size)
                if a < b:
                    col = pf.read_row_group(g, columns=[source["column"]]).column(0)
                    texts += [str(t) for t in col.slice(a, b - a).to_pylist()]
                first += size
        offset += n
        if offset >= stop:
            break
    return texts
