"""Shared fixtures: tiny random-initialised models of every site preset (no downloads)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# MLflow 3 sends usage telemetry from a background thread: offline tests must not look up its
# host (tests/test_hf_datasets_source.py fails on any remote host look-up). Child processes
# and local Ray workers inherit it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# One ninja for every process. DeepSpeed JIT-builds its CPU shared-memory op with whichever
# `ninja` is first on PATH: the venv's (pip, 1.13) under an activated venv or a Ray worker, the
# system's (1.11) for `.venv/bin/python -m pytest`. Ninja 1.12 changed how its log hashes a
# command, so each switch reads as a changed command and rebuilds the op (35-75 s on both
# cores; 4 rebuilds in one full run here). The venv's bin folder goes first for the suite and
# everything it starts.
_BIN = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = os.pathsep.join(filter(None, [_BIN, os.environ.get("PATH")]))
# Ray Train polls its workers every 2 s: each report after the first, and the end of every
# fit, waits up to that long. The suite's ~40 tiny fits poll every 0.25 s instead, and start no
# preemption watcher (one more actor process per fit, for spot nodes a test never has). Both are
# read when fit() is called and passed on to the controller and workers.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# The suite runs on two pytest-xdist workers (pyproject: ``-n 2 --dist loadgroup``): each
# file stays whole on one worker, in order (module fixtures built once, Ray-fixture tests
# before the tests that stop Ray); files that start a Ray head with `cluster/local_head.sh`
# share one group, so no two heads start at once. ``-n 0`` runs everything in one process.
SHARED_GROUPS = {"test_cluster_security.py": "ray_head", "test_job_submit.py": "ray_head"}
# xdist hands the groups out in collection order, so a long file collected last leaves the other
# worker idle at the end (test_train_pipeline.py, the longest, sorts near the end). The longest
# files go first instead (longest-first scheduling); every other file keeps its place. Seconds
# per file as measured in a full run on 2 cores (2026-12-04); stale figures only cost balance.
FILE_SECONDS = {
    "test_train_pipeline.py": 530, "test_lm_table.py": 346, "test_compare.py": 329,
    "test_sweep.py": 264, "test_fsm_pipeline.py": 191, "test_extract_evaluate.py": 188,
    "test_text_data.py": 168, "test_job_submit.py": 146, "test_train_overhead_smoke.py": 136,
    "test_damaged_inputs.py": 116,
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """One xdist group per test file (or per SHARED_GROUPS entry); the longest files first."""
    for item in items:
        group = SHARED_GROUPS.get(item.path.name, item.path.stem)
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable


VOCAB = 64
TINY_CONFIGS: dict[str, dict] = {
    "gpt_neox": dict(model_type="gpt_neox", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64),
    "gpt2": dict(model_type="gpt2", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                 n_positions=64, bos_token_id=0, eos_token_id=0),
    "gpt_neo": dict(model_type="gpt_neo", vocab_size=VOCAB, hidden_size=32, num_layers=2,
                    num_heads=4, attention_types=[[["global", "local"], 1]],
                    max_position_embeddings=64, window_size=16, bos_token_id=0, eos_token_id=0),
    "llama": dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                  max_position_embeddings=64),
    # One per further preset of codebook.sites.PRESETS; special tokens inside the tiny vocab.
    # Qwen 3 and Gemma: 4 heads x head_dim 16 = 64, twice hidden_size (attn_heads is 64 wide).
    **{mt: dict(model_type=mt, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                **extra)
       for mt, extra in [("mistral", {}), ("qwen2", {}), ("qwen3", dict(head_dim=16)),
                         ("phi3", {}), ("gemma2", dict(head_dim=16)),
                         ("gemma3_text", dict(head_dim=16))]},
}
# Gemma 3 with its vision tower (model_type gemma3): the text model's settings in text_config.
TINY_CONFIGS["gemma3"] = dict(
    model_type="gemma3", text_config={k: v for k, v in TINY_CONFIGS["gemma3_text"].items()
                                      if k != "model_type"},
    vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, image_size=16, patch_size=8),
    mm_tokens_per_image=4, image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3,
    eoi_token_index=VOCAB - 2)
FAMILIES = list(TINY_CONFIGS)


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random-initialised causal LM of ``family`` in eval mode."""
    torch.manual_seed(seed)
    kwargs = dict(TINY_CONFIGS[family])
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> str:
    """A tiny byte-level BPE with an EOS token, saved as a HF tokenizer folder."""
    from text_helpers import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    from codebook.data.text import load_tokenizer

    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def browser():
    """A headless Debian Chromium under Selenium, one per test module."""
    from codebook.browser.serve import chromium

    drv = chromium()
    yield drv
    drv.quit()
