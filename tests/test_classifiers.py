"""Tests of codes-vs-neurons classifiers (codebook.analysis.classifiers, .neurons)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from codebook.analysis.classifiers import (
    best_code_per_label,
    code_feature_stats,
    js_divergence,
    normalised_jsd,
    precision_summary,
)
from codebook.analysis.neurons import best_neurons_at_recall


def best_neuron(acts: np.ndarray, is_label: np.ndarray, recall: float, both_signs: bool = True,
                chunk_elements: int = 1 << 24) -> tuple[float, int, int, float]:
    """``best_neurons_at_recall`` for one label: (precision, neuron, sign, threshold)."""
    res = best_neurons_at_recall(acts, np.where(is_label, 0, -1), [recall], both_signs,
                                 chunk_elements)
    return (float(res["precision"][0]), int(res["neuron"][0]), int(res["sign"][0]),
            float(res["threshold"][0]))


def test_code_stats_hand_example() -> None:
    codes = np.array([[0, 1], [0, 2], [1, 2], [0, 0], [2, 1]])
    labels = np.array([0, 0, 1, -1, 1])
    s = code_feature_stats(codes, labels, num_codes=3, num_labels=2)
    assert s["code_counts"].tolist() == [3, 3, 3]  # the repeated 0 in row 3 counts once
    assert s["label_counts"].tolist() == [2, 2]
    assert s["joint"].tolist() == [[2, 0], [1, 2], [1, 2]]
    np.testing.assert_allclose(s["precision"], [[2 / 3, 0], [1 / 3, 2 / 3], [1 / 3, 2 / 3]])
    np.testing.assert_allclose(s["recall"], [[1, 0], [0.5, 1], [0.5, 1]])
    code, prec, rec = best_code_per_label(s)
    assert code.tolist() == [0, 1]  # label 1: codes 1 and 2 tie -> lower id
    np.testing.assert_allclose(prec, [2 / 3, 2 / 3])
    np.testing.assert_allclose(rec, [1, 1])

    # Masking out row 3 (unlabelled, where code 0 fires) makes code 0 a perfect classifier.
    mask = np.array([True, True, True, False, True])
    s = code_feature_stats(codes, labels, 3, 2, mask=mask)
    assert s["num_tokens"] == 4
    assert s["precision"][0, 0] == 1.0
    # Unlabelled tokens inside the mask count in the denominator.
    s = code_feature_stats(np.array([0, 0, 0, 0]), np.array([0, -1, -1, 0]), 1, 1)
    assert s["precision"][0, 0] == 0.5 and s["recall"][0, 0] == 1.0


def test_planted_perfect_code() -> None:
    rng = np.random.default_rng(0)
    t, num_labels = 5000, 7
    labels = rng.integers(-1, num_labels, size=t)
    noise = rng.integers(20, 40, size=t)
    planted = np.where(labels >= 0, labels + 10, noise)
    codes = np.stack([planted, rng.integers(0, 10, size=t)], axis=1)  # second slot: noise
    s = code_feature_stats(codes, labels, num_codes=40, num_labels=num_labels)
    code, prec, rec = best_code_per_label(s)
    assert code.tolist() == [lab + 10 for lab in range(num_labels)]
    np.testing.assert_array_equal(prec, 1.0)
    np.testing.assert_array_equal(rec, 1.0)
    assert s["precision"][:10].max() < 0.5  # noise codes are poor classifiers
    code_f1, _, _ = best_code_per_label(s, by="f1")
    assert code_f1.tolist() == code.tolist()


def test_best_code_min_recall_and_missing_label() -> None:
    # Label 0: code 0 is precise but rare (recall 1/4), code 1 fires on all of label 0 and more.
    codes = np.array([0, 1, 1, 1, 1, 1])
    labels = np.array([0, 0, 0, 0, -1, -1])
    s = code_feature_stats(codes, labels, num_codes=2, num_labels=2)
    code, prec, rec = best_code_per_label(s)
    assert code[0] == 0 and prec[0] == 1.0 and rec[0] == 0.25
    code, prec, rec = best_code_per_label(s, min_recall=0.5)
    assert code[0] == 1 and prec[0] == pytest.approx(3 / 5) and rec[0] == 0.75
    # Label 1 never occurs: no code, NaN scores.
    assert code[1] == -1 and math.isnan(prec[1]) and math.isnan(rec[1])
    with pytest.raises(ValueError):
        best_code_per_label(s, by="accuracy")  # type: ignore[arg-type]


def test_code_stats_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        code_feature_stats(np.array([3]), np.array([0]), num_codes=3, num_labels=1)
    with pytest.raises(ValueError):
        code_feature_stats(np.array([0]), np.array([1]), num_codes=3, num_labels=1)


@pytest.mark.parametrize("recall", [0.05, 0.3, 0.5, 0.97, 1.0])
def test_indicator_neuron_is_perfect_at_any_recall(recall: float) -> None:
    rng = np.random.default_rng(1)
    is_label = rng.random(1000) < 0.2
    acts = rng.normal(size=(1000, 6))
    acts[:, 4] = is_label.astype(float)
    prec, idx, sign, thr = best_neuron(acts, is_label, recall)
    assert (prec, idx, sign) == (1.0, 4, 1)
    assert thr == 1.0


def test_noisy_neuron_hand_computed() -> None:
    # Neuron 0 sorted high to low; positives at 5, 3, 2 (P = 3).
    is_label = np.array([1, 0, 1, 1, 0, 0], dtype=bool)
    n0 = np.array([5.0, 4, 3, 2, 1, 0])
    n1 = -is_label.astype(float)  # an indicator with the wrong sign
    acts = np.stack([n0, n1], axis=1)
    plus = acts[:, :1]
    assert best_neuron(plus, is_label, 1 / 3, False)[::3] == (1.0, 5.0)  # only the 5 above
    prec, _, _, thr = best_neuron(plus, is_label, 0.5, False)  # ceil(1.5) = 2
    assert prec == pytest.approx(2 / 3) and thr == 3.0  # 5, 4, 3 above
    prec, _, _, thr = best_neuron(plus, is_label, 2 / 3, False)
    assert prec == pytest.approx(2 / 3) and thr == 3.0
    prec, _, _, thr = best_neuron(plus, is_label, 1.0, False)
    assert prec == pytest.approx(3 / 4) and thr == 2.0
    prec, _, _, thr = best_neuron(-plus, is_label, 1.0, False)  # sign -1 alone
    assert prec == pytest.approx(3 / 6) and thr == -5.0
    # Recall 0.1 * 3 = 0.30000000000000004 with 10 positives must need 3 positives, not 4.
    ten = np.zeros(20, dtype=bool)
    ten[:10] = True
    vals = np.arange(20, 0, -1, dtype=float)[:, None]
    vals[3, 0] = -1.0  # a negative-class-like value among positives: 4th positive is low
    vals[10, 0] = 16.5  # a negative between the 3rd and 4th largest positives
    prec, _, _, thr = best_neuron(vals, ten, 0.1 * 3, False)
    assert thr == 18.0 and prec == 1.0

    # Both signs: neuron 1 negated is a perfect indicator.
    p, idx, sign, t = best_neuron(acts, is_label, 1.0)
    assert (p, idx, sign, t) == (1.0, 1, -1, 1.0)
    p, idx, sign, _ = best_neuron(acts, is_label, 1.0, both_signs=False)
    assert (p, idx, sign) == (pytest.approx(3 / 4), 0, 1)


def test_neuron_chunking_matches_unchunked() -> None:
    rng = np.random.default_rng(2)
    acts = rng.normal(size=(500, 37)).astype(np.float32)
    is_label = rng.random(500) < 0.3
    acts[is_label] += rng.normal(size=37).astype(np.float32)
    full = best_neuron(acts, is_label, 0.6)
    assert best_neuron(acts, is_label, 0.6, chunk_elements=500 * 5) == full
    # Brute force over every neuron and sign.
    need = math.ceil(0.6 * is_label.sum())
    best = 0.0
    for j in range(37):
        for sign in (1, -1):
            a = sign * acts[:, j]
            thr = np.sort(a[is_label])[::-1][need - 1]
            best = max(best, (a[is_label] >= thr).sum() / (a >= thr).sum())
    assert full[0] == pytest.approx(best)


def test_neuron_rejects_bad_inputs() -> None:
    acts = np.zeros((4, 2))
    assert math.isnan(best_neuron(acts, np.zeros(4, dtype=bool), 0.5)[0])  # no positive: skipped
    with pytest.raises(ValueError):
        best_neuron(acts, np.ones(4, dtype=bool), 0.0)
    with pytest.raises(ValueError):
        best_neuron(acts, np.ones(3, dtype=bool), 0.5)


def test_codes_vs_neurons_at_the_codes_recall() -> None:
    rng = np.random.default_rng(3)
    t = 2000
    labels = rng.integers(-1, 3, size=t)
    codes = np.where(labels >= 0, labels, 3)
    acts = rng.normal(size=(t, 4))
    acts[:, 2] = (labels == 1).astype(float)
    code, code_p, code_r = best_code_per_label(code_feature_stats(codes, labels, 4, 3))
    np.testing.assert_array_equal(code_p, 1.0)
    np.testing.assert_array_equal(code_r, 1.0)
    out = best_neurons_at_recall(acts, labels, code_r)
    assert out["neuron"][1] == 2 and out["precision"][1] == 1.0
    assert out["precision"][0] < 0.9


def test_labeller_output_counts_like_label_ids() -> None:
    """(T, F) bool labels (a labeller's) give the same statistics as the ids they encode."""
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 6, size=(300, 2))
    labels = rng.random((300, 3)) < 0.3
    ids = np.where(labels, np.arange(3)[None, :], -1)
    a = code_feature_stats(codes, labels, 6, 3)
    b = code_feature_stats(codes, ids, 6, 3)
    for key in ("joint", "code_counts", "label_counts"):
        np.testing.assert_array_equal(a[key], b[key])


