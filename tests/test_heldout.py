"""Held-out scoring (codebook.analysis.heldout): the split, scoring given choices, the null."""

from __future__ import annotations

import numpy as np
import pytest

from codebook.analysis.classifiers import best_code_per_label, code_feature_stats
from codebook.analysis.heldout import (
    code_scores_at,
    neuron_scores_at,
    permute_codes,
    split_halves,
)
from codebook.analysis.neurons import best_neurons_at_recall


def test_split_is_disjoint_complete_and_seeded() -> None:
    sel, test = split_halves(101, seed=3)
    assert np.intersect1d(sel, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([sel, test])), np.arange(101))
    assert len(test) == 50 and np.all(np.diff(sel) > 0) and np.all(np.diff(test) > 0)
    again = split_halves(101, seed=3)
    assert np.array_equal(again[0], sel) and np.array_equal(again[1], test)
    other = split_halves(101, seed=4)
    assert not np.array_equal(other[1], test)
    sel2, test2 = split_halves(2, seed=0)
    assert len(sel2) == len(test2) == 1
    assert len(split_halves(10, 0, test_fraction=0.3)[1]) == 3
    with pytest.raises(ValueError, match="at least 2"):
        split_halves(1, 0)
    with pytest.raises(ValueError, match="test_fraction"):
        split_halves(10, 0, test_fraction=1.0)


def test_code_scores_at_match_a_hand_count() -> None:
    codes = np.array([[0, 1], [0, 2], [1, 2], [3, -1], [0, -1], [2, 3]])
    labels = np.array([0, 0, 1, 1, -1, 0])
    chosen = np.array([0, 2, -1])  # label 0 -> code 0, label 1 -> code 2, label 2 -> none
    p, r = code_scores_at(codes, labels, chosen, num_codes=4, num_labels=3)
    # code 0 fires at rows 0, 1, 4; label 0 at rows 0, 1, 5
    assert p[0] == pytest.approx(2 / 3) and r[0] == pytest.approx(2 / 3)
    # code 2 fires at rows 1, 2, 5; label 1 at rows 2, 3
    assert p[1] == pytest.approx(1 / 3) and r[1] == pytest.approx(1 / 2)
    assert np.isnan(p[2]) and np.isnan(r[2])
    # a chosen code that never fires here predicts nothing: precision 0, recall 0
    p, _ = code_scores_at(codes, labels, np.array([3, 3, -1]), 4, 3)
    assert p[0] == pytest.approx(0.5)  # code 3 fires at rows 3, 5: one of them label 0
    p, r = code_scores_at(codes, labels, np.array([4, -1, -1]), 5, 3)
    assert (p[0], r[0]) == (0.0, 0.0)


def test_neuron_scores_at_match_a_hand_count() -> None:
    acts = np.array([[0.0, 5.0], [1.0, -2.0], [2.0, 0.0], [3.0, -1.0]], dtype=np.float32)
    labels = np.array([0, 1, 1, 0])
    p, r = neuron_scores_at(acts, labels, neuron=np.array([0, 1]), sign=np.array([1, -1]),
                            threshold=np.array([2.0, 1.0]))
    # label 0: act0 >= 2 at rows 2, 3 -> one of two is label 0; label 0 has two rows
    assert (p[0], r[0]) == (0.5, 0.5)
    # label 1: -act1 >= 1 at rows 1, 3 -> row 1 is label 1
    assert (p[1], r[1]) == (0.5, 0.5)


def test_selection_on_one_half_scores_lower_on_the_other_for_noise() -> None:
    """Pure noise: the best of many codes looks good where it was chosen, not elsewhere."""
    rng = np.random.default_rng(0)
    n, num_codes, num_labels = 4000, 400, 5
    codes = rng.integers(0, num_codes, size=(n, 1))
    labels = rng.integers(0, num_labels, size=n)
    sel, test = split_halves(n, seed=0)
    stats = code_feature_stats(codes[sel], labels[sel], num_codes, num_labels)
    chosen, p_sel, _ = best_code_per_label(stats, min_recall=0.0)
    p_test, _ = code_scores_at(codes[test], labels[test], chosen, num_codes, num_labels)
    assert p_sel.mean() > 0.5  # selection bias: some code is right by chance
    assert p_test.mean() < 0.35  # held out: back near the base rate 0.2
    # and a neuron chosen on the noise with its threshold does the same
    acts = rng.normal(size=(n, 50)).astype(np.float32)
    nb = best_neurons_at_recall(acts[sel], labels[sel], np.full(num_labels, 0.05))
    p_n, _ = neuron_scores_at(acts[test], labels[test], nb["neuron"], nb["sign"],
                              nb["threshold"])
    assert np.nanmean(nb["precision"]) > np.nanmean(p_n) + 0.05


def test_permutation_keeps_frequencies_and_breaks_the_labels() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, size=5000)
    codes = np.stack([labels, (labels + 3) % 10], axis=1)[:, :, None]  # (M, 2 groups, k=1)
    shuffled = permute_codes(codes, np.random.default_rng(0))
    assert shuffled.shape == codes.shape
    for g in range(2):
        assert np.array_equal(np.bincount(shuffled[:, g, 0]), np.bincount(codes[:, g, 0]))
    sel, test = split_halves(len(labels), seed=0)
    for arr, expect_high in ((codes, True), (shuffled, False)):
        stats = code_feature_stats(arr[sel, 0], labels[sel], 10, 10)
        chosen, _, _ = best_code_per_label(stats, min_recall=0.05)
        p, _ = code_scores_at(arr[test, 0], labels[test], chosen, 10, 10)
        assert (p.mean() == 1.0) if expect_high else (p.mean() < 0.2)
    assert permute_codes(codes[:, 0], np.random.default_rng(0)).shape == codes[:, 0].shape
