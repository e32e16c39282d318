"""The store evaluation's two passes with Ray Data: shards mapped in an actor pool, their
partial results summed by one aggregation.

The stages are the library's (``codebook.store.eval_job``: ``CountShard``, ``AboveShard``); this
module only runs them, one shard path per row, in ``num_workers`` actors, and merges the partials
with ``evaluate.merge_partials`` (counts added, positives' activations stacked). The same driver
runs in one process with ``eval_job.local_map``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from codebook.errors import ConfigError
from codebook.store.eval_job import EvalJob, run_evaluation
from codebook.store.evaluate import Partial, merge_partials


class _StageActor:
    """A Ray Data actor around one stage: each input row (a shard's path) becomes a partial."""

    def __init__(self, stage: type, kwargs: dict[str, Any]):
        self.fn = stage(**kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        return {"partial": [self.fn(str(path)) for path in batch["path"]]}


def _merge_aggregation() -> Any:
    from ray.data.aggregate import AggregateFnV2
    from ray.data.block import BlockAccessor

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


def map_shards(files: list[str] | tuple[str, ...], stage: type, kwargs: dict[str, Any],
               num_workers: int = 1, num_cpus: float = 0.5) -> Partial:
    """``stage(**kwargs)`` over every shard in ``num_workers`` actors, partials merged."""
    import ray.data

    ds = ray.data.from_items([{"path": f} for f in files])
    ds = ds.map_batches(_StageActor, batch_size=1, num_cpus=num_cpus,
                        fn_constructor_kwargs={"stage": stage, "kwargs": kwargs},
                        compute=ray.data.ActorPoolStrategy(size=num_workers))
    return ds.aggregate(_merge_aggregation())["merged"]


def evaluate_store(job: EvalJob, num_workers: int = 1) -> dict[str, Any]:
    """``eval_job.run_evaluation`` with both passes in Ray Data (Ray must be up, e.g.
    ``ray_session``). An actor's ConfigError (e.g. a corrupt shard), which Ray hands over
    wrapped, is raised as itself."""
    try:
        return run_evaluation(job, lambda stage, kwargs: map_shards(job.files, stage, kwargs,
                                                                    num_workers))
    except Exception as err:
        cause = config_error_in(err)
        if cause is None:
            raise
        raise cause from err


def config_error_in(err: BaseException | None, depth: int = 10) -> ConfigError | None:
    """The original ConfigError inside a Ray error, if any: down its ``cause`` (a
    ``RayTaskError``'s, also when Ray made it an instance of the cause's class) or else its
    ``__cause__`` chain."""
    while err is not None and depth > 0:
        inner = getattr(err, "cause", None)
        if isinstance(err, ConfigError) and not isinstance(inner, ConfigError):
            return err
        err = inner if isinstance(inner, BaseException) else err.__cause__
        depth -= 1
    return None


__all__ = ["config_error_in", "evaluate_store", "map_shards"]
