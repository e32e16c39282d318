"""The held-out store evaluation (codebook.store.heldout), shard by shard, no Ray:
the document split, test-half scores against hand computations, every feature accounted for,
and the permutation null."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from codebook.analysis.classifiers import best_code_per_label, code_feature_stats
from codebook.analysis.heldout import code_scores_at, neuron_scores_at
from codebook.analysis.neurons import best_neurons_at_recall
from codebook.store import SiteInfo, StoreMeta, list_to_numpy, token_table
from codebook.store.evaluate import NO_CODE, NO_POSITIVES, merge_partials, neuron_thresholds
from codebook.store.heldout import (
    SELECTION,
    DocumentSplit,
    heldout_above_counts,
    heldout_code_rows,
    heldout_count_partials,
    heldout_neuron_rows,
    heldout_summary,
    sub_partial,
)


def meta(num_codes: int = 10, groups: int = 2, k: int = 2, dim: int = 6) -> StoreMeta:
    return StoreMeta(model="m", tokenizer=None, source={"kind": "fsm"},
                     sites={"s": SiteInfo(groups=groups, k=k, num_codes=num_codes, dim=dim)},
                     activation_sites=["s"], block_size=8)


def run(tables, labels, m: StoreMeta, split: DocumentSplit, names, min_recall, null=True,
        masks=None):
    """The pipeline's driver (pipelines/evaluate.py's evaluate) over in-memory shards."""
    if masks is None:
        masks = [np.ones(t.num_rows, dtype=bool) for t in tables]
    merged = {}
    for i, (t, lab, mask) in enumerate(zip(tables, labels, masks, strict=True)):
        merged = merge_partials(merged, heldout_count_partials(
            t, m, lab, mask, len(names), ["s"], ["s"], split, shard=i, null=null))
    rows = heldout_code_rows(merged, m, ["s"], names, min_recall)
    thresholds = neuron_thresholds(sub_partial(merged, SELECTION), rows, ["s"])
    above = {}
    for t, mask in zip(tables, masks, strict=True):
        above = merge_partials(above, heldout_above_counts(t, mask, thresholds, split))
    heldout_neuron_rows(rows, thresholds, above, merged, ["s"])
    return rows, merged


def shard(rng, docs: np.ndarray, m: StoreMeta, codes=None, acts=None) -> pa.Table:
    info = m.sites["s"]
    n = len(docs)
    if codes is None:
        codes = rng.integers(0, info.num_codes, (n, info.groups, info.k))
    if acts is None:
        acts = rng.normal(size=(n, info.dim)).astype(np.float32)
    pos = np.concatenate([np.arange(c) for c in np.unique(docs, return_counts=True)[1]])
    return token_table(docs, pos, rng.integers(0, 50, n), {"s": codes}, m, {"s": acts})


def test_split_is_disjoint_seeded_and_by_document():
    a, b = DocumentSplit(40, seed=0), DocumentSplit(40, seed=0)
    sel, test = a.halves
    assert not set(sel) & set(test) and sorted([*sel, *test]) == list(range(40))
    assert len(test) == 20 and a.info()["documents_test"] == 20
    assert np.array_equal(a.is_test, b.is_test)  # same seed, same split
    assert not np.array_equal(a.is_test, DocumentSplit(40, seed=1).is_test)  # other seed
    assert DocumentSplit(40, 0, 0.25).info()["documents_test"] == 10
    # every token goes with its document: per half, the tokens of its documents exactly
    rng = np.random.default_rng(0)
    m = meta()
    docs = np.repeat(np.arange(40), rng.integers(1, 9, 40))
    table = shard(rng, docs, m)
    part = heldout_count_partials(table, m, rng.integers(-1, 2, len(docs)),
                                  np.ones(len(docs), bool), 2, ["s"], [], a, shard=0)
    assert part["test/tokens"][0] == np.isin(docs, test).sum()
    assert part["sel/tokens"][0] == np.isin(docs, sel).sum()
    with pytest.raises(ValueError, match="document ids outside"):
        DocumentSplit(10).test_tokens(np.array([10]))


def test_tiny_store_by_hand():
    """4 documents, one group, k=1. Seed 0 holds out documents 0 and 2 (checked), so the code
    is chosen on documents 1 and 3 only and scored on 0 and 2."""
    m = meta(num_codes=4, groups=1, k=1, dim=1)
    split = DocumentSplit(4, seed=0)
    assert split.halves[1].tolist() == [0, 2]
    docs = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    codes = np.array([2, 2, 1, 2, 2, 1, 0, 2, 1, 3])[:, None, None]
    label = np.array([1, 0, 0, 1, 1, 0, 1, 0, 0, 0], bool)[:, None]
    acts = np.array([3, 1, 0, 2, 3, 0, 1, 2, 0, 1], np.float32)[:, None]
    table = shard(np.random.default_rng(0), docs, m, codes, acts)
    rows, _ = run([table], [label], m, split, ["f"], min_recall=0.5)
    (row,) = rows
    # selection (docs 1, 3): code 2 fires on 2 tokens, both positive: precision 1, recall 1
    assert row["code"] == "0:2" and row["code_precision"] == 1.0 and row["code_recall"] == 1.0
    # test (docs 0, 2): code 2 fires on tokens 0, 1, 7; positives are tokens 0 and 6
    assert row["code_precision_test"] == pytest.approx(1 / 3)
    assert row["code_recall_test"] == 0.5
    assert row["positives"] == 4 and row["positives_selection"] == 2
    assert row["positives_test"] == 2 and row["base_rate"] == 2 / 5
    assert row["eligible_codes"] == 1 and row["code_candidates"] == 4
    # the neuron (1 of 1, sign +1 or -1): selection positives have activations 2 and 3, so at
    # recall 1 the +1 threshold is 2, which tokens 3, 4 reach in the selection half (precision
    # 1) and tokens 0, 7 in the test half (positive: 0), recall 1/2
    assert row["neuron"] == 0 and row["neuron_sign"] == 1 and row["neuron_threshold"] == 2.0
    assert row["neuron_precision"] == 1.0 and row["neuron_recall"] == 1.0
    assert row["neuron_precision_test"] == 0.5 and row["neuron_recall_test"] == 0.5
    # the same store in two shards, one per half (a half may be empty in a shard): same rows
    halves = [np.isin(docs, [0, 2]), np.isin(docs, [1, 3])]
    tables = [shard(np.random.default_rng(0), docs[h], m, codes[h], acts[h]) for h in halves]
    again, _ = run(tables, [label[h] for h in halves], m, split, ["f"], min_recall=0.5)
    assert {k: again[0][k] for k in row if "null" not in k} == {
        k: v for k, v in row.items() if "null" not in k}


def test_test_half_scores_are_the_chosen_code_and_neuron_scored_on_test_documents():
    rng = np.random.default_rng(3)
    m = meta()
    split = DocumentSplit(60, seed=7)
    docs = [np.repeat(np.arange(0, 35), 9), np.repeat(np.arange(35, 60), 11)]
    tables = [shard(rng, d, m) for d in docs]
    labels = [rng.integers(-1, 3, t.num_rows) for t in tables]
    # only the masked tokens count (FSM stores: the state positions)
    masks = [rng.random(t.num_rows) < 0.8 for t in tables]
    rows, _ = run(tables, labels, m, split, ["a", "b", "c"], min_recall=0.05, masks=masks)

    codes = np.concatenate([list_to_numpy(t.column("codes.s")) for t in tables]
                           ).astype(np.int64).reshape(-1, 2, 2)
    flat = (codes + np.array([0, 10])[None, :, None]).reshape(len(codes), -1)
    acts = np.concatenate([list_to_numpy(t.column("acts.s")) for t in tables]).astype(np.float32)
    lab = np.concatenate(labels)
    mask = np.concatenate(masks)
    flat, acts, lab = flat[mask], acts[mask], lab[mask]
    test = split.test_tokens(np.concatenate(docs))[mask]
    sel = ~test
    # chosen on the selection documents alone ...
    stats = code_feature_stats(flat[sel], lab[sel], 20, 3)
    code, p_sel, r_sel = best_code_per_label(stats, min_recall=0.05)
    neurons = best_neurons_at_recall(acts[sel], lab[sel], r_sel)
    # ... and scored on the test documents alone
    p_test, r_test = code_scores_at(flat[test], lab[test], code, 20, 3)
    np_test, nr_test = neuron_scores_at(acts[test], lab[test], neurons["neuron"],
                                        neurons["sign"], neurons["threshold"])
    for f, row in enumerate(rows):
        g, c = map(int, row["code"].split(":"))
        assert g * 10 + c == code[f]
        assert row["code_precision"] == pytest.approx(p_sel[f])
        assert row["code_precision_test"] == pytest.approx(p_test[f])
        assert row["code_recall_test"] == pytest.approx(r_test[f])
        assert row["neuron"] == neurons["neuron"][f]
        assert row["neuron_precision"] == pytest.approx(neurons["precision"][f])
        assert row["neuron_precision_test"] == pytest.approx(np_test[f])
        assert row["neuron_recall_test"] == pytest.approx(nr_test[f])
        assert row["positives_test"] == int((lab[test] == f).sum())
        assert row["status"] == "ok" and row["neuron_status"] == "ok"


def test_every_feature_gets_a_row_and_uncovered_ones_lower_coverage():
    rng = np.random.default_rng(5)
    m = meta()
    split = DocumentSplit(30, seed=0)
    docs = np.repeat(np.arange(30), 10)
    lab = np.full(len(docs), -1)
    lab[rng.random(len(docs)) < 0.3] = 0  # "common": code 0:9 fires on all of its tokens
    lab[np.flatnonzero(lab == -1)[::3]] = 1  # "spread": no code reaches recall 0.6
    codes = rng.integers(0, 9, (len(docs), 2, 2))
    codes[lab == 0, 0, 0] = 9
    table = shard(rng, docs, m, codes)
    names = ["common", "spread", "never"]
    rows, _ = run([table], [lab], m, split, names, min_recall=0.6)
    assert [r["feature"] for r in rows] == names  # a row per feature, even "never"
    by = {r["feature"]: r for r in rows}
    assert by["common"]["status"] == "ok" and by["common"]["code"] == "0:9"
    assert by["spread"]["status"] == NO_CODE and by["spread"]["code"] is None
    assert by["spread"]["code_precision_test"] is None and by["spread"]["neuron"] is None
    assert by["spread"]["neuron_status"] == NO_CODE
    assert by["never"]["status"] == NO_POSITIVES and by["never"]["positives"] == 0
    summary = heldout_summary(rows, names, m, ["s"], ["s"])
    assert summary["features"] == 3 and summary["features_with_code"] == 1
    assert summary["coverage"] == pytest.approx(1 / 3)
    assert summary["features_with_neuron"] == 1
    assert summary["neuron_coverage"] == pytest.approx(1 / 3)
    assert summary["code_precision_test_mean"] == by["common"]["code_precision_test"]
    assert [f["feature"] for f in summary["per_feature"]] == names
    status = {f["feature"]: f["status"] for f in summary["per_feature"]}
    assert status == {"common": "ok", "spread": NO_CODE, "never": NO_POSITIVES}
    assert summary["candidates"]["codes"] == 20 and summary["candidates"]["neurons"] == 12


def test_permutation_null_sits_at_the_base_rate_while_a_tracking_code_scores_high():
    """Code 7 of group 0 fires exactly on the feature's tokens: its test precision is 1; with
    each group's assignments shuffled the chosen code's test precision is near the base
    rate."""
    rng = np.random.default_rng(11)
    m = meta(num_codes=16, groups=2, k=1, dim=4)
    split = DocumentSplit(200, seed=0)
    tables, labels = [], []
    for lo in (0, 100):
        docs = np.repeat(np.arange(lo, lo + 100), 20)
        feature = rng.random(len(docs)) < 0.2
        codes = rng.integers(0, 7, (len(docs), 2, 1))
        codes[feature, 0, 0] = 7
        tables.append(shard(rng, docs, m, codes))
        labels.append(feature[:, None])
    rows, _ = run(tables, labels, m, split, ["f"], min_recall=0.1)
    (row,) = rows
    assert row["code"] == "0:7" and row["code_precision_test"] == 1.0
    assert row["code_recall_test"] == 1.0
    assert 0.15 < row["base_rate"] < 0.25
    assert row["code_precision_null"] is not None
    assert abs(row["code_precision_null"] - row["base_rate"]) < 0.05
    summary = heldout_summary(rows, ["f"], m, ["s"], ["s"])
    assert summary["code_precision_test_mean"] == 1.0
    assert summary["code_precision_null"] == pytest.approx(row["code_precision_null"])
    assert summary["base_rate_mean"] == pytest.approx(row["base_rate"])
    # the same seed gives the same null; --no-null leaves it out
    again, _ = run(tables, labels, m, split, ["f"], min_recall=0.1)
    assert again[0]["code_precision_null"] == row["code_precision_null"]
    none, _ = run(tables, labels, m, split, ["f"], min_recall=0.1, null=False)
    assert none[0]["code_precision_null"] is None
