"""A small local text corpus, a byte-level BPE trained on it, and a tiny saved codebook model."""

from __future__ import annotations

import random
from pathlib import Path

import torch

MONTHS = "January February March April May June July August September October November December"
WORDS = ("the king went to Boston with Bob and Bella over square feet of land , . ! ? ; : "
         "( ) dragon fire castle river")


def make_corpus(folder: Path, n_docs: int = 24, seed: int = 0) -> list[str]:
    """``n_docs`` text files of months, years, digits, names and punctuation; returns texts."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    docs = []
    for i in range(n_docs):
        words = []
        for _ in range(rng.randint(20, 90)):
            r = rng.random()
            if r < 0.1:
                words.append(rng.choice(MONTHS.split()))
            elif r < 0.2:
                words.append(str(rng.choice([1900 + rng.randint(0, 99), 2000 + rng.randint(0, 30),
                                             rng.randint(0, 9)])))
            else:
                words.append(rng.choice([*WORDS.split(), "square feet", "\"quoted\""]))
        docs.append(" ".join(words))
        (folder / f"doc{i:03d}.txt").write_text(docs[-1])
    return docs


def save_bpe_tokenizer(texts: list[str], path: Path, vocab_size: int = 400):
    """A lossless byte-level BPE with an ``<eos>`` token, saved as a HF tokenizer folder."""
    from codebook.data.text import train_bpe_tokenizer

    hf_tok = train_bpe_tokenizer(texts, vocab_size, eos="<eos>")
    hf_tok.save_pretrained(str(path))
    return hf_tok


def save_tiny_codebook_model(path: Path, vocab_size: int, num_codes: int = 300, k: int = 2,
                             seed: int = 0):
    """A 2-layer d32 GPT-NeoX with attention-head and MLP codebooks, saved to ``path``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from codebook import CodebookConfig, CodebookModel

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("gpt_neox", vocab_size=vocab_size, hidden_size=32,
                               num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=256)
    model = CodebookModel(AutoModelForCausalLM.from_config(cfg),
                          CodebookConfig(sites=["attn_heads", "mlp"], num_codes=num_codes, k=k))
    model.save_pretrained(path)
    return model.eval()


def build_store(model_dir: Path, corpus: Path, out: Path, *extra: str):
    """A complete code store made in this process (no Ray): the pipeline's own prepare step,
    then every shard through the library's extraction functions."""
    from codebook.data.text import load_tokenizer
    from codebook.extraction import extract_to_store, load_extraction_model, shard_windows
    from pipelines.extract import parse_args, prepare

    args = parse_args(["--model", str(model_dir), "--source", "text", "--paths", str(corpus),
                       "--out", str(out), "--block-size", "64", "--docs-per-shard", "6", *extra])
    store, model_path, pending = prepare(args)
    model = load_extraction_model(model_path)
    tokenizer = load_tokenizer(store.meta.tokenizer)
    for shard in pending:
        windows = shard_windows(store.meta.source, shard, tokenizer, store.meta.block_size)
        extract_to_store(model, store, shard["shard"], windows)
    store.finalize_stats()
    return store
