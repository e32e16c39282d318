"""Code store tables, regex features and the shard-wise evaluation maths (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from codebook.analysis.features import RegexFeature, load_features, regex_token_labels
from codebook.errors import ConfigError
from codebook.extraction import plan_shards, tokenise_documents
from codebook.store import SiteInfo, StoreMeta, code_dtype, list_to_numpy, token_table
from codebook.store.evaluate import (
    above_counts,
    best_code_rows,
    count_partials,
    merge_partials,
    neuron_rows,
    neuron_thresholds,
)


def test_code_dtype_is_the_smallest_unsigned_type():
    assert code_dtype(256) == np.uint8 and code_dtype(257) == np.uint16
    assert code_dtype(65536) == np.uint16 and code_dtype(65537) == np.uint32


def meta(num_codes: int = 10, groups: int = 2, k: int = 2, dim: int = 6) -> StoreMeta:
    return StoreMeta(model="m", tokenizer=None, source={"kind": "fsm"},
                     sites={"s": SiteInfo(groups=groups, k=k, num_codes=num_codes, dim=dim)},
                     activation_sites=["s"], block_size=8)


def random_table(rng, n: int, m: StoreMeta) -> pa.Table:
    info = m.sites["s"]
    codes = rng.integers(0, info.num_codes, (n, info.groups, info.k))
    acts = rng.normal(size=(n, info.dim)).astype(np.float32)
    return token_table(np.arange(n) // 5, np.arange(n) % 5, rng.integers(0, 50, n),
                       {"s": codes}, m, {"s": acts})


def test_token_table_round_trips_codes_and_rejects_out_of_range_ids():
    rng = np.random.default_rng(0)
    m = meta()
    codes = rng.integers(0, 10, (7, 2, 2))
    table = token_table(np.zeros(7), np.arange(7), np.arange(7), {"s": codes}, m,
                        {"s": np.ones((7, 6))})
    assert table.column("codes.s").type.value_type == pa.uint8()
    assert np.array_equal(list_to_numpy(table.column("codes.s")).reshape(7, 2, 2), codes)
    with pytest.raises(ValueError, match="outside"):
        token_table(np.zeros(1), [0], [0], {"s": np.full((1, 2, 2), 10)}, m, {"s": np.ones((1, 6))})


def test_regex_labels_mark_tokens_overlapping_the_capture_group():
    text = "In May 2021 and June"
    offsets = [(0, 2), (2, 6), (6, 9), (9, 11), (11, 15), (15, 20)]  # "In"," May"," 20","21",...
    feats = [RegexFeature("month", r"\b(May|June)\b"), RegexFeature("year2", r"\b(2\d{3})\b"),
             RegexFeature("whole", r"and")]
    labels = regex_token_labels(text, offsets, feats)
    assert labels[:, 0].tolist() == [False, True, False, False, False, True]
    assert labels[:, 1].tolist() == [False, False, True, True, False, False]
    assert labels[:, 2].tolist() == [False, False, False, False, True, False]


def test_feature_files_are_validated(tmp_path):
    good = tmp_path / "f.yaml"
    good.write_text("- {name: dragons, regex: '(dragon)', ignore_case: true}\n")
    feats = load_features(good, include_defaults=False)
    assert feats == [RegexFeature("dragons", "(dragon)", True)]
    assert len(load_features(good)) > 5  # defaults kept
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {name: broken, regex: '(unclosed'}\n")
    with pytest.raises(ConfigError, match="features.broken"):
        load_features(bad)
    bad.write_text("- {name: x}\n")
    with pytest.raises(ConfigError, match=r"--features\[0\]\.regex: missing"):
        load_features(bad)
    bad.write_text("- {name: x, regex: y, ignorecase: true}\n")
    with pytest.raises(ConfigError, match=r"--features\[0\]\.ignorecase: unknown key"):
        load_features(bad)
    bad.write_text("- {name: months, regex: 'x'}\n")
    with pytest.raises(ConfigError, match="duplicate"):
        load_features(bad)


def test_shard_partials_add_up_to_the_single_process_classifier():
    """Two shards through count -> thresholds -> above == the in-memory classifier."""
    from corpus_helpers import in_memory_classifier

    rng = np.random.default_rng(1)
    m = meta()
    tables = [random_table(rng, 300, m), random_table(rng, 200, m)]
    labels = [rng.integers(-1, 3, t.num_rows) for t in tables]
    masks = [np.ones(t.num_rows, dtype=bool) for t in tables]
    merged = {}
    for t, lab, mask in zip(tables, labels, masks, strict=True):
        merged = merge_partials(merged, count_partials(t, m, lab, mask, 3, ["s"], ["s"]))
    rows = best_code_rows(merged, m, ["s"], ["a", "b", "c"], min_recall=0.05)
    thresholds = neuron_thresholds(merged, rows, ["s"])
    above = {}
    for t, mask in zip(tables, masks, strict=True):
        above = merge_partials(above, above_counts(t, mask, thresholds))
    neuron_rows(rows, thresholds, above)

    all_codes = np.concatenate([list_to_numpy(t.column("codes.s")) for t in tables]
                               ).astype(np.int64).reshape(-1, 2, 2)
    flat = (all_codes + np.array([0, 10])[None, :, None]).reshape(len(all_codes), -1)
    acts = np.concatenate([list_to_numpy(t.column("acts.s")) for t in tables]).astype(np.float32)
    truth = in_memory_classifier(flat, acts, np.concatenate(labels), 20, 3, min_recall=0.05)
    for f, row in enumerate(rows):
        g, c = map(int, row["code"].split(":"))
        assert g * 10 + c == truth["code"][f]
        assert row["code_precision"] == pytest.approx(truth["code_precision"][f])
        assert row["neuron_precision"] == pytest.approx(truth["neuron_precision"][f])
        assert row["positives"] == int((np.concatenate(labels) == f).sum())


def test_plan_shards_and_windows():
    assert plan_shards(5, 2) == [{"shard": 0, "start": 0, "stop": 2},
                                 {"shard": 1, "start": 2, "stop": 4},
                                 {"shard": 2, "start": 4, "stop": 5}]
    with pytest.raises(ConfigError, match="docs-per-shard"):
        plan_shards(5, 0)
    w = tokenise_documents(np.arange(10).reshape(2, 5), 7, None, 3)
    assert w["doc_id"].tolist() == [7, 7, 8, 8]
    assert w["start"].tolist() == [0, 3, 0, 3] and w["length"].tolist() == [3, 2, 3, 2]
    assert w["input_ids"][1].tolist() == [3, 4, 0]


def test_models_resolve_from_mlflow_runs_checkpoints_and_folders(tmp_path):
    from corpus_helpers import save_tiny_codebook_model

    from codebook.resolve import resolve_model
    from codebook.tracking import finish_run, start_run

    save_tiny_codebook_model(tmp_path / "ckpt" / "hf", vocab_size=40, num_codes=16)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "e", "r", {}, {})
    finish_run(uri, run_id, artifacts={"model": tmp_path / "ckpt" / "hf"})
    local = resolve_model(f"runs:/{run_id}/model", tmp_path / "dl", uri)
    assert (Path(local) / "codebook_config.json").is_file()
    assert resolve_model(str(tmp_path / "ckpt"), tmp_path / "x") == str(tmp_path / "ckpt" / "hf")
    with pytest.raises(ConfigError, match="no codebook_config.json"):
        resolve_model(str(tmp_path), tmp_path / "x")
    with pytest.raises(ConfigError, match="cannot download"):
        resolve_model("runs:/0123456789abcdef/model", tmp_path / "dl2", uri)
