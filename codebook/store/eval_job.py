"""One evaluation of a code store, checked before any work: codes (and neurons) as classifiers
of features, chosen on the selection half of the documents and scored on the test half.

``prepare_evaluation`` checks the store, features, sites and split and returns an ``EvalJob``
(picklable: a Ray actor gets it as is). The shards go through two stages, each a callable that
turns one shard's path into a partial result that adds up across shards (``evaluate.
merge_partials``): ``CountShard`` (pass 1, ``heldout.heldout_count_partials``) and ``AboveShard``
(pass 2, ``heldout.heldout_above_counts``). ``run_evaluation`` drives both passes through any
``map_shards(stage, kwargs)``: ``local_map`` in this process, ``codebook.ray_glue.evaluate`` in
Ray Data actors.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from codebook.analysis.features import RegexFeature
from codebook.errors import ConfigError
from codebook.store import CodeStore
from codebook.store.evaluate import (
    Partial,
    fsm_labels,
    merge_partials,
    neuron_thresholds,
    regex_labels,
)
from codebook.store.heldout import (
    SELECTION,
    TEST,
    DocumentSplit,
    heldout_above_counts,
    heldout_code_rows,
    heldout_count_partials,
    heldout_neuron_rows,
    store_split,
    sub_partial,
)

# A stage class and its keyword arguments in, the stage's partials over every shard summed out.
MapShards = Callable[[type, dict[str, Any]], Partial]


@dataclass(frozen=True)
class EvalJob:
    """One evaluation run, checked: its shards, features (None: the FSM's states), sites and
    document split."""

    store_root: str
    files: tuple[str, ...]
    features: tuple[RegexFeature, ...] | None
    names: tuple[str, ...]  # feature names, in row order
    sites: tuple[str, ...]
    activation_sites: tuple[str, ...]  # of ``sites``, those with stored activations
    split: DocumentSplit
    min_recall: float = 0.1
    null: bool = True


def prepare_evaluation(store: CodeStore | str | os.PathLike[str],
                       features: list[RegexFeature] | None = None, sites: list[str] | None = None,
                       min_recall: float = 0.1, seed: int = 0, test_fraction: float = 0.5,
                       allow_partial: bool = False, null: bool = True) -> EvalJob:
    """Check the store (finished shards, each readable: ``heldout.store_split`` reads their
    document ids), the recall floor, sites and features; ``features`` are the regexes for a text
    store (None: the default library; ignored for an FSM store, whose features are its
    states)."""
    from codebook.resolve import check_site_names

    store = store if isinstance(store, CodeStore) else CodeStore(store)
    meta = store.meta
    files = tuple(str(f) for f in store.shard_files())
    if not files:
        raise ConfigError("--store", f"{store.root} has no finished shards",
                          "run pipelines/extract.py first")
    if not store.complete and not allow_partial:
        raise ConfigError("--store", f"{len(files)} of {meta.num_shards} shards are finished",
                          "rerun the same extract command to finish, or pass --allow-partial")
    if not 0.0 <= min_recall <= 1.0:
        raise ConfigError("--min-recall", f"must be in [0, 1], got {min_recall}", "e.g. 0.1")
    split = store_split(store, seed, test_fraction)
    names = check_site_names(sites, meta.sites, "--sites")
    if meta.source["kind"] == "fsm":
        from codebook.data.fsm import TokFSM

        regexes = None
        labels = [f"state_{s}" for s in range(TokFSM.from_dict(meta.source["fsm"]).num_states)]
    else:
        if features is None:
            from codebook.analysis.features import load_features

            features = load_features(None)
        if not features:
            raise ConfigError("--features", "no features to evaluate",
                              "drop --no-default-features or pass --features FILE")
        regexes = tuple(features)
        for f in regexes:
            f.compiled()
        labels = [f.name for f in regexes]
    acts = tuple(s for s in meta.activation_sites if s in names)
    return EvalJob(str(store.root), files, regexes, tuple(labels), tuple(names), acts, split,
                   min_recall, null)


# ---------------------------------------------------------------------- the stages
class ShardLabeller:
    """Reads a shard and labels its tokens with the job's features (regexes or FSM states)."""

    def __init__(self, job: EvalJob):
        self.job = job
        self.store = CodeStore(job.store_root)
        meta = self.store.meta
        self.tokenizer = self.fsm = None
        if job.features is None:
            from codebook.data.fsm import TokFSM

            self.fsm = TokFSM.from_dict(meta.source["fsm"])
        else:
            from codebook.data.text import load_tokenizer

            self.tokenizer = load_tokenizer(meta.tokenizer)

    def labelled(self, path: str, need_labels: bool = True
                 ) -> tuple[pa.Table, np.ndarray | None, np.ndarray]:
        """(shard rows, (T, F) labels or None, (T,) mask of the tokens counted)."""
        table = self.store.read_shard(path)
        if self.fsm is not None:
            labels, mask = fsm_labels(table, self.fsm)
            return table, labels, mask
        mask = np.ones(table.num_rows, dtype=bool)
        if not need_labels:
            return table, None, mask
        labels = regex_labels(table, self.store.meta.source, self.tokenizer,
                              list(self.job.features), path)
        return table, labels, mask


def shard_number(path: str) -> int:
    """The shard index in a token file's name (``shard-00012.parquet`` -> 12)."""
    return int(os.path.basename(path).split("-")[1].split(".")[0])


class CountShard(ShardLabeller):
    """Pass 1 on one shard: per half, code-feature counts and positives' activations, and the
    permutation null's counts (``heldout.heldout_count_partials``)."""

    def __call__(self, path: str) -> Partial:
        job = self.job
        table, labels, mask = self.labelled(path)
        return heldout_count_partials(table, self.store.meta, labels, mask, len(job.names),
                                      list(job.sites), list(job.activation_sites), job.split,
                                      shard_number(path), job.null)


class AboveShard(ShardLabeller):
    """Pass 2 on one shard: per half, tokens at or above every neuron threshold."""

    def __init__(self, job: EvalJob, thresholds: dict[str, np.ndarray]):
        super().__init__(job)
        self.thresholds = thresholds

    def __call__(self, path: str) -> Partial:
        table, _, mask = self.labelled(path, need_labels=False)
        return heldout_above_counts(table, mask, self.thresholds, self.job.split)


def local_map(job: EvalJob) -> MapShards:
    """``map_shards`` in this process, shard after shard (no Ray)."""
    def run(stage: type, kwargs: dict[str, Any]) -> Partial:
        fn = stage(**kwargs)
        merged: Partial = {}
        for path in job.files:
            merged = merge_partials(merged, fn(path))
        return merged

    return run


# ---------------------------------------------------------------------- the driver
def run_evaluation(job: EvalJob, map_shards: MapShards) -> dict[str, Any]:
    """Both passes over the job's shards, held out; returns ``rows`` (one per feature and
    site, every feature), ``tokens``, ``split`` (with tokens per half), ``skipped`` (features
    without a positive), ``names``, ``sites`` and ``activation_sites``."""
    act_sites = list(job.activation_sites)
    meta = CodeStore(job.store_root).meta
    merged = map_shards(CountShard, {"job": job})
    rows = heldout_code_rows(merged, meta, list(job.sites), list(job.names), job.min_recall)
    thresholds = neuron_thresholds(sub_partial(merged, SELECTION), rows, act_sites)
    above = map_shards(AboveShard, {"job": job, "thresholds": thresholds}) if thresholds else {}
    heldout_neuron_rows(rows, thresholds, above, merged, act_sites)
    sel, test = sub_partial(merged, SELECTION), sub_partial(merged, TEST)
    counts = sel["label_counts"] + test["label_counts"]
    tokens = {"selection": int(sel["tokens"].sum()), "test": int(test["tokens"].sum())}
    return {"rows": rows, "tokens": tokens["selection"] + tokens["test"],
            "split": {**job.split.info(), "tokens_selection": tokens["selection"],
                      "tokens_test": tokens["test"], "null": job.null},
            "skipped": [n for n, c in zip(job.names, counts, strict=True) if c == 0],
            "activation_sites": act_sites, "names": list(job.names), "sites": list(job.sites)}
