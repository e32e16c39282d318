"""The training corpus as Ray Data: read (text, Parquet, Hugging Face), tokenise and pack into
blocks on the driver's dataset, and the batches each Ray Train worker reads from its shard."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from codebook.errors import ConfigError
from codebook.training.config import TrainConfig
from codebook.training.loop import LoopData, Workers


# ---------------------------------------------------------------------- worker side
def block_batches(shard: Any, batch_size: int, shuffle_buffer: int, seed: int,
                  start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless training batches from a Ray Data iterator, epoch after epoch, skipping the
    first ``start`` (what a resumed run already consumed).

    With ``shuffle_buffer`` > 0 each epoch goes through a local shuffle buffer seeded by
    ``seed`` and the epoch number, so a resume replays the same order; 0 keeps corpus order.
    """
    seen, epoch = 0, 0
    while True:  # every rank sees the same number of batches (equal split)
        kwargs = {"local_shuffle_buffer_size": shuffle_buffer,
                  "local_shuffle_seed": seed + 1000 * epoch} if shuffle_buffer else {}
        for b in shard.iter_torch_batches(batch_size=batch_size, dtypes=torch.long,
                                          drop_last=True, **kwargs):
            seen += 1
            if seen > start:
                yield {"input_ids": b["input_ids"]}
        epoch += 1


def worker_loop_data(cfg: TrainConfig, workers: Workers) -> LoopData:
    """This worker's data: its shards of the ``train`` / ``eval`` datasets, or the FSM stream."""
    bs = cfg.optim.batch_size
    if cfg.data.source == "fsm":
        from codebook.training.local import fsm_loop_data

        return fsm_loop_data(cfg, workers)
    import ray.train

    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval")

    def train_batches(start: int) -> Iterator[dict[str, torch.Tensor]]:
        return block_batches(train_shard, bs, cfg.data.shuffle_buffer,
                             cfg.run.seed + workers.rank, start)

    def eval_batches() -> Iterable[dict[str, torch.Tensor]]:
        for b in eval_shard.iter_torch_batches(batch_size=bs, dtypes=torch.long):
            yield {"input_ids": b["input_ids"]}

    return LoopData(train=train_batches, eval=eval_batches)


# ---------------------------------------------------------------------- driver side
def text_datasets(cfg: TrainConfig) -> dict[str, Any]:
    """Ray Data: read, tokenise and pack the corpus into blocks; split off held-out blocks."""
    import ray.data

    from codebook.data.text import expand_paths

    d = cfg.data
    tokenizer = cfg.model.tokenizer or cfg.model.name_or_path
    # A fixed order keeps the held-out split the same across runs and resumes.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    column = d.text_column if d.source != "text" else "text"
    if d.source == "parquet":
        ds = ray.data.read_parquet(expand_paths(d.paths, (".parquet",))).select_columns(
            [d.text_column])
    elif d.source == "text":  # one document per file
        files = expand_paths(d.paths, (".txt", ".md", ".text"))
        ds = ray.data.read_binary_files(files).map(_file_to_document)
    else:
        ds = hf_dataset(cfg)
        ds = ds.filter(lambda row: bool(str(row[column]).strip()))  # WikiText: blank lines

    def pack(documents: Any) -> Any:
        return documents.map_batches(
            _Packer, fn_constructor_kwargs={"tokenizer": tokenizer, "block_size": d.block_size,
                                            "column": column},
            batch_format="pandas", batch_size=256,
            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5,
        )

    if d.heldout_fraction:  # whole documents held out (codebook.data.heldout)
        from codebook.data.heldout import is_heldout

        frac, seed = d.heldout_fraction, d.heldout_seed
        # Materialised here, as split_at_indices does below: packed inside the trainer, the
        # read tasks would wait for CPUs its workers and packers hold.
        eval_ds = pack(ds.filter(lambda row: is_heldout(str(row[column]), frac, seed)))
        eval_ds = eval_ds.limit(d.eval_blocks).materialize()
        train_ds = pack(ds.filter(lambda row: not is_heldout(str(row[column]), frac, seed)))
        train_ds = (train_ds.limit(d.max_blocks) if d.max_blocks else train_ds).materialize()
        if eval_ds.count() == 0:
            raise ConfigError("data.heldout_fraction", f"the held-out share {frac} of the "
                              "corpus holds no whole block", "raise it, or add documents")
    else:
        ds = pack(ds)
        if d.max_blocks:
            ds = ds.limit(d.max_blocks + d.eval_blocks)
        eval_ds, train_ds = ds.split_at_indices([d.eval_blocks])
    need = cfg.optim.batch_size * cfg.run.num_workers
    if train_ds.count() < need:
        where = "data.hf_dataset" if d.source == "hf" else "data.paths"
        raise ConfigError(where, f"the corpus gives fewer than {need} training blocks "
                          f"after the {d.eval_blocks} held-out ones (one batch per worker)",
                          "add text, or lower data.eval_blocks / optim.batch_size")
    return {"train": train_ds, "eval": eval_ds}


def hf_dataset(cfg: TrainConfig) -> Any:
    """``datasets.load_dataset`` on the driver (``codebook.data.hf``, the reader extraction
    uses too), its text column handed to Ray Data."""
    import ray.data

    from codebook.data.hf import load_hf_split

    d = cfg.data
    hf = load_hf_split(d.hf_dataset, d.hf_config, d.hf_split, d.hf_data_files, d.text_column)
    # Not ray.data.from_huggingface: for a dataset that is not transformed it reloads it and
    # asks huggingface.co for Parquet URLs (a network call, even for local folders and with
    # HF_DATASETS_OFFLINE=1). The text column as Arrow is what from_huggingface falls back to.
    table = hf.select_columns([d.text_column]).with_format("arrow")[:]
    rows = 50_000  # several blocks for a large corpus, so tokenising streams
    return ray.data.from_arrow([table.slice(i, rows) for i in range(0, max(len(table), 1), rows)])


def _file_to_document(row: dict[str, Any]) -> dict[str, str]:
    return {"text": row["bytes"].decode("utf-8", errors="replace")}


class _Packer:
    """A Ray Data actor: tokenise a batch of documents and pack it into ``block_size`` blocks."""

    def __init__(self, tokenizer: str, block_size: int, column: str):
        from codebook.data.text import load_tokenizer

        self.tokenizer, self.block_size, self.column = load_tokenizer(tokenizer), block_size, column

    def __call__(self, batch: Any) -> Any:
        import pandas as pd

        from codebook.data.text import pack_batch

        blocks = pack_batch(batch[self.column].astype(str).tolist(), self.tokenizer,
                            self.block_size)
        return pd.DataFrame({"input_ids": list(blocks)})
