"""Batch sources for the training loop that need no Ray: the TokFSM stream and in-memory blocks.

Each rank takes its own slice of a global batch that is fixed by (seed, micro-batch index), so a
resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from codebook.data.fsm import TokFSM

Batch = dict[str, torch.Tensor]


def fsm_train_batches(fsm: TokFSM, batch_size: int, seed: int, start: int, rank: int,
                      world_size: int, eval_size: int) -> Iterator[Batch]:
    """Infinite micro-batches from micro-batch ``start``; never a sequence of the eval set."""
    exclude = fsm.eval_hashes(eval_size)
    micro = start
    while True:
        tokens = fsm.train_batch(micro, batch_size * world_size, seed=seed, exclude=exclude)
        yield {"input_ids": torch.from_numpy(np.ascontiguousarray(tokens[rank::world_size]))}
        micro += 1


def fsm_eval_batches(fsm: TokFSM, eval_size: int, batch_size: int, rank: int,
                     world_size: int) -> Iterable[Batch]:
    """This rank's share of the fixed held-out set, in batches."""
    tokens = fsm.eval_set(eval_size)[rank::world_size]
    return [{"input_ids": torch.from_numpy(np.ascontiguousarray(chunk))}
            for chunk in np.array_split(tokens, max(1, -(-len(tokens) // batch_size)))
            if len(chunk)]
