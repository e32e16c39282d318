"""A training config's text corpus read in this process (no Ray): documents, split into
training and held-out documents (``codebook.data.heldout``), tokenised and packed into blocks
as the Ray pipeline packs them (``pack_batch``, 256 documents at a time)."""

from __future__ import annotations

from typing import Any

import numpy as np

from codebook.data.text import pack_batch
from codebook.errors import ConfigError

PACK_DOCUMENTS = 256  # documents per pack_batch call (as codebook.ray_glue.data packs them)


def read_corpus(data: Any) -> list[str]:
    """Every document of a ``DataSection`` (text, parquet or hf source), in corpus order;
    empty documents dropped."""
    from codebook.corpus import Corpus, describe_corpus, read_documents

    if data.source == "fsm":
        raise ConfigError("data.source", "the FSM source has no text documents",
                          "use codebook.training.local.fsm_loop_data for the FSM")
    corpus = Corpus(source=data.source, paths=list(data.paths), text_column=data.text_column,
                    hf_dataset=data.hf_dataset, hf_config=data.hf_config,
                    hf_split=data.hf_split, hf_data_files=data.hf_data_files)
    source = describe_corpus(corpus)
    texts = read_documents(source, 0, source["num_documents"])
    return [str(t) for t in texts if str(t).strip()]


def pack_documents(texts: list[str], tokenizer: Any, block_size: int) -> np.ndarray:
    """(n, block_size) int32 blocks of ``texts``, packed ``PACK_DOCUMENTS`` at a time."""
    parts = [np.zeros((0, block_size), dtype=np.int32)]
    for start in range(0, len(texts), PACK_DOCUMENTS):
        parts.append(pack_batch(texts[start:start + PACK_DOCUMENTS], tokenizer, block_size))
    return np.concatenate(parts)


def split_blocks(data: Any, tokenizer: Any, train: bool = True
                 ) -> tuple[np.ndarray | None, np.ndarray]:
    """(train, held-out) blocks of a ``DataSection``'s corpus. With ``heldout_fraction`` the
    held-out blocks are every block of the held-out documents; without, the first
    ``eval_blocks`` blocks (as the Ray pipeline splits). ``train=False`` packs only the
    held-out documents (train blocks: None)."""
    from codebook.data.heldout import split_documents

    texts = read_corpus(data)
    if data.heldout_fraction:
        kept, held = split_documents(texts, data.heldout_fraction, data.heldout_seed)
        heldout = pack_documents([texts[i] for i in held], tokenizer, data.block_size)
        if not len(heldout):
            raise ConfigError("data.heldout_fraction", f"the held-out share "
                              f"{data.heldout_fraction} of the corpus holds no whole block",
                              "raise it, or add documents")
        if not train:
            return None, heldout
        blocks = pack_documents([texts[i] for i in kept], tokenizer, data.block_size)
        return blocks[: data.max_blocks] if data.max_blocks else blocks, heldout
    blocks = pack_documents(texts, tokenizer, data.block_size)
    if data.max_blocks:
        blocks = blocks[: data.max_blocks + data.eval_blocks]
    return blocks[data.eval_blocks:], blocks[: data.eval_blocks]


def sample_blocks(blocks: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Up to ``n`` of ``blocks``, drawn without replacement by a seeded permutation (all of
    them, in that order, when there are fewer)."""
    order = np.random.default_rng(seed).permutation(len(blocks))[:n]
    return blocks[np.sort(order)]
