"""``data.source: hf``: Hugging Face ``datasets`` corpora, offline, through the real pipeline.

The corpus is a local folder of Parquet files read by ``datasets.load_dataset`` with the hub
switched off (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) and host-name lookups refused, so nothing
here touches the network.
"""

from __future__ import annotations

import ipaddress
import json
import math
import socket
import sys
from pathlib import Path

import pytest
from text_helpers import lines, text_config

from codebook.errors import ConfigError
from codebook.training.loop import HF_DIR, STATE_FILE


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from codebook.ray_glue.session import init_local

    init_local(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Hub off, a fresh datasets cache, and any look-up of a remote host name an error."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    import datasets
    import huggingface_hub.constants

    # Both read the environment at import, which may have happened earlier in this session.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    lookups: list[str] = []
    real = socket.getaddrinfo
    local = {None, "", "localhost", socket.gethostname()}

    def guarded(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        try:
            ipaddress.ip_address(name)  # a numeric address: no look-up (Ray's own sockets)
        except (TypeError, ValueError):
            if name not in local:
                lookups.append(name)
                raise OSError(f"network use in an offline test: {name}") from None
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    yield
    assert lookups == [], f"looked up remote hosts: {lookups}"  # even if a library swallowed it


def write_corpus(folder: Path) -> Path:
    """Two Parquet files of documents (plus one blank, which the source drops)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    docs = ["\n".join(lines(120)[i::10]) for i in range(10)]
    for part, rows in enumerate((docs[:5] + [""], docs[5:])):
        pq.write_table(pa.table({"text": rows, "id": list(range(len(rows)))}),
                       folder / f"part-{part}.parquet")
    return folder


def hf_config(tmp_path: Path, tok_dir: str, tokenizer, name: str = "hf", **data):
    return text_config(tmp_path, tok_dir, tokenizer, name, **{"data.source": "hf", **data})


# ---------------------------------------------------------------------- real runs
@pytest.mark.slow
def test_train_on_a_local_hf_dataset_folder(local_ray, offline, tmp_path, tok_dir, tokenizer):
    from codebook.ray_glue.train import fit

    corpus = write_corpus(tmp_path / "corpus")
    summary = fit(hf_config(tmp_path, tok_dir, tokenizer, **{"data.hf_dataset": str(corpus)}))
    assert summary["steps"] == 4
    assert math.isfinite(summary["final_train_loss"]) and math.isfinite(summary["final_eval_loss"])
    ckpt = Path(summary["checkpoint"])
    assert json.loads((ckpt / STATE_FILE).read_text())["step"] == 4
    assert (ckpt / HF_DIR / "config.json").is_file()


def test_builder_with_relative_data_files_reads_the_same_rows(
        local_ray, offline, tmp_path, tok_dir, tokenizer, monkeypatch):
    """``parquet`` + data files relative to the cwd == the folder itself, row for row."""
    from codebook.ray_glue.data import hf_dataset

    write_corpus(tmp_path / "corpus")
    monkeypatch.chdir(tmp_path)  # Ray Data tasks do not share the cwd: paths go absolute
    by_folder = hf_dataset(hf_config(tmp_path, tok_dir, tokenizer,
                                      **{"data.hf_dataset": "corpus"}))
    by_files = hf_dataset(hf_config(tmp_path, tok_dir, tokenizer, **{
        "data.hf_dataset": "parquet", "data.hf_data_files": "[corpus/part-*.parquet]"}))
    rows = by_folder.take_all()
    assert rows == by_files.take_all() and len(rows) == 11
    assert list(rows[0]) == ["text"]  # only the text column goes to Ray Data


def test_extraction_reads_what_training_reads_with_data_files(offline, tmp_path, monkeypatch):
    """Extraction loads an ``hf`` corpus with the training reader (``codebook.data.hf``), data
    files included: a builder plus files relative to the cwd describes and reads the same
    documents, in order, from any working directory (Ray actors may run elsewhere)."""
    import pyarrow.parquet as pq

    from codebook.corpus import Corpus, describe_corpus, read_documents

    corpus = write_corpus(tmp_path / "corpus")
    rows = [t for f in sorted(corpus.glob("*.parquet"))
            for t in pq.read_table(f)["text"].to_pylist()]
    monkeypatch.chdir(tmp_path)
    source = describe_corpus(Corpus(source="hf", hf_dataset="parquet",
                                    hf_data_files=["corpus/part-*.parquet"]))
    assert source["data_files"] == [str(corpus / "part-*.parquet")]
    assert source["num_documents"] == len(rows) == 11
    monkeypatch.chdir(corpus)
    assert read_documents(source, 0, 11) == rows
    with pytest.raises(ConfigError, match="part-9.parquet does not exist") as err:
        describe_corpus(Corpus(source="hf", hf_dataset="parquet",
                               hf_data_files=[str(corpus / "part-9.parquet")]))
    assert err.value.field == "--hf-data-files"  # the extraction command's own option


# ---------------------------------------------------------------------- errors, before training
@pytest.mark.parametrize("missing", ["no-such-org/no-such-dataset", "{tmp}/no-such-folder"])
def test_missing_dataset_is_a_config_error_before_training(
        local_ray, offline, tmp_path, tok_dir, tokenizer, missing):
    from codebook.ray_glue.train import fit

    cfg = hf_config(tmp_path, tok_dir, tokenizer,
                    **{"data.hf_dataset": missing.format(tmp=tmp_path)})
    with pytest.raises(ConfigError, match="cannot load .*no-such") as err:
        fit(cfg)
    assert err.value.field == "data.hf_dataset"
    assert not cfg.run_dir.exists()  # no MLflow run, no workers, no checkpoints


def test_wrong_text_column_names_the_columns(offline, tmp_path, tok_dir, tokenizer):
    from codebook.ray_glue.data import text_datasets

    corpus = write_corpus(tmp_path / "corpus")
    cfg = hf_config(tmp_path, tok_dir, tokenizer,
                    **{"data.hf_dataset": str(corpus), "data.text_column": "body"})
    with pytest.raises(ConfigError, match=r"'body' is not a column .*\['text', 'id'\]") as err:
        text_datasets(cfg)
    assert err.value.field == "data.text_column"


def test_wrong_split_and_missing_data_file(offline, tmp_path, tok_dir, tokenizer):
    from codebook.ray_glue.data import text_datasets

    corpus = write_corpus(tmp_path / "corpus")
    cfg = hf_config(tmp_path, tok_dir, tokenizer,
                    **{"data.hf_dataset": str(corpus), "data.hf_split": "validation"})
    with pytest.raises(ConfigError, match="Unknown split") as err:
        text_datasets(cfg)
    assert err.value.field == "data.hf_split"
    cfg = hf_config(tmp_path, tok_dir, tokenizer, **{
        "data.hf_dataset": "parquet", "data.hf_data_files": f"[{corpus}/part-9.parquet]"})
    with pytest.raises(ConfigError, match="part-9.parquet does not exist") as err:
        text_datasets(cfg)
    assert err.value.field == "data.hf_data_files"


def test_without_the_datasets_package(tmp_path, tok_dir, tokenizer, monkeypatch):
    from codebook.ray_glue.data import text_datasets

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    cfg = hf_config(tmp_path, tok_dir, tokenizer, **{"data.hf_dataset": "wikitext"})
    with pytest.raises(ConfigError, match=r"pip install -e \.\[hf\]") as err:
        text_datasets(cfg)
    assert err.value.field == "data.source"


def test_hf_data_files_only_with_source_hf(tmp_path, tok_dir, tokenizer):
    with pytest.raises(ConfigError, match="only used by source 'hf'") as err:
        text_config(tmp_path, tok_dir, tokenizer, "x", **{
            "data.source": "parquet", "data.paths": f"[{tmp_path}]",
            "data.hf_data_files": "[a.parquet]"})
    assert err.value.field == "data.hf_data_files"
