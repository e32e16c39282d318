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
MLflow; the last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or a Ray job

import numpy as np  # noqa: E402

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


# ---------------------------------------------------------------------- Ray Data stages
class _ShardLabeller:
    """Reads a shard and labels its tokens with the features (regex or FSM states)."""

    def __init__(self, store_root: str, features: list[dict[str, Any]] | None):
        from codebook.analysis.features import RegexFeature

        self.store = CodeStore(store_root)
        meta = self.store.meta
        self.features = [RegexFeature(**f) for f in features] if features is not None else None
        self.tokenizer = self.fsm = None
        if self.features is None:
            from codebook.data.fsm import TokFSM

            self.fsm = TokFSM.from_dict(meta.source["fsm"])
        else:
            from codebook.data.text import load_tokenizer

            self.tokenizer = load_tokenizer(meta.tokenizer)

    def labelled(self, path: str, need_labels: bool = True):
        from codebook.analysis.store_eval import fsm_labels, regex_labels

        table = self.store.read_shard(path)
        if self.fsm is not None:
            labels, mask = fsm_labels(table, self.fsm)
            return table, labels, mask
        mask = np.ones(table.num_rows, dtype=bool)
        if not need_labels:
            return table, None, mask
        labels = regex_labels(table, self.store.meta.source, self.tokenizer, self.features, path)
        return table, labels, mask


def _shard_number(path: str) -> int:
    return int(Path(path).stem.split("-")[1])


class _CountShard(_ShardLabeller):
    def __init__(self, store_root, features, num_features, sites, activation_sites, split,
                 null=True):
        from codebook.analysis.store_heldout import DocumentSplit

        super().__init__(store_root, features)
        self.num_features, self.sites, self.act_sites = num_features, sites, activation_sites
        self.split, self.null = DocumentSplit(**split), null

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from codebook.analysis.store_heldout import heldout_count_partials

        partials = []
        for path in batch["path"]:
            table, labels, mask = self.labelled(str(path))
            partials.append(heldout_count_partials(
                table, self.store.meta, labels, mask, self.num_features, self.sites,
                self.act_sites, self.split, _shard_number(str(path)), self.null))
        return {"partial": partials}


class _AboveShard(_ShardLabeller):
    def __init__(self, store_root, features, thresholds, split):
        from codebook.analysis.store_heldout import DocumentSplit

        super().__init__(store_root, features)
        self.thresholds, self.split = thresholds, DocumentSplit(**split)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from codebook.analysis.store_heldout import heldout_above_counts

        partials = []
        for path in batch["path"]:
            table, _, mask = self.labelled(str(path), need_labels=False)
            partials.append(heldout_above_counts(table, mask, self.thresholds, self.split))
        return {"partial": partials}


def _merge_aggregation():
    from ray.data.aggregate import AggregateFnV2
    from ray.data.block import BlockAccessor

    from codebook.analysis.store_eval import merge_partials

    class MergePartials(AggregateFnV2):
        """Sum count arrays and stack positive activations across shards."""

        def __init__(self):
            super().__init__(name="merged", zero_factory=dict, on=None, ignore_nulls=True)

        def aggregate_block(self, block):
            acc: dict = {}
            for row in BlockAccessor.for_block(block).iter_rows(public_row_format=False):
                acc = merge_partials(acc, row["partial"])
            return acc

        def combine(self, current, new):
            return merge_partials(current, new)

    return MergePartials()


def _map_shards(files: list[str], stage: type, kwargs: dict[str, Any], workers: int) -> dict:
    import ray.data

    ds = ray.data.from_items([{"path": f} for f in files])
    ds = ds.map_batches(stage, batch_size=1, fn_constructor_kwargs=kwargs, num_cpus=0.5,
                        compute=ray.data.ActorPoolStrategy(size=workers))
    return ds.aggregate(_merge_aggregation())["merged"]


