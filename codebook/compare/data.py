"""The comparison's data, fixed before any training: the evaluation set every method is scored
on and the sequences the activation cache is collected from, never the same documents.

FSM: the fixed evaluation sequences (``TokFSM.eval_set``, which training excludes by hash) and
fresh training-distribution sequences for the cache, evaluation sequences removed. Text: the
documents the training config holds out (``data.heldout_fraction``, ``codebook.data.heldout``:
the end-to-end codebook model never trains on them) give the evaluation blocks; the other
documents give the cache. ``split`` records which documents went where.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codebook.errors import ConfigError


@dataclass
class CompareData:
    task: str  # "fsm" or "text"
    eval: Any  # FSM: (n, seq) token tensor; text: TextBlocks
    cache_tokens: np.ndarray  # (n, seq) the cache's sequences
    fsm: Any = None
    tokenizer: Any = None
    split: dict[str, Any] = field(default_factory=dict)

    @property
    def eval_units(self) -> int:
        return int(self.eval.shape[0] if self.task == "fsm" else len(self.eval.ids))

    def eval_batches(self, batch: int = 32) -> list[torch.Tensor]:
        ids = self.eval if self.task == "fsm" else torch.as_tensor(self.eval.ids)
        return [ids[i: i + batch].long() for i in range(0, ids.shape[0], batch)]


def comparison_data(cfg: Any, train: Any, base_path: str, base_gguf: str | None
                    ) -> CompareData:
    """The evaluation set and the cache's sequences (module docstring)."""
    rng = np.random.default_rng([cfg.analysis.seed, 7])
    if train.data.source == "fsm":
        from codebook.data.fsm import TokFSM, row_hashes

        fsm = TokFSM(train.data.fsm)
        eval_tokens = fsm.eval_set(cfg.analysis.eval_sequences)
        held = set(row_hashes(eval_tokens))
        cache = fsm.sample_tokens(cfg.cache.sequences, rng)
        fresh = np.asarray([h not in held for h in row_hashes(cache)])
        return CompareData("fsm", torch.from_numpy(eval_tokens), cache[fresh], fsm=fsm,
                           split={"eval_sequences": int(len(eval_tokens)),
                                  "cache_sequences": int(fresh.sum()),
                                  "cache_dropped_as_eval": int((~fresh).sum())})
    return _text_data(cfg, train, base_path, base_gguf, rng)


def _text_data(cfg: Any, train: Any, base_path: str, base_gguf: str | None,
               rng: np.random.Generator) -> CompareData:
    from codebook.analysis.features import load_features
    from codebook.compare.text import text_blocks
    from codebook.corpus import Corpus, describe_corpus, read_documents
    from codebook.data.heldout import is_heldout
    from codebook.data.text import load_tokenizer

    d = train.data
    source = describe_corpus(Corpus(source="text", paths=d.paths))
    if not source["num_documents"]:
        raise ConfigError("data.paths", f"no .txt/.md files under {d.paths}",
                          "point data.paths at text files")
    texts = read_documents(source, 0, source["num_documents"])
    tokenizer = load_tokenizer(train.model.tokenizer or base_path, base_gguf)
    blocks = text_blocks(tokenizer, texts, cfg.block_size, load_features(cfg.features))
    held_doc = np.asarray([is_heldout(t, d.heldout_fraction, d.heldout_seed) for t in texts])
    held = held_doc[blocks.docs]
    eval_rows = np.flatnonzero(held)
    eval_rows = np.sort(rng.permutation(eval_rows)[: cfg.analysis.eval_sequences])
    cache_rows = rng.permutation(np.flatnonzero(~held))[: cfg.cache.sequences]
    if len(eval_rows) == 0 or len(cache_rows) == 0:
        raise ConfigError("data.heldout_fraction", f"the split leaves {len(eval_rows)} "
                          f"evaluation and {len(cache_rows)} cache blocks",
                          "change the held-out share, or add documents")
    names = [Path(f).name for f in source["files"]]
    split = {"heldout_fraction": d.heldout_fraction, "heldout_seed": d.heldout_seed,
             "eval_documents": sorted({names[i] for i in blocks.docs[eval_rows]}),
             "cache_documents": sorted({names[i] for i in blocks.docs[cache_rows]}),
             "eval_blocks": int(len(eval_rows)), "cache_blocks": int(len(cache_rows))}
    return CompareData("text", blocks.take(eval_rows), blocks.ids[cache_rows],
                       tokenizer=tokenizer, split=split)
