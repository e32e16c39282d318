"""Standard dictionary metrics of a trained codebook model over a corpus, in this process.

    python pipelines/metrics.py --model RUN_DIR/checkpoint_xxx --source fsm \\
        --fsm-file RUN_DIR/analysis/fsm.json --out results/fsm-metrics
    python pipelines/metrics.py --model RUN_DIR/checkpoint_xxx --base EleutherAI/pythia-410m \\
        --source text --paths data/text --sites attn_heads_3,mlp_3 --max-tokens 100000

L0, FVE, CE loss with the codebooks on / off / of the base model (``--base``), per site the CE
loss recovered against zero ablation and KL(clean || site), dead codes and a code-frequency
histogram, as SAELens / SAEBench compute them (``codebook.analysis.metrics``; the checks and
the run are ``codebook.analysis.metrics_job``'s). The corpus options are
``pipelines/extract.py``'s; no Ray. Written to --out: ``sites.parquet``,
``sites.csv``, ``code_frequency.png`` (+ ``.json``), ``summary.json``, all logged to MLflow; the
last line printed is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script


from codebook.errors import ConfigError  # noqa: E402
from codebook.tracking import default_tracking_uri  # noqa: E402

if TYPE_CHECKING:
    from codebook.analysis.metrics_job import MetricsPlan


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="training checkpoint, its hf/ folder, a saved codebook model, or an "
                        "MLflow URI such as runs:/<run_id>/model")
    p.add_argument("--base", help="the original base model (folder or hub id) for ce_loss_base; "
                                  "same vocabulary as --model")
    p.add_argument("--source", choices=["text", "parquet", "hf", "fsm"], default="text")
    p.add_argument("--paths", nargs="*", default=[], help="text/parquet files or folders")
    p.add_argument("--text-column", default="text")
    p.add_argument("--hf-dataset")
    p.add_argument("--hf-config")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--hf-data-files", nargs="*")
    p.add_argument("--fsm-file", help="fsm.json written by pipelines/fsm.py")
    p.add_argument("--fsm-sequences", type=int, default=1024)
    p.add_argument("--max-documents", type=int)
    p.add_argument("--tokenizer", help="default: the model folder")
    p.add_argument("--sites", nargs="+", help="sites to report, comma- or space-separated "
                                              "(default: all)")
    p.add_argument("--max-tokens", type=int, help="stop after this many tokens (default: all)")
    p.add_argument("--block-size", type=int,
                   help="tokens per window (default: min(512, the model's context); FSM: its "
                        "sequence length)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--no-site-metrics", action="store_true",
                   help="skip the per-site CE / KL passes (2 forward passes per site)")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--out", help="results folder (default: metrics/<model name>)")
    p.add_argument("--tracking-uri",
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite in --out)")
    p.add_argument("--experiment", default="codebook-metrics")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> tuple[MetricsPlan, Path, str]:
    """The checked plan (``codebook.analysis.metrics_job``), the output folder and the MLflow
    store; every input is validated before any model loads."""
    from codebook.analysis.metrics_job import plan_metrics
    from codebook.corpus import Corpus
    from codebook.resolve import resolve_model

    out = Path(args.out or Path("metrics") / _model_name(args.model)).expanduser().resolve()
    uri = default_tracking_uri(args.tracking_uri, out)
    model_path = resolve_model(args.model, out / "model", uri)
    sites = None if args.sites is None else [
        s for item in args.sites for s in item.split(",") if s.strip()]
    corpus = Corpus(source=args.source, paths=args.paths, text_column=args.text_column,
                    hf_dataset=args.hf_dataset, hf_config=args.hf_config,
                    hf_split=args.hf_split, hf_data_files=args.hf_data_files,
                    fsm_file=args.fsm_file, fsm_sequences=args.fsm_sequences,
                    max_documents=args.max_documents)
    plan = plan_metrics(model_path, corpus, sites, args.base, args.tokenizer, args.block_size,
                        args.batch_size, args.max_tokens)
    return plan, out, uri


def write_results(result: Any, plan: MetricsPlan, out: Path, uri: str, args: argparse.Namespace
                  ) -> dict[str, Any]:
    """Parquet + CSV table, histogram plot and numbers, summary; all logged to one MLflow run."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from codebook.analysis.metrics import plot_code_frequencies
    from codebook.io import atomic_write
    from codebook.store import write_parquet_atomic
    from codebook.tracking import MLflowLogger, finish_run, log_artifacts, start_run

    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(result.rows())
    write_parquet_atomic(table, out / "sites.parquet")
    with atomic_write(out / "sites.csv", "wb") as fh:
        pacsv.write_csv(table, fh)
    plot_code_frequencies(result, out / "code_frequency.png")
    with atomic_write(out / "code_frequency.json") as fh:
        json.dump(result.histograms(), fh)
    summary = {**result.to_dict(), "model": plan.model_path, "base": plan.base_path,
               "source": plan.source["kind"], "out": str(out)}
    files = ["sites.parquet", "sites.csv", "code_frequency.png", "code_frequency.json",
             "summary.json"]
    params = {"model": plan.model_path, "base": str(plan.base_path),
              "source": plan.source["kind"], "sites": ",".join(plan.sites),
              "block_size": str(plan.block_size), "max_tokens": str(args.max_tokens),
              "site_metrics": str(not args.no_site_metrics), "ablation": result.ablation}
    run_id = start_run(uri, args.experiment, f"metrics-{out.name}", params,
                       {"out": str(out)})
    summary["mlflow_run_id"] = run_id
    with atomic_write(out / "summary.json") as fh:
        json.dump(summary, fh, indent=2)
    MLflowLogger(uri, run_id).log(0, result.flat())
    for name in files:
        log_artifacts(uri, run_id, out / name, "metrics")
    finish_run(uri, run_id)
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        plan, out, uri = prepare(args)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    from codebook.analysis.metrics_job import run_metrics

    result = run_metrics(plan, args.device, not args.no_site_metrics, args.max_tokens)
    summary = write_results(result, plan, out, uri, args)
    print(json.dumps(summary), flush=True)
    return summary


def _model_name(ref: str) -> str:
    path = Path(ref.rstrip("/"))
    name = path.parent.name if path.name == "hf" else path.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "model"


if __name__ == "__main__":
    main()