# ---------------------------------------------------------------------- driver
def prepare(args: argparse.Namespace) -> tuple[CodeStore, list[str], list[dict] | None,
                                                list[str], list[str], Any]:
    """Open and check the store, features and document split before Ray starts."""
    from codebook.analysis.features import load_features
    from codebook.analysis.store_heldout import store_split
    from codebook.resolve import check_site_names

    store = CodeStore(args.store)
    meta = store.meta
    files = [str(f) for f in store.shard_files()]
    if not files:
        raise ConfigError("--store", f"{store.root} has no finished shards",
                          "run pipelines/extract.py first")
    if not store.complete and not args.allow_partial:
        raise ConfigError("--store", f"{len(files)} of {meta.num_shards} shards are finished",
                          "rerun the same extract command to finish, or pass --allow-partial")
    if not 0.0 <= args.min_recall <= 1.0:
        raise ConfigError("--min-recall", f"must be in [0, 1], got {args.min_recall}",
                          "e.g. 0.1")
    split = store_split(store, args.seed, args.test_fraction)
    sites = check_site_names(args.sites, meta.sites, "--sites")
    if meta.source["kind"] == "fsm":
        from codebook.data.fsm import TokFSM

        features = None
        names = [f"state_{s}" for s in range(TokFSM.from_dict(meta.source["fsm"]).num_states)]
    else:
        regexes = load_features(args.features, include_defaults=not args.no_default_features)
        if not regexes:
            raise ConfigError("--features", "no features to evaluate",
                              "drop --no-default-features or pass --features FILE")
        features = [{"name": f.name, "regex": f.regex, "ignore_case": f.ignore_case}
                    for f in regexes]
        names = [f.name for f in regexes]
    return store, files, features, names, sites, split


def evaluate(store: CodeStore, files: list[str], features: list[dict] | None,
             names: list[str], sites: list[str], split: Any, args: argparse.Namespace
             ) -> dict[str, Any]:
    """Both passes over the shards, held out (``codebook.analysis.store_heldout``); returns
    rows (one per feature and site, every feature) and totals."""
    from codebook.analysis.store_eval import neuron_thresholds
    from codebook.analysis.store_heldout import (
        SELECTION,
        TEST,
        heldout_code_rows,
        heldout_neuron_rows,
        sub_partial,
    )

    act_sites = [s for s in store.meta.activation_sites if s in sites]
    merged = _map_shards(files, _CountShard, {
        "store_root": str(store.root), "features": features, "num_features": len(names),
        "sites": sites, "activation_sites": act_sites, "split": split.kwargs(),
        "null": not args.no_null}, args.num_workers)
    rows = heldout_code_rows(merged, store.meta, sites, names, args.min_recall)
    thresholds = neuron_thresholds(sub_partial(merged, SELECTION), rows, act_sites)
    above = {}
    if thresholds:
        above = _map_shards(files, _AboveShard, {
            "store_root": str(store.root), "features": features, "thresholds": thresholds,
            "split": split.kwargs()}, args.num_workers)
    heldout_neuron_rows(rows, thresholds, above, merged, act_sites)
    sel, test = sub_partial(merged, SELECTION), sub_partial(merged, TEST)
    counts = sel["label_counts"] + test["label_counts"]
    tokens = {"selection": int(sel["tokens"].sum()), "test": int(test["tokens"].sum())}
    return {"rows": rows, "tokens": tokens["selection"] + tokens["test"],
            "split": {**split.info(), "tokens_selection": tokens["selection"],
                      "tokens_test": tokens["test"], "null": not args.no_null},
            "skipped": [n for n, c in zip(names, counts, strict=True) if c == 0],
            "activation_sites": act_sites, "names": names, "sites": sites}


def write_results(result: dict[str, Any], out: Path, store: CodeStore,
                  args: argparse.Namespace) -> dict[str, Any]:
    """Parquet + CSV table, plot, summary; all logged to one MLflow run."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from codebook.analysis.plots import plot_feature_precision
    from codebook.analysis.store_heldout import heldout_summary
    from codebook.io import atomic_write
    from codebook.store import write_parquet_atomic
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
    try:
        store, files, features, names, sites, split = prepare(args)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    from codebook.ray_glue.session import ray_session

    try:
        with ray_session():
            result = evaluate(store, files, features, names, sites, split, args)
    except Exception as err:  # an actor's ConfigError (e.g. a corrupt shard) arrives wrapped
        cause = _config_error_in(err)
        if cause is None:
            raise
        sys.exit(f"config error: {cause}")
    for name in result["skipped"]:
        print(f"feature {name!r} matched no token in {result['tokens']} tokens: skipped",
              file=sys.stderr, flush=True)
    summary = write_results(result, Path(args.out) if args.out else store.root / "eval", store,
                            args)
    print(json.dumps(summary), flush=True)
    return summary


def _config_error_in(err: BaseException) -> ConfigError | None:
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, ConfigError):
            return err
        err = err.__cause__ or getattr(err, "cause", None)
        seen += 1
    return None


if __name__ == "__main__":
    main()
