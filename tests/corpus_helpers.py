"""A small local text corpus, a byte-level BPE trained on it, a tiny saved codebook model, and
the in-memory classifier the shard-wise evaluation must match."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
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


def build_store(model_dir: Path, corpus: Path, out: Path, **options):
    """A complete code store made in this process (no Ray): the pipeline's own prepare step,
    then every shard through the library's extraction functions."""
    from codebook.data.text import load_tokenizer
    from codebook.ray_glue.extract import ExtractOptions, prepare
    from codebook.resolve import load_trained_model
    from codebook.store.extract import extract_shards

    opts = ExtractOptions(model=str(model_dir), out=str(out), source="text",
                          paths=[str(corpus)], block_size=64, docs_per_shard=6, **options)
    store, model_path, pending = prepare(opts)
    model = load_trained_model(model_path)
    tokenizer = load_tokenizer(store.meta.tokenizer)
    for _ in extract_shards(model, store, pending, tokenizer):
        pass
    store.finalize_stats()
    return store


def text_model_store(root: Path, n_docs: int = 12, **options):
    """A corpus, its BPE tokenizer, a tiny codebook model carrying it and its code store under
    ``root`` (``options`` go to the extraction, e.g. ``scores=True``); returns the store."""
    texts = make_corpus(root / "corpus", n_docs=n_docs)
    tok = save_bpe_tokenizer(texts, root / "tok")
    save_tiny_codebook_model(root / "model", len(tok))
    tok.save_pretrained(str(root / "model"))
    return build_store(root / "model", root / "corpus", root / "store", **options)


def wait_for(fn, timeout: float = 20.0):
    """Poll ``fn`` until it returns something truthy (a page element, a condition)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting for the page")


def in_memory_classifier(codes: np.ndarray, acts: np.ndarray, labels: np.ndarray, num_codes: int,
                         num_labels: int, min_recall: float) -> dict[str, np.ndarray]:
    """Codes vs neurons on all rows at once: per label, the best code by precision at recall
    >= ``min_recall`` and the best neuron's precision at that code's recall."""
    from codebook.analysis.classifiers import best_code_per_label, code_feature_stats
    from codebook.analysis.neurons import best_neurons_at_recall

    stats = code_feature_stats(codes, labels, num_codes, num_labels)
    code, code_p, code_r = best_code_per_label(stats, min_recall=min_recall)
    neurons = best_neurons_at_recall(acts, labels, code_r)
    return {"code": code, "code_precision": code_p, "code_recall": code_r,
            "neuron_precision": neurons["precision"]}
