"""Code extraction without Ray: describe a corpus, cut it into shards, run a model over a shard.

A corpus is a list of documents with stable ids ``0 .. N-1`` (text files in sorted order,
Parquet rows in file order, rows of a Hugging Face split, or FSM sequences). Shard ``i`` holds
documents ``[i * docs_per_shard, (i + 1) * docs_per_shard)``, so a rerun finds the same shards.
``pipelines/extract.py`` runs these functions in Ray Data tasks and actors.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from codebook.errors import ConfigError
from codebook.store import SiteInfo

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
        ds = _load_hf(corpus.hf_dataset, corpus.hf_config, corpus.hf_split)
        if corpus.text_column not in ds.column_names:
            raise ConfigError("--text-column", f"{corpus.hf_dataset} has no column "
                              f"{corpus.text_column!r} (columns: {ds.column_names})",
                              "pass the text column's name")
        n = len(ds) if limit is None else min(len(ds), limit)
        return {"kind": "hf", "dataset": corpus.hf_dataset, "config": corpus.hf_config,
                "split": corpus.hf_split, "column": corpus.text_column, "num_documents": n}
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


@functools.lru_cache(maxsize=2)  # once per process, not once per shard
def _load_hf(name: str | None, config: str | None, split: str) -> Any:
    if not name:
        raise ConfigError("--hf-dataset", "missing", "name a dataset or a local data folder")
    try:
        import datasets
    except ImportError as err:
        raise ConfigError("--source", "hf needs the datasets package",
                          "pip install -e .[hf]") from err
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types for a missing dataset
        raise ConfigError("--hf-dataset", f"cannot load {name!r} ({type(err).__name__}: {err})",
                          "check the name, config and split (offline: a local folder)") from err


def plan_shards(num_documents: int, docs_per_shard: int) -> list[dict[str, int]]:
    """Shard ``i`` = documents ``[start, stop)``; the same inputs always give the same plan."""
    if docs_per_shard < 1:
        raise ConfigError("--docs-per-shard", f"must be >= 1, got {docs_per_shard}", "use e.g. 64")
    if num_documents < 1:
        raise ConfigError("--paths", "the corpus has no documents", "check the corpus options")
    return [{"shard": i, "start": s, "stop": min(s + docs_per_shard, num_documents)}
            for i, s in enumerate(range(0, num_documents, docs_per_shard))]


def read_documents(source: dict[str, Any], start: int, stop: int) -> list[str] | np.ndarray:
    """Documents ``[start, stop)``: texts, or for the FSM an int array of token sequences."""
    kind = source["kind"]
    if kind == "text":
        return [Path(f).read_bytes().decode("utf-8", errors="replace")
                for f in source["files"][start:stop]]
    if kind == "parquet":
        return _parquet_rows(source, start, stop)
    if kind == "hf":
        ds = _load_hf(source["dataset"], source["config"], source["split"])
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


def tokenise_documents(docs: list[str] | np.ndarray, first_doc_id: int, tokenizer: Any,
                       block_size: int) -> dict[str, np.ndarray]:
    """Cut each document into consecutive windows of at most ``block_size`` tokens.

    Returns ``doc_id``, ``start`` (position of the window's first token in its document),
    ``length`` (real tokens) and ``input_ids`` (windows, block_size) int32, right-padded with 0.
    Documents are never packed together, so every token keeps its document and position.
    """
    if isinstance(docs, np.ndarray):  # pre-tokenised (FSM): one window per sequence
        token_lists = [row.tolist() for row in docs]
    else:
        token_lists = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    doc_ids, starts, lengths, windows = [], [], [], []
    for i, ids in enumerate(token_lists):
        for s in range(0, len(ids), block_size):
            chunk = ids[s : s + block_size]
            doc_ids.append(first_doc_id + i)
            starts.append(s)
            lengths.append(len(chunk))
            windows.append(chunk + [0] * (block_size - len(chunk)))
    return {
        "doc_id": np.asarray(doc_ids, dtype=np.int64),
        "start": np.asarray(starts, dtype=np.int32),
        "length": np.asarray(lengths, dtype=np.int32),
        "input_ids": np.asarray(windows, dtype=np.int32).reshape(-1, block_size),
    }


def resolve_model(ref: str, download_to: Path, tracking_uri: str | None = None) -> str:
    """A local model folder for ``ref``: an MLflow URI (``runs:/<id>/model``, ``models:/...``,
    downloaded once into ``download_to``), a training checkpoint (its ``hf/`` folder), or a
    saved codebook model folder / hub name as given. A local folder is checked first
    (``verify_model_dir``): a missing, cut-short or truncated file is a ConfigError."""
    from codebook.checkpoint import resolve_local, verify_model_dir

    if ref.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        import mlflow

        if (download_to / "codebook_config.json").is_file():
            return str(verify_model_dir(download_to))
        download_to.mkdir(parents=True, exist_ok=True)
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(download_to),
                                                        tracking_uri=tracking_uri)
        except Exception as err:  # noqa: BLE001 - MLflow raises several types
            raise ConfigError("--model", f"cannot download {ref} ({err})",
                              "check the run id and --tracking-uri") from err
        return str(verify_model_dir(local))
    return resolve_local(ref)  # a hub name as it is: from_pretrained resolves it


def site_infos(model_path: str) -> dict[str, SiteInfo]:
    """Every codebook site of a saved model, from its configs (no weights read)."""
    from transformers import AutoConfig

    from codebook.config import CodebookConfig
    from codebook.sites import resolve_sites

    cb = CodebookConfig.load(Path(model_path) / "codebook_config.json")
    sites = resolve_sites(AutoConfig.from_pretrained(model_path), cb)
    k = cb.k_at(trained_steps(model_path))
    return {s.name: SiteInfo(groups=s.groups, k=k, num_codes=cb.num_codes, dim=s.dim)
            for s in sites}


def trained_steps(model_path: str) -> int:
    """The optimizer step a checkpoint's ``hf/`` folder was saved at (its trainer state);
    a model folder without one counts as fully trained (the k schedule's final k)."""
    state = Path(model_path).parent / "trainer_state.json"
    if state.is_file():
        return int(json.loads(state.read_text()).get("step", 0))
    return 10**12


def check_site_names(requested: list[str] | None, available: dict[str, SiteInfo],
                     flag: str) -> list[str]:
    """``requested`` sites (default: all), each checked against the model's sites."""
    if requested is None:
        return list(available)
    unknown = [s for s in requested if s not in available]
    if unknown:
        raise ConfigError(flag, f"unknown sites {unknown}",
                          f"choose from {list(available)}")
    return list(requested)


@torch.no_grad()
def extract_windows(model: Any, windows: dict[str, np.ndarray], sites: list[str],
                    activation_sites: list[str], batch_size: int = 8,
                    device: torch.device | str = "cpu") -> dict[str, Any]:
    """Run ``model`` over tokenised windows; per real token: ids, positions and codes.

    Right padding needs no attention mask: a causal model's outputs at real tokens do not
    depend on the pad tokens after them. Returns ``doc_id``, ``position``, ``token_id`` (T,)
    and ``codes`` {site: (T, groups, k)}, ``acts`` {site: (T, dim) float16}.
    """
    from codebook.interventions import read_codes

    n = len(windows["doc_id"])
    order = np.argsort(-windows["length"], kind="stable")  # similar lengths batch together
    parts: dict[str, list] = {"doc_id": [], "position": [], "token_id": []}
    codes: dict[str, list] = {s: [] for s in sites}
    acts: dict[str, list] = {s: [] for s in activation_sites}
    record_sites = list(dict.fromkeys([*sites, *activation_sites]))
    for lo in range(0, n, batch_size):
        idx = order[lo : lo + batch_size]
        length = windows["length"][idx]
        width = int(length.max())
        x = torch.from_numpy(windows["input_ids"][idx, :width].astype(np.int64)).to(device)
        rec = read_codes(model, x, record_sites, activations=bool(activation_sites))
        keep = np.arange(width)[None, :] < length[:, None]  # (b, width) real tokens
        parts["doc_id"].append(np.repeat(windows["doc_id"][idx], length))
        parts["position"].append(
            (windows["start"][idx][:, None] + np.arange(width)[None, :])[keep])
        parts["token_id"].append(windows["input_ids"][idx, :width][keep])
        for s in sites:
            codes[s].append(rec.codes[s].cpu().numpy()[keep])
        for s in activation_sites:
            acts[s].append(rec.activations[s].to(torch.float16).cpu().numpy()[keep])
    out: dict[str, Any] = {k: np.concatenate(v) if v else np.zeros(0, np.int64)
                           for k, v in parts.items()}
    # Back to document order (a shard's rows sorted by document, then position).
    order_rows = np.lexsort((out["position"], out["doc_id"]))
    for k in parts:
        out[k] = out[k][order_rows]
    out["codes"] = {s: np.concatenate(v)[order_rows] for s, v in codes.items() if v}
    out["acts"] = {s: np.concatenate(v)[order_rows] for s, v in acts.items() if v}
    return out


def load_extraction_model(model_path: str, device: str = "cpu") -> Any:
    """The codebook model for extraction, in eval mode, at its final k (read from the
    checkpoint's trainer state when there is one)."""
    from codebook.model import CodebookModel

    model = CodebookModel.from_pretrained(model_path).to(device).eval()
    model.set_step(trained_steps(model_path))
    return model


def shard_windows(source: dict[str, Any], shard: dict[str, int], tokenizer: Any,
                  block_size: int) -> dict[str, np.ndarray]:
    """Read a shard's documents and cut them into model windows."""
    docs = read_documents(source, shard["start"], shard["stop"])
    return tokenise_documents(docs, shard["start"], tokenizer, block_size)


def extract_to_store(model: Any, store: Any, shard: int, windows: dict[str, np.ndarray],
                     batch_size: int = 8, device: torch.device | str = "cpu") -> int:
    """Run the model over one shard's windows and write the shard; returns its token count."""
    from codebook.store import token_table

    meta = store.meta
    res = extract_windows(model, windows, list(meta.sites), meta.activation_sites, batch_size,
                          device)
    table = token_table(res["doc_id"], res["position"], res["token_id"], res["codes"], meta,
                        res["acts"])
    store.write_shard(shard, table)
    return table.num_rows
