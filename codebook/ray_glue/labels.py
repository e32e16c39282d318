"""Automatic code labels with Ray Data: the shards counted in an actor pool, summed by a groupby.

The same steps as ``codebook.store.autolabel.build_labels`` (which runs them in one process):
each shard becomes sparse count rows (``shard_label_counts``), Ray Data sums them by key
(``groupby(...).sum("count")``), and the driver chooses every code's label and writes
``labels.parquet`` into the store folder, identical to the local driver's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from codebook.analysis.features import RegexFeature
from codebook.store import CodeStore
from codebook.store.autolabel import LabelJob, ShardCounter, finish_labels, prepare_labels
from codebook.store.label_counts import COUNT_KEYS, COUNT_SCHEMA


class _CountShard:
    """A counting actor: each input row (a shard's path) becomes that shard's count rows."""

    def __init__(self, job: LabelJob):
        self.counter = ShardCounter(job)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return pa.concat_tables([self.counter(str(path)) for path in batch["path"]])


def count_rows(store: CodeStore, job: LabelJob, num_cpus: float = 0.5,
               num_workers: int = 1) -> pa.Table:
    """Every shard counted and the counts summed by key, with Ray Data (``COUNT_SCHEMA``)."""
    import ray
    import ray.data

    ds = ray.data.from_items([{"path": str(p)} for p in store.shard_files()])
    ds = ds.map_batches(_CountShard, batch_size=1, num_cpus=num_cpus,
                        fn_constructor_kwargs={"job": job},
                        compute=ray.data.ActorPoolStrategy(size=num_workers))
    ds = ds.groupby(COUNT_KEYS).sum("count")
    blocks = [b for b in ray.get(ds.to_arrow_refs()) if b.num_rows]
    if not blocks:
        return COUNT_SCHEMA.empty_table()
    merged = pa.concat_tables(blocks, promote_options="default")
    merged = merged.rename_columns({"sum(count)": "count"})
    return merged.select(COUNT_SCHEMA.names).cast(COUNT_SCHEMA)


def build_labels_ray(store_root: str | os.PathLike[str],
                     features: Sequence[RegexFeature] | None = None,
                     sites: Sequence[str] | None = None, seed: int = 0,
                     test_fraction: float = 0.5, top_candidates: int = 5, min_count: int = 2,
                     num_cpus: float = 0.5, num_workers: int = 1) -> pa.Table:
    """``autolabel.build_labels`` with the counting in Ray Data (``num_workers`` actors of
    ``num_cpus`` CPUs each; Ray must be up, e.g. ``ray_session``). Writes and returns
    ``labels.parquet``, the same as the local driver's."""
    store = CodeStore(store_root)
    job = prepare_labels(store, features, sites, seed, test_fraction, top_candidates, min_count)
    counts = count_rows(store, job, num_cpus, num_workers)
    return finish_labels(job, counts)


__all__ = ["build_labels_ray", "count_rows"]
