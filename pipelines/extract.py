"""Extract codes over a corpus with Ray Data into a Parquet code store (resumable).

    python pipelines/extract.py --model RUN_DIR/checkpoint_xxx --source text --paths data/text \\
        --out stores/shakespeare
    python pipelines/extract.py --model runs:/<mlflow-run-id>/model --source parquet \\
        --paths corpus/ --activations attn_heads_0 --out stores/corpus
    python pipelines/extract.py --model RUN_DIR/checkpoint_xxx --source fsm \\
        --fsm-file RUN_DIR/analysis/fsm.json --out stores/fsm

Ray Data streams shards (fixed groups of documents) through read+tokenise actors into an actor
pool of models (one GPU per actor when the cluster has GPUs, otherwise CPUs); each model actor
writes whole shards atomically, so rerunning the same command skips finished shards. The last
line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or a Ray job

import numpy as np  # noqa: E402

from codebook.errors import ConfigError  # noqa: E402
from codebook.extraction import (  # noqa: E402
    Corpus,
    check_site_names,
    describe_corpus,
    plan_shards,
    resolve_model,
    site_infos,
)
from codebook.store import CodeStore, StoreMeta  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="training checkpoint, its hf/ folder, a saved codebook model, or an "
                        "MLflow URI such as runs:/<run_id>/model")
    p.add_argument("--out", required=True, help="code store folder (shared by all nodes)")
    p.add_argument("--source", choices=["text", "parquet", "hf", "fsm"], default="text")
    p.add_argument("--paths", nargs="*", default=[], help="text/parquet files or folders")
    p.add_argument("--text-column", default="text")
    p.add_argument("--hf-dataset")
    p.add_argument("--hf-config")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--fsm-file", help="fsm.json written by pipelines/fsm.py")
    p.add_argument("--fsm-sequences", type=int, default=1024,
                   help="how many of the FSM's fixed evaluation sequences to extract")
    p.add_argument("--max-documents", type=int)
    p.add_argument("--tokenizer", help="default: the model folder")
    p.add_argument("--sites", nargs="*", help="codebook sites to store (default: all)")
    p.add_argument("--activations", nargs="*", default=[],
                   help="sites whose raw inputs to store as float16 (for neuron baselines)")
    p.add_argument("--block-size", type=int, default=512, help="tokens per model window")
    p.add_argument("--docs-per-shard", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--num-workers", type=int, default=1, help="model actors")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="Ray CPUs per model actor (default: fits the cluster)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per CPU actor (default: cores / workers)")
    p.add_argument("--cpu", action="store_true", help="do not use GPUs even if present")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite in --out)")
    return p.parse_args(argv)


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

        from codebook.extraction import load_extraction_model

        if not use_gpu:
            torch.set_num_threads(threads)
        self.device = "cuda" if use_gpu else "cpu"
        self.model = load_extraction_model(model_path, self.device)
        self.store = CodeStore(store_root)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from codebook.extraction import extract_to_store

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
def prepare(args: argparse.Namespace) -> tuple[CodeStore, str, list[dict[str, int]]]:
    """Validate everything and open the store; returns (store, model path, pending shards)."""
    out = Path(args.out).expanduser().resolve()
    model_path = resolve_model(args.model, out / "model", _tracking_uri(args, out))
    infos = site_infos(model_path)
    sites = check_site_names(args.sites, infos, "--sites")
    act_sites = check_site_names(args.activations, infos, "--activations")
    for name, value in (("--block-size", args.block_size), ("--batch-size", args.batch_size),
                        ("--num-workers", args.num_workers)):
        if value < 1:
            raise ConfigError(name, f"must be >= 1, got {value}", "pass a positive number")
    corpus = Corpus(source=args.source, paths=args.paths, text_column=args.text_column,
                    hf_dataset=args.hf_dataset, hf_config=args.hf_config,
                    hf_split=args.hf_split, fsm_file=args.fsm_file,
                    fsm_sequences=args.fsm_sequences, max_documents=args.max_documents)
    source = describe_corpus(corpus)
    block_size = args.block_size
    tokenizer = None
    if source["kind"] == "fsm":
        from codebook.data.fsm import TokFSM

        block_size = TokFSM.from_dict(source["fsm"]).seq_len  # one window per sequence
    else:
        from codebook.data.text import load_tokenizer

        tokenizer = args.tokenizer or model_path
        load_tokenizer(tokenizer)  # fail here, not in an actor
    shards = plan_shards(source["num_documents"], args.docs_per_shard)
    meta = StoreMeta(model=model_path, tokenizer=tokenizer, source=source,
                     sites={s: infos[s] for s in sites}, activation_sites=act_sites,
                     block_size=block_size, num_shards=len(shards),
                     num_documents=source["num_documents"])
    store = CodeStore.create(out, meta)
    done = set(store.done_shards())
    return store, model_path, [s for s in shards if s["shard"] not in done]


def _tracking_uri(args: argparse.Namespace, out: Path) -> str:
    return (args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{out / 'mlflow.db'}")


def run_extraction(store: CodeStore, model_path: str, pending: list[dict[str, int]],
                   args: argparse.Namespace) -> dict[str, Any]:
    """The Ray Data pipeline over the pending shards; prints progress; returns a summary."""
    import ray
    import ray.data

    total_cpus = ray.cluster_resources().get("CPU", 1.0)
    use_gpu = not args.cpu and ray.cluster_resources().get("GPU", 0) >= 1
    tokenise_cpus = 0.25
    cpus = args.cpus_per_worker
    if cpus is None:  # leave room for the tokeniser so a small machine cannot deadlock
        cpus = 1.0 if use_gpu else max(0.1, min(1.0, (total_cpus - tokenise_cpus)
                                                 / args.num_workers))
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.num_workers)
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
                                   "batch_size": args.batch_size, "threads": threads,
                                   "use_gpu": use_gpu},
            compute=ray.data.ActorPoolStrategy(size=args.num_workers))
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
    """One MLflow run per extraction command: what was read, what was written, how fast."""
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        store, model_path, pending = prepare(args)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    from pipelines.launch import init_ray, shutdown_ray

    started = init_ray()
    try:
        summary = run_extraction(store, model_path, pending, args)
    finally:
        if started:
            shutdown_ray()
    summary["mlflow_run_id"] = log_run(store, summary, _tracking_uri(args, store.root))
    print(json.dumps({k: v for k, v in summary.items() if k != "shard_finish"}), flush=True)
    return summary


if __name__ == "__main__":
    main()
