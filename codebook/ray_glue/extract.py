"""The code-extraction job: open the store (no Ray), then a Ray Data pipeline over its shards.

Ray Data streams shards (fixed groups of documents) through read+tokenise actors into an actor
pool of models (one GPU per actor when the cluster has GPUs, otherwise CPUs); each model actor
writes whole shards atomically, so rerunning the same job skips finished shards.
``pipelines/extract.py`` is the command line for it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from codebook.corpus import Corpus, SourceKind, describe_corpus
from codebook.errors import ConfigError
from codebook.extraction import plan_shards
from codebook.resolve import check_site_names, resolve_model, site_infos
from codebook.store import CodeStore, StoreMeta
from codebook.tracking import default_tracking_uri


@dataclass
class ExtractOptions:
    """An extraction job: ``pipelines/extract.py``'s options, same names and defaults."""

    model: str  # checkpoint, its hf/ folder, saved codebook model or MLflow URI
    out: str  # code store folder (shared by all nodes)
    source: SourceKind = "text"
    paths: list[str] = field(default_factory=list)
    text_column: str = "text"
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    hf_data_files: list[str] | None = None
    fsm_file: str | None = None
    fsm_sequences: int = 1024
    max_documents: int | None = None
    tokenizer: str | None = None  # default: the model folder
    sites: list[str] | None = None  # None: all
    activations: list[str] = field(default_factory=list)
    # Each firing's similarity score (float16) beside its code id: ranks a code's examples.
    # Off by default: it costs more than the 25% extra bytes per token we allow a default (the
    # FSM default model, 20 codes per token: 22.3 -> 51.3 bytes/token, x2.30; measured by
    # benchmarks/store_scores.py). Scores barely compress; code ids do.
    scores: bool = False
    block_size: int = 512
    docs_per_shard: int = 64
    batch_size: int = 8
    num_workers: int = 1
    cpus_per_worker: float | None = None  # None: fits the cluster
    threads: int | None = None  # None: cores / workers
    cpu: bool = False
    tracking_uri: str | None = None


# ---------------------------------------------------------------------- Ray Data stages
WINDOW_KEYS = ("doc_id", "start", "length", "input_ids")


class _ReadTokenise:
    """Read a shard's documents and cut them into model windows (one output row per shard)."""

    def __init__(self, source: dict[str, Any], tokenizer: str | None, block_size: int):
        from codebook.data.text import load_tokenizer

        self.source, self.block_size = source, block_size
        self.tokenizer = load_tokenizer(tokenizer) if source["kind"] != "fsm" else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from codebook.extraction import shard_windows

        out: dict[str, list] = {"shard": [], **{k: [] for k in WINDOW_KEYS}}
        for shard, start, stop in zip(batch["shard"], batch["start"], batch["stop"], strict=True):
            windows = shard_windows(self.source, {"start": int(start), "stop": int(stop)},
                                    self.tokenizer, self.block_size)
            out["shard"].append(int(shard))
            for k in WINDOW_KEYS:
                out[k].append(windows[k])
        return out


class _ExtractShard:
    """A model replica: run each shard's windows, write the shard to the store atomically."""

    def __init__(self, model_path: str, store_root: str, batch_size: int, threads: int,
                 use_gpu: bool):
        import torch

        from codebook.resolve import load_trained_model

        if not use_gpu:
            torch.set_num_threads(threads)
        self.device = "cuda" if use_gpu else "cpu"
        self.model = load_trained_model(model_path, self.device)
        self.store = CodeStore(store_root)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from codebook.store.extract import extract_to_store

        out: dict[str, list] = {"shard": [], "tokens": [], "seconds": []}
        for i, shard in enumerate(batch["shard"]):
            t0 = time.perf_counter()
            windows = {k: np.asarray(batch[k][i]) for k in WINDOW_KEYS}
            windows["input_ids"] = windows["input_ids"].reshape(-1, self.store.meta.block_size)
            tokens = extract_to_store(self.model, self.store, int(shard), windows,
                                      self.batch_size, self.device)
            out["shard"].append(int(shard))
            out["tokens"].append(tokens)
            out["seconds"].append(time.perf_counter() - t0)
        return out


# ---------------------------------------------------------------------- driver
def prepare(opts: ExtractOptions) -> tuple[CodeStore, str, list[dict[str, int]]]:
    """Validate everything and open the store; returns (store, model path, pending shards).
    Needs no Ray."""
    out = Path(opts.out).expanduser().resolve()
    model_path = resolve_model(opts.model, out / "model", tracking_uri(opts, out))
    infos = site_infos(model_path)
    sites = check_site_names(opts.sites, infos, "--sites")
    act_sites = check_site_names(opts.activations, infos, "--activations")
    for name, value in (("--block-size", opts.block_size), ("--batch-size", opts.batch_size),
                        ("--num-workers", opts.num_workers)):
        if value < 1:
            raise ConfigError(name, f"must be >= 1, got {value}", "pass a positive number")
    corpus = Corpus(source=opts.source, paths=opts.paths, text_column=opts.text_column,
                    hf_dataset=opts.hf_dataset, hf_config=opts.hf_config,
                    hf_split=opts.hf_split, hf_data_files=opts.hf_data_files,
                    fsm_file=opts.fsm_file, fsm_sequences=opts.fsm_sequences,
                    max_documents=opts.max_documents)
    source = describe_corpus(corpus)
    block_size = opts.block_size
    tokenizer = None
    if source["kind"] == "fsm":
        from codebook.data.fsm import TokFSM

        block_size = TokFSM.from_dict(source["fsm"]).seq_len  # one window per sequence
    else:
        from codebook.data.text import load_tokenizer

        tokenizer = opts.tokenizer or model_path
        load_tokenizer(tokenizer)  # fail here, not in an actor
    shards = plan_shards(source["num_documents"], opts.docs_per_shard)
    meta = StoreMeta(model=model_path, tokenizer=tokenizer, source=source,
                     sites={s: infos[s] for s in sites}, activation_sites=act_sites,
                     score_sites=list(sites) if opts.scores else [],
                     block_size=block_size, num_shards=len(shards),
                     num_documents=source["num_documents"])
    store = CodeStore.create(out, meta)
    done = set(store.done_shards())
    return store, model_path, [s for s in shards if s["shard"] not in done]


