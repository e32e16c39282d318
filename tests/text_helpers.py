"""Text-corpus test helpers: a tiny local tokenizer, a corpus of lines, a short training run.

Everything is local: the tokenizer is a byte-level BPE trained here on a few sentences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corpus_helpers import save_bpe_tokenizer
from train_helpers import FSM_CONFIG, tiny_overrides

EOS = "<eos>"
TEXTS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles\nAnd by opposing end them.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "All the world's a stage, and all the men and women merely players.",
]


def build_tokenizer(path: Path) -> str:
    """A byte-level BPE (lossless round trip) with an EOS token, saved as a HF tokenizer."""
    save_bpe_tokenizer(TEXTS * 4, path, vocab_size=320)
    return str(path)


def lines(n: int) -> list[str]:
    return [f"{TEXTS[i % len(TEXTS)]} ({i})" for i in range(n)]


def text_config(storage: Path, tok_dir: str, tokenizer: Any, name: str, **data: Any):
    """configs/fsm.yaml shrunk (tiny_overrides) to 4 steps on a text corpus; ``data`` adds
    ``--set`` overrides (``data.source``, ``data.paths``, ...)."""
    from codebook.training.config import load_config

    overrides = tiny_overrides(storage, name, **{
        "model.tokenizer": tok_dir,
        "model.from_config.vocab_size": len(tokenizer),
        "model.from_config.bos_token_id": tokenizer.eos_token_id,
        "model.from_config.eos_token_id": tokenizer.eos_token_id,
        "data.block_size": 16,
        "data.eval_blocks": 4,
        "run.max_steps": 4,
        "deepspeed.enabled": False,
        **data,
    })
    return load_config(FSM_CONFIG, overrides)
