"""Codes vs neurons as feature classifiers over a code store, with Ray Data.

    python pipelines/evaluate.py --store stores/shakespeare              # default regex features
    python pipelines/evaluate.py --store stores/corpus --features my_features.yaml
    python pipelines/evaluate.py --store stores/fsm                      # FSM states as features

Features are regexes over the text (the paper's kind ship by default; add your own in YAML:
``- {name: dragons, regex: '\\b(dragons?)\\b', ignore_case: true}``), or FSM states when the
store was extracted from the FSM. For each feature and site: the best code by precision at
recall >= --min-recall and by F1, and the best neuron at the code's recall from the stored raw
activations. Held out: the documents are split (--seed, --test-fraction) into a selection half,
on which every code, neuron and threshold is chosen, and a test half, on which they are scored
(``*_test``, the headline), with a permutation null (``code_precision_null``) beside the
features' base rates. Every feature gets a row; one without a qualifying code says why, and
the means stand beside their coverage. Results go to Parquet + CSV + a plot, all logged to
MLflow; the last line printed is a JSON summary. The checks are ``codebook.store.eval_job``'s,
the two passes run in Ray Data actors (``codebook.ray_glue.evaluate``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or a Ray job

from codebook.errors import ConfigError  # noqa: E402
from codebook.store import CodeStore  # noqa: E402
from codebook.tracking import default_tracking_uri  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="a folder written by pipelines/extract.py")
    p.add_argument("--features", help="YAML list of {name, regex, ignore_case} (added to the "
                                      "defaults)")
    p.add_argument("--no-default-features", action="store_true")
    p.add_argument("--sites", nargs="*", help="codebook sites to evaluate (default: all)")
    p.add_argument("--min-recall", type=float, default=0.1,
                   help="a code must reach this recall to count (precision ranking)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the document split into selection and test halves")
    p.add_argument("--test-fraction", type=float, default=0.5,
                   help="share of the documents held out for scoring the choices")
    p.add_argument("--no-null", action="store_true",
                   help="skip the permutation null (saves two count tables per site)")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--out", help="results folder (default: STORE/eval)")
    p.add_argument("--allow-partial", action="store_true",
                   help="evaluate the finished shards of an unfinished extraction")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else "
                                          "sqlite in the store)")
    p.add_argument("--experiment", default="codebook-evaluate")
    return p.parse_args(argv)


def write_results(result: dict[str, Any], out: Path, store: CodeStore,
                  args: argparse.Namespace) -> dict[str, Any]:
    """Parquet + CSV table, plot, summary; all logged to one MLflow run."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from codebook.analysis.plots import plot_feature_precision
    from codebook.io import atomic_write
    from codebook.store import write_parquet_atomic
    from codebook.store.heldout import heldout_summary
    from codebook.tracking import MLflowLogger, finish_run, start_run

    rows = result["rows"]
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows) if rows else pa.table({"feature": pa.array([], pa.string())})
    write_parquet_atomic(table, out / "results.parquet")
    with atomic_write(out / "results.csv", "wb") as fh:
        pacsv.write_csv(table, fh)
    # Codes and neurons are compared on the same (feature, site) rows: the best site among
    # those with stored activations when there are any, chosen on the selection half.
    held = heldout_summary(rows, result["names"], store.meta, result["sites"],
                           result["activation_sites"])
    covered = [f for f in held["per_feature"] if f["status"] == "ok"]
    if covered:  # the headline: the choices scored on the test half
        plot_feature_precision([{**f, "code_precision": f["code_precision_test"],
                                 "neuron_precision": f["neuron_precision_test"]}
                                for f in covered], out / "code_vs_neuron_precision.png")
    per_feature = held.pop("per_feature")
    summary = {
        **held,
        "tokens": result["tokens"],
        "split": result["split"],
        "skipped_features": result["skipped"],
        "per_feature": per_feature,
        "results": str(out / "results.parquet"),
        "store": str(store.root),
    }
    if not result["activation_sites"]:
        summary["note"] = ("no raw activations in the store for these sites: extract with "
                           "--activations SITE to get the neuron baseline")
    with atomic_write(out / "summary.json") as fh:
        json.dump(summary, fh, indent=2)
    uri = default_tracking_uri(args.tracking_uri, store.root)
    params = {"store": str(store.root), "model": store.meta.model,
              "min_recall": str(args.min_recall), "sites": ",".join(sorted({r["site"]
                                                                            for r in rows})),
              "seed": str(args.seed), "test_fraction": str(args.test_fraction)}
    run_id = start_run(uri, args.experiment, f"evaluate-{store.root.name}", params,
                       {"store": str(store.root)})
    metrics = {k: summary[k] for k in ("features", "features_with_code", "coverage",
                                       "code_precision_mean", "code_precision_test_mean",
                                       "neuron_precision_mean", "neuron_precision_test_mean",
                                       "neuron_coverage", "code_precision_null",
                                       "base_rate_mean", "tokens")}
    MLflowLogger(uri, run_id).log(0, {k: v for k, v in metrics.items() if v is not None})
    finish_run(uri, run_id, artifacts={"evaluation": out})
    summary["mlflow_run_id"] = run_id
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from codebook.analysis.features import load_features
    from codebook.store.eval_job import prepare_evaluation

    try:
        store = CodeStore(args.store)
        features = (None if store.meta.source["kind"] == "fsm" else
                    load_features(args.features, include_defaults=not args.no_default_features))
        job = prepare_evaluation(store, features, args.sites, args.min_recall, args.seed,
                                 args.test_fraction, args.allow_partial, not args.no_null)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    from codebook.ray_glue.evaluate import evaluate_store
    from codebook.ray_glue.session import ray_session

    try:
        with ray_session():
            result = evaluate_store(job, args.num_workers)
    except ConfigError as err:  # an actor's (e.g. a corrupt shard), unwrapped
        sys.exit(f"config error: {err}")
    for name in result["skipped"]:
        print(f"feature {name!r} matched no token in {result['tokens']} tokens: skipped",
              file=sys.stderr, flush=True)
    summary = write_results(result, Path(args.out) if args.out else store.root / "eval", store,
                            args)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