def tracking_uri(opts: ExtractOptions, out: Path) -> str:
    """The MLflow store: the option, else $MLFLOW_TRACKING_URI, else sqlite in the store."""
    return default_tracking_uri(opts.tracking_uri, out)


def run_extraction(store: CodeStore, model_path: str, pending: list[dict[str, int]],
                   opts: ExtractOptions) -> dict[str, Any]:
    """The Ray Data pipeline over the pending shards; prints progress; returns a summary."""
    import ray
    import ray.data

    total_cpus = ray.cluster_resources().get("CPU", 1.0)
    use_gpu = not opts.cpu and ray.cluster_resources().get("GPU", 0) >= 1
    tokenise_cpus = 0.25
    cpus = opts.cpus_per_worker
    if cpus is None:  # leave room for the tokeniser so a small machine cannot deadlock
        cpus = 1.0 if use_gpu else max(0.1, min(1.0, (total_cpus - tokenise_cpus)
                                                 / opts.num_workers))
    threads = opts.threads or max(1, (os.cpu_count() or 1) // opts.num_workers)
    meta = store.meta
    t0 = time.perf_counter()
    tokens = 0
    finished: list[tuple[float, int]] = []  # (seconds since start, tokens) per shard
    if pending:
        ds = ray.data.from_items(pending)
        ds = ds.map_batches(
            _ReadTokenise, batch_size=1, num_cpus=tokenise_cpus,
            fn_constructor_kwargs={"source": meta.source, "tokenizer": meta.tokenizer,
                                   "block_size": meta.block_size},
            compute=ray.data.ActorPoolStrategy(size=1))
        ds = ds.map_batches(
            _ExtractShard, batch_size=1, num_cpus=0 if use_gpu else cpus,
            num_gpus=1 if use_gpu else 0,
            fn_constructor_kwargs={"model_path": model_path, "store_root": str(store.root),
                                   "batch_size": opts.batch_size, "threads": threads,
                                   "use_gpu": use_gpu},
            compute=ray.data.ActorPoolStrategy(size=opts.num_workers))
        for done, row in enumerate(ds.iter_rows(), start=1):
            tokens += int(row["tokens"])
            finished.append((round(time.perf_counter() - t0, 3), int(row["tokens"])))
            rate = tokens / max(time.perf_counter() - t0, 1e-9)
            eta = (len(pending) - done) * (time.perf_counter() - t0) / done
            print(f"shard {int(row['shard'])} done ({done}/{len(pending)}): {tokens} tokens, "
                  f"{rate:,.0f} tokens/s, ETA {eta:.0f}s", flush=True)
    seconds = time.perf_counter() - t0
    stats = store.finalize_stats() if store.complete else None
    return {
        "store": str(store.root),
        "shards": meta.num_shards,
        "shards_done_now": len(pending),
        "shards_skipped": meta.num_shards - len(pending),
        "documents": meta.num_documents,
        "tokens_extracted_now": tokens,
        "tokens_per_s": round(tokens / seconds, 1) if tokens else None,
        "seconds": round(seconds, 2),
        "complete": store.complete,
        "codes_used": None if stats is None else stats.num_rows,
        "use_gpu": use_gpu,
        "steady_tokens_per_s": steady_rate(finished),
        "shard_finish": finished,
    }


def steady_rate(finished: list[tuple[float, int]]) -> float | None:
    """Tokens/s between the first and the last finished shard (start-up excluded)."""
    if len(finished) < 2 or finished[-1][0] <= finished[0][0]:
        return None
    return round(sum(n for _, n in finished[1:]) / (finished[-1][0] - finished[0][0]), 1)


def log_run(store: CodeStore, summary: dict[str, Any], uri: str) -> str:
    """One MLflow run per extraction job: what was read, what was written, how fast."""
    from codebook.tracking import MLflowLogger, finish_run, start_run

    meta = store.meta
    params = {"model": meta.model, "tokenizer": str(meta.tokenizer),
              "source": meta.source["kind"], "sites": ",".join(meta.sites),
              "activation_sites": ",".join(meta.activation_sites),
              "block_size": str(meta.block_size), "shards": str(meta.num_shards),
              "documents": str(meta.num_documents)}
    run_id = start_run(uri, "codebook-extract", f"extract-{store.root.name}", params,
                       {"store": str(store.root)})
    metrics = {k: summary[k] for k in ("tokens_extracted_now", "tokens_per_s",
                                       "steady_tokens_per_s", "shards_done_now",
                                       "shards_skipped") if summary.get(k) is not None}
    MLflowLogger(uri, run_id).log(0, metrics)
    finish_run(uri, run_id)
    return run_id
