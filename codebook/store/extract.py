"""Codes of a model written into a code store, without Ray: one shard's windows through the
model (``codebook.extraction.extract_windows``) into a token table and the store's shard files.

``extract_shards`` runs every shard in this process; ``codebook.ray_glue.extract`` runs
``extract_to_store`` in Ray Data actors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from codebook.extraction import extract_windows, shard_windows
from codebook.store.format import token_table


def extract_to_store(model: Any, store: Any, shard: int, windows: dict[str, np.ndarray],
                     batch_size: int = 8, device: torch.device | str = "cpu") -> int:
    """Run the model over one shard's windows and write the shard; returns its token count."""
    meta = store.meta
    res = extract_windows(model, windows, list(meta.sites), meta.activation_sites, batch_size,
                          device, meta.score_sites)
    table = token_table(res["doc_id"], res["position"], res["token_id"], res["codes"], meta,
                        res["acts"], res["scores"])
    store.write_shard(shard, table)
    return table.num_rows


def extract_shards(model: Any, store: Any, shards: list[dict[str, int]], tokenizer: Any,
                   batch_size: int = 8, device: torch.device | str = "cpu",
                   progress: bool | None = None) -> Iterator[tuple[int, int]]:
    """Every shard of ``shards`` in turn through :func:`shard_windows` and
    :func:`extract_to_store`, yielding ``(shard, tokens)`` as each is written. A progress bar
    goes to stderr (``progress=None``: only on a terminal)."""
    meta = store.meta
    bar = tqdm(shards, desc="extract", unit="shard", disable=None if progress is None
               else not progress)
    for shard in bar:
        windows = shard_windows(meta.source, shard, tokenizer, meta.block_size)
        tokens = extract_to_store(model, store, shard["shard"], windows, batch_size, device)
        bar.set_postfix(tokens=tokens)
        yield shard["shard"], tokens