def test_precision_summary() -> None:
    s = precision_summary(np.array([1.0, 0.95, 0.5, np.nan, 0.7]))
    assert s["n"] == 4
    assert s["mean"] == pytest.approx((1.0 + 0.95 + 0.5 + 0.7) / 4)
    assert s["median"] == pytest.approx(0.825)
    assert s["frac_ge_095"] == 0.5
    assert precision_summary(np.array([np.nan]))["n"] == 0


def test_jsd() -> None:
    p = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(js_divergence(p, p), 0.0, atol=1e-15)
    a, b = np.eye(3)[0], np.eye(3)[2]
    assert normalised_jsd(a, b) == pytest.approx(1.0)
    assert js_divergence(a, b) == pytest.approx(math.log(2))
    # Hand value for p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4).
    expected = 0.5 * (math.log(4 / 3) + 0.5 * math.log(2 / 3) + 0.5 * math.log(2))
    assert js_divergence([1.0, 0.0], [0.5, 0.5]) == pytest.approx(expected)
    assert js_divergence([0.5, 0.5], [1.0, 0.0]) == pytest.approx(expected)
    # axis handling: distributions along axis 0.
    np.testing.assert_allclose(
        js_divergence(p.T, p[::-1].T, axis=0), js_divergence(p, p[::-1], axis=-1)
    )
    with pytest.raises(ValueError):
        js_divergence([-0.1, 1.1], [0.5, 0.5])
