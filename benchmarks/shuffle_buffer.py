"""Cost of shuffling the training blocks: one epoch through ``block_batches`` with the local
shuffle buffer (``data.shuffle_buffer``) vs in corpus order, same dataset, same process.

The dataset is ``--blocks`` random token blocks of ``--block-size`` in a Ray Data dataset
(materialised first, so both passes read the same blocks from the object store). Prints one JSON
line: ``ordered_blocks_per_s``, ``shuffled_blocks_per_s``, ``ratio`` (shuffled / ordered) and
``training_blocks_per_s_text_steer`` for scale: what ``configs/text_steer.yaml`` consumes on 2
CPU cores (about 5,000 tokens/s = 20 blocks of 256 tokens/s), so the data side stays far from
the bottleneck as long as both rates are much higher.

    python benchmarks/shuffle_buffer.py [--blocks 20000] [--buffer 16384]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codebook.ray_glue.data import block_batches  # noqa: E402
from codebook.ray_glue.session import ray_session  # noqa: E402


def epoch_rate(ds, batch_size: int, buffer: int, n_batches: int) -> float:
    """Blocks per second over one epoch (``n_batches`` batches)."""
    batches = block_batches(ds.iterator(), batch_size, buffer, seed=0)
    start = time.perf_counter()
    for _ in range(n_batches):
        next(batches)
    return n_batches * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=20000)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--buffer", type=int, default=16384)
    args = p.parse_args(argv)
    import ray.data

    with ray_session(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False):
        rng = np.random.default_rng(0)
        blocks = rng.integers(0, 8192, (args.blocks, args.block_size), dtype=np.int32)
        ds = ray.data.from_numpy(blocks).rename_columns({"data": "input_ids"}).materialize()
        n = args.blocks // args.batch_size
        epoch_rate(ds, args.batch_size, 0, min(n, 50))  # warm-up
        ordered = epoch_rate(ds, args.batch_size, 0, n)
        shuffled = epoch_rate(ds, args.batch_size, args.buffer, n)
    print(json.dumps({"blocks": args.blocks, "block_size": args.block_size,
                      "buffer": args.buffer, "ordered_blocks_per_s": round(ordered, 1),
                      "shuffled_blocks_per_s": round(shuffled, 1),
                      "ratio": round(shuffled / ordered, 3),
                      "training_blocks_per_s_text_steer": round(5000 / 256, 1)}))


if __name__ == "__main__":
    main()
