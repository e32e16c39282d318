"""Extract codes over a corpus with Ray Data into a Parquet code store (resumable).

    python pipelines/extract.py --model RUN_DIR/checkpoint_xxx --source text --paths data/text \\
        --out stores/shakespeare
    python pipelines/extract.py --model runs:/<mlflow-run-id>/model --source parquet \\
        --paths corpus/ --activations attn_heads_0 --out stores/corpus
    python pipelines/extract.py --model RUN_DIR/checkpoint_xxx --source fsm \\
        --fsm-file RUN_DIR/analysis/fsm.json --out stores/fsm

Ray Data streams shards (fixed groups of documents) through read+tokenise actors into an actor
pool of models (one GPU per actor when the cluster has GPUs, otherwise CPUs); each model actor
writes whole shards atomically, so rerunning the same command skips finished shards
(``codebook.ray_glue.extract``). The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or a Ray job

from codebook.errors import ConfigError  # noqa: E402
from codebook.ray_glue.extract import (  # noqa: E402
    ExtractOptions,
    log_run,
    prepare,
    run_extraction,
    tracking_uri,
)
from codebook.ray_glue.session import ray_session  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="training checkpoint, its hf/ folder, a saved codebook model, or an "
                        "MLflow URI such as runs:/<run_id>/model")
    p.add_argument("--out", required=True, help="code store folder (shared by all nodes)")
    p.add_argument("--source", choices=["text", "parquet", "hf", "fsm"])
    p.add_argument("--paths", nargs="*", help="text/parquet files or folders")
    p.add_argument("--text-column")
    p.add_argument("--hf-dataset")
    p.add_argument("--hf-config")
    p.add_argument("--hf-split")
    p.add_argument("--hf-data-files", nargs="*",
                   help="data files for --hf-dataset (a builder such as parquet, or a folder)")
    p.add_argument("--fsm-file", help="fsm.json written by pipelines/fsm.py")
    p.add_argument("--fsm-sequences", type=int,
                   help="how many of the FSM's fixed evaluation sequences to extract")
    p.add_argument("--max-documents", type=int)
    p.add_argument("--tokenizer", help="default: the model folder")
    p.add_argument("--sites", nargs="*", help="codebook sites to store (default: all)")
    p.add_argument("--activations", nargs="*",
                   help="sites whose raw inputs to store as float16 (for neuron baselines)")
    p.add_argument("--scores", action=argparse.BooleanOptionalAction,
                   help="store each firing's similarity score (float16), which ranks a code's "
                        "examples on its page (default: off; x2.3 bytes per token measured)")
    p.add_argument("--block-size", type=int, help="tokens per model window")
    p.add_argument("--docs-per-shard", type=int)
    p.add_argument("--batch-size", type=int, help="windows per forward pass")
    p.add_argument("--num-workers", type=int, help="model actors")
    p.add_argument("--cpus-per-worker", type=float,
                   help="Ray CPUs per model actor (default: fits the cluster)")
    p.add_argument("--threads", type=int,
                   help="torch threads per CPU actor (default: cores / workers)")
    p.add_argument("--cpu", action="store_true", help="do not use GPUs even if present")
    p.add_argument("--tracking-uri",
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite in --out)")
    # ExtractOptions holds the defaults (one place for the library and the command line)
    defaults = dataclasses.asdict(ExtractOptions(model="", out=""))
    p.set_defaults(**{k: v for k, v in defaults.items() if k not in ("model", "out")})
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    opts = ExtractOptions(**vars(parse_args(argv)))
    try:
        store, model_path, pending = prepare(opts)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    with ray_session():
        summary = run_extraction(store, model_path, pending, opts)
    summary["mlflow_run_id"] = log_run(store, summary, tracking_uri(opts, store.root))
    print(json.dumps({k: v for k, v in summary.items() if k != "shard_finish"}), flush=True)
    return summary


if __name__ == "__main__":
    main()
