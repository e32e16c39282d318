"""The FSM experiment analysis (codebook.analysis.fsm) and its plots, on tiny untrained models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from codebook import (
    CodebookConfig,
    CodebookModel,
    ConfigError,
    disable_codes,
    force_codes,
    read_codes,
    recording,
    swap_codes,
)
from codebook.analysis import fsm as A
from codebook.analysis.fsm.common import state_spellings
from codebook.analysis.fsm.interventions import _state_inputs
from codebook.analysis.neurons import best_neurons_at_recall
from codebook.analysis.plots import plot_code_vs_neuron_precision, plot_intervention_by_site
from codebook.data.fsm import FSMConfig, TokFSM


def make_model(fsm: TokFSM, seed: int = 0, code_std: float = 0.05) -> CodebookModel:
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        "gpt_neox", vocab_size=fsm.vocab_size, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
    )
    model = CodebookModel(AutoModelForCausalLM.from_config(cfg),
                          CodebookConfig(sites=["attn_heads", "mlp"], num_codes=32, k=1))
    for cb in model.codebooks.values():  # codes at the scale of the tiny model's activations
        cb.codes.data.normal_(0, code_std)
    return model.eval()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is ~10x faster on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fsm() -> TokFSM:
    return TokFSM(FSMConfig(num_states=12, num_edges=3, trajectory_states=8))  # 17 tokens


@pytest.fixture(scope="module")
def model(fsm: TokFSM) -> CodebookModel:
    return make_model(fsm)


@pytest.fixture(scope="module")
def tokens(fsm: TokFSM) -> np.ndarray:
    return fsm.eval_set(48)


def brute_force_scores(model, fsm, row: np.ndarray, pos: int) -> np.ndarray:
    """log P(next state) by running every candidate spelling in full."""
    d = fsm.digits_per_state
    digits = fsm.encode_states(np.arange(fsm.num_states)[:, None])
    ctx = np.repeat(row[None, : pos + 1], fsm.num_states, axis=0)
    x = torch.as_tensor(np.concatenate([ctx, digits], axis=1))
    with torch.no_grad():
        lp = model(input_ids=x).logits.double().log_softmax(-1)
    at = torch.arange(pos, pos + d)
    return lp[torch.arange(fsm.num_states)[:, None], at, torch.as_tensor(digits)].sum(1).numpy()


# ---------------------------------------------------------------------- next-state scores
@pytest.mark.parametrize("config", [
    FSMConfig(num_states=12, num_edges=3, trajectory_states=8),  # D=2, two prefixes
    FSMConfig(num_states=8, num_edges=2, base=2, trajectory_states=4),  # D=3
    FSMConfig(num_states=7, num_edges=2, base=10, trajectory_states=6),  # D=1
])
@pytest.mark.parametrize("kv_cache", [True, False])
def test_next_state_scores_match_brute_force(config: FSMConfig, kv_cache: bool) -> None:
    fsm = TokFSM(config)
    model = make_model(fsm, seed=1)
    tok = fsm.eval_set(5)
    d = fsm.digits_per_state
    positions = np.array([d, 2 * d, 0, d * config.trajectory_states, 3 * d])
    scores = A.next_state_scores(model, fsm, tok, positions, batch_tokens=70, kv_cache=kv_cache)
    assert scores.shape == (5, fsm.num_states)
    for i in range(5):
        ref = brute_force_scores(model, fsm, tok[i], int(positions[i]))
        np.testing.assert_allclose(scores[i], ref, atol=1e-5)
    assert (np.logaddexp.reduce(scores, axis=1) <= 1e-9).all()
    renorm = A.next_state_scores(model, fsm, tok, positions, renormalise=True)
    np.testing.assert_allclose(np.exp(renorm).sum(1), 1.0, atol=1e-9)
    np.testing.assert_array_equal(np.argsort(renorm, 1), np.argsort(scores, 1))


def test_scores_are_proper_log_probs_when_every_spelling_is_a_state() -> None:
    fsm = TokFSM(FSMConfig(num_states=16, num_edges=3, base=4, trajectory_states=5))
    model = make_model(fsm)
    tok = fsm.eval_set(6)

    def no_bos(module, args, output):  # the model never predicts BOS
        output[..., fsm.bos_token_id] = -math.inf
        return output

    hook = model.model.get_output_embeddings().register_forward_hook(no_bos)
    try:
        scores = A.next_state_scores(model, fsm, tok, 2 * np.arange(6) % 10)
    finally:
        hook.remove()
    np.testing.assert_allclose(np.logaddexp.reduce(scores, axis=1), 0.0, atol=1e-9)


def test_bad_positions_rejected(model, fsm, tokens) -> None:
    with pytest.raises(ValueError, match="state positions"):
        A.next_state_scores(model, fsm, tokens[:2], 3)


def test_transition_accuracies_in_range(model, fsm, tokens) -> None:
    first = A.first_transition_accuracy(model, fsm, tokens)
    every = A.transition_accuracy_all_positions(model, fsm, tokens, max_samples=20)
    assert 0.0 <= first <= 1.0 and 0.0 <= every <= 1.0
    assert first * fsm.num_edges * len(tokens) == pytest.approx(
        round(first * fsm.num_edges * len(tokens)))


def test_first_transition_accuracy_is_one_for_a_perfect_predictor(fsm, tokens) -> None:
    model = make_model(fsm)
    scores = A.next_state_scores(model, fsm, tokens, 2)
    first = fsm.decode_tokens(tokens)[:, 0]
    perfect = np.where(fsm.adjacency[first], 0.0, -10.0)
    assert fsm.first_transition_accuracy(perfect, first) == 1.0
    assert fsm.first_transition_accuracy(scores, first) == A.first_transition_accuracy(
        model, fsm, tokens)


# ---------------------------------------------------------------------- codes as classifiers
def test_planted_codes_are_found_and_dedicated() -> None:
    rng = np.random.default_rng(0)
    num_states, m = 6, 600
    labels = rng.integers(num_states, size=m)
    labels[:10] = -1  # non-state positions are ignored
    planted = np.where(labels >= 0, labels, 31)[:, None, None]  # mlp_0: code == state
    noise = rng.integers(32, size=(m, 4, 1))  # attn_heads_0: four random codebooks
    # mlp_1 code 7 fires on all of state 0 and a quarter of state 1: precise but not dedicated.
    leaky = np.full((m, 1, 1), 30)
    leaky[labels == 0] = 7
    ones = np.flatnonzero(labels == 1)
    leaky[ones[: len(ones) // 4]] = 7
    codes = {"attn_heads_0": noise, "mlp_0": planted, "mlp_1": leaky}
    res = A.classify_state_codes(codes, labels, num_states, 32)
    assert len(res["codebooks"]) == 6
    assert res["best_site"] == ["mlp_0"] * num_states
    np.testing.assert_array_equal(res["best_code"], np.arange(num_states))
    np.testing.assert_allclose(res["precision"], 1.0)
    np.testing.assert_allclose(res["recall"], 1.0)
    assert res["states_with_dedicated_code"] == num_states
    assert res["dedicated_by_site"]["mlp_0"] == list(range(num_states))
    assert res["dedicated_by_site"]["attn_heads_0"] == []
    cb = res["codebooks"].index(("mlp_1", 0))
    assert res["per_codebook"]["code"][cb, 0] == 7
    assert 0.7 < res["per_codebook"]["precision"][cb, 0] < 0.95
    assert 0 not in res["dedicated_by_site"]["mlp_1"]

    # Without the planted codebook: the recall floor bars a tiny but pure code.
    tiny = np.full((m, 1, 1), 30)
    tiny[np.flatnonzero(labels == 2)[:3]] = 5  # 100% precise, recall ~3%
    res2 = A.classify_state_codes({"a": tiny, "b": leaky}, labels, num_states, 32)
    assert res2["best_code"][2] != 5 or res2["best_site"][2] != "a"
    res3 = A.classify_state_codes({"a": tiny}, labels, num_states, 32, min_recall=0.0)
    assert res3["best_code"][2] == 5 and res3["precision"][2] == 1.0


def test_code_state_classification_on_a_model(model, fsm, tokens) -> None:
    data = A.collect_state_data(model, fsm, tokens, activations=False, residual=False)
    sizes = {name: model.codebooks[name].num_codes for name in data.codes}
    res = A.classify_state_codes(data.codes, data.labels, fsm.num_states, sizes)
    assert len(res["codebooks"]) == 2 * (4 + 1)
    p = res["precision"][np.isfinite(res["precision"])]
    assert p.size and ((p >= 0) & (p <= 1)).all()
    counts = np.bincount(fsm.decode_tokens(tokens).ravel(), minlength=fsm.num_states)
    np.testing.assert_array_equal(res["state_counts"], counts)


def test_forced_codes_make_a_dedicated_code(fsm, tokens) -> None:
    """Code 5, barred from natural selection and forced on at every position of state 3 (via
    the intervention API), is found as state 3's dedicated code."""
    model = make_model(fsm)
    labels = fsm.state_labels(tokens)
    parts = []
    with disable_codes(model, "mlp_1", [5]):
        for r in range(len(tokens)):
            at = np.flatnonzero(labels[r] == 3).tolist()
            with force_codes(model, "mlp_1", [5], positions=at, mode="replace"):
                parts.append(A.collect_state_data(model, fsm, tokens[r : r + 1],
                                                  activations=False, residual=False))
    codes = {"mlp_1": np.concatenate([d.codes["mlp_1"] for d in parts])}
    lab = np.concatenate([d.labels for d in parts])
    assert codes["mlp_1"].shape == (lab.size, 1, 2)  # forced slot padded with -1 elsewhere
    res = A.classify_state_codes(codes, lab, fsm.num_states, 32)
    assert (res["best_site"][3], res["best_code"][3]) == ("mlp_1", 5)
    assert res["precision"][3] == 1.0 and res["recall"][3] == 1.0
    assert 3 in res["dedicated_by_site"]["mlp_1"]


# ---------------------------------------------------------------------- neurons
def brute_force_neuron(acts: np.ndarray, is_label: np.ndarray, recall: float
                       ) -> tuple[float, int, int, float]:
    """The best (precision, neuron, sign, threshold) by the definition, neuron by neuron:
    ties to sign +1, then to the lower neuron."""
    need = math.ceil(recall * is_label.sum() - 1e-9)
    best = (-1.0, -1, 0, math.nan)
    for sign in (1, -1):
        for j in range(acts.shape[1]):
            a = sign * acts[:, j].astype(np.float32)
            thr = np.sort(a[is_label])[::-1][need - 1]
            p = (a[is_label] >= thr).sum() / (a >= thr).sum()
            if p > best[0]:
                best = (p, j, sign, float(thr))
    return best


@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("chunk", [1, 2, 9])
def test_best_neurons_match_the_definition(integer: bool, chunk: int) -> None:
    rng = np.random.default_rng(3)
    acts = rng.normal(size=(300, 9)).astype(np.float32)
    if integer:  # many ties
        acts = np.round(acts * 2)
    labels = rng.integers(-1, 4, size=300)
    acts[labels == 2, 4] += 3.0  # a good neuron for state 2
    acts[labels == 1, 6] -= 3.0  # a good negative neuron for state 1
    target = np.array([0.3, 0.7, 0.5, np.nan, 0.9])  # state 3 skipped, state 4 absent
    res = best_neurons_at_recall(acts, labels, target, chunk_elements=300 * chunk)
    for s in range(3):
        p, j, sign, thr = brute_force_neuron(acts, labels == s, target[s])
        assert res["precision"][s] == pytest.approx(p)
        assert (res["neuron"][s], res["sign"][s]) == (j, sign)
        assert res["threshold"][s] == pytest.approx(thr)
    assert (res["neuron"][2], res["sign"][2]) == (4, 1)
    assert (res["neuron"][1], res["sign"][1]) == (6, -1)
    assert np.isnan(res["precision"][3]) and np.isnan(res["precision"][4])


# ---------------------------------------------------------------------- interventions
METRICS = ("success_rate", "mean_overlap", "overlap_with_a", "agreement_with_b",
           "jsd_normalised", "next_token_jsd_normalised")


def test_patching_a_states_own_codes_changes_nothing(fsm) -> None:
    model = make_model(fsm, code_std=1.0)
    res = A.intervention_experiment(model, fsm, [(3, 3), (5, 5), (10, 10)])
    for metrics in [res["clean"], *res["by_span"].values(), *res["by_site"].values()]:
        assert metrics["jsd_normalised"] == pytest.approx(0.0, abs=1e-9)
        assert metrics["next_token_jsd_normalised"] == pytest.approx(0.0, abs=1e-9)
        assert metrics["agreement_with_b"] == 1.0
        assert metrics["success_rate"] == res["b_itself"]["success_rate"]


def test_patching_b_codes_moves_the_prediction_towards_b(fsm) -> None:
    model = make_model(fsm, code_std=1.0)  # large codes: the codebooks dominate the residual
    pairs = [(a, b) for a in range(fsm.num_states) for b in range(fsm.num_states) if a != b]
    res = A.intervention_experiment(model, fsm, pairs, batch_tokens=500)  # several passes
    assert res["n"] == len(pairs) and res["pairs"] == pairs
    assert set(res["by_site"]) == set(model.codebooks)
    assert set(res["by_span"]) == {"last", "state", "state+next"}
    for metrics in [res["clean"], res["b_itself"], *res["by_span"].values(),
                    *res["by_site"].values()]:
        for key in METRICS:
            assert 0.0 <= metrics[key] <= 1.0, key
    clean, full = res["clean"], res["by_span"]["state+next"]
    assert full["jsd_normalised"] < 0.5 * clean["jsd_normalised"]
    assert full["agreement_with_b"] > clean["agreement_with_b"]
    assert full["overlap_with_a"] < clean["overlap_with_a"]
    # the last digit's codes carry the next-token prediction made there
    last = res["by_span"]["last"]
    assert last["next_token_jsd_normalised"] < 0.5 * clean["next_token_jsd_normalised"]
    # later digits are predicted at the next state's positions: covering them matters
    assert full["jsd_normalised"] < last["jsd_normalised"]
    with pytest.raises(ValueError, match="at least one"):
        A.intervention_experiment(model, fsm, [])


def _state_rows(fsm: TokFSM, states: list[int]) -> torch.Tensor:
    """[BOS, digits of s, first candidate prefix] per state: the interventions' inputs."""
    digits = fsm.encode_states(np.asarray(states)[:, None])
    bos = np.full((len(states), 1), fsm.bos_token_id)
    return torch.as_tensor(np.concatenate([bos, digits, digits[:, :1] * 0], axis=1))


def test_swap_codes_changes_exactly_the_named_codes(fsm) -> None:
    model = make_model(fsm, code_std=1.0)
    site = next(iter(model.codebooks))  # the first site: nothing upstream is edited
    x = _state_rows(fsm, [1, 4, 7, 9])
    before = read_codes(model, x, sites=[site]).codes[site]  # (4, T, groups, 1)
    d = fsm.digits_per_state
    old = before[:, d, :, 0].clone()  # each row's codes at its state position
    old[1] = -1  # row 1: no swap at all
    new = (old + 1) % model.codebooks[site].num_codes
    new[0, 0] = -1  # row 0, group 0: left alone
    span = list(range(1, 2 * d))
    with recording(model, [site]) as rec, swap_codes(model, site, old, new, span) as changed:
        model(input_ids=x)
    after = rec.codes[site]
    in_span = torch.zeros(x.shape[1], dtype=torch.bool)
    in_span[span] = True
    live = (old >= 0) & (new >= 0)
    expect = (before[..., 0] == old[:, None]) & live[:, None] & in_span[None, :, None]
    assert torch.equal(after[..., 0], torch.where(expect, new[:, None].expand_as(expect),
                                                  before[..., 0]))
    assert expect.any() and not expect[1].any()
    assert torch.equal(changed[0], expect.sum(dim=(1, 2)))
    with pytest.raises(ConfigError, match="tables"), swap_codes(model, site, old[:, :1],
                                                                new[:, :1]):
        pass


def test_state_code_swap_counts_and_controls(fsm) -> None:
    model = make_model(fsm, code_std=1.0)
    names = list(model.codebooks)
    d, states = fsm.digits_per_state, list(range(fsm.num_states))
    seen_all = read_codes(model, _state_rows(fsm, states)).codes
    codes = {n: c[:, d, :, 0] for n, c in seen_all.items()}  # (S, groups): at state positions
    dedicated = {n: c.T.numpy().copy() for n, c in codes.items()}  # (groups, S)
    dedicated[names[-1]][:] = -1  # one site without any dedicated code
    pairs = [(a, b) for a in range(0, 12, 3) for b in range(1, 12, 4) if a != b]
    res = A.intervention_experiment(model, fsm, pairs, dedicated=dedicated, seed=1)
    swap, rand = res["state_codes"], res["random_codes"]
    assert set(swap["by_site"]) == set(names) and set(rand) == {"by_site", "all"}
    # by hand at the first site (nothing upstream is edited): every slot over the span where
    # a's dedicated code is chosen, in codebooks where b has one too
    _, prefixes, _ = state_spellings(fsm)
    first, n_prefix = names[0], len(prefixes)
    a, b = np.asarray([p[0] for p in pairs]), np.asarray([p[1] for p in pairs])
    seen = read_codes(model, _state_inputs(fsm, a, prefixes), sites=[first]).codes[first][..., 0]
    tab = dedicated[first]
    a_codes = torch.as_tensor(tab[:, a].T).repeat_interleave(n_prefix, 0)  # (rows, groups)
    b_codes = torch.as_tensor(tab[:, b].T).repeat_interleave(n_prefix, 0)
    live = ((a_codes >= 0) & (b_codes >= 0))[:, None]
    hits = (seen[:, 1 : 2 * d] == a_codes[:, None]) & live
    by_hand = hits.sum((1, 2)).float().mean().item()
    assert swap["by_site"][first]["codes_changed_mean"] == pytest.approx(by_hand)
    assert swap["by_site"][first]["codes_changed_mean"] >= 1.0  # at least a's own position
    assert swap["by_site"][names[-1]]["codes_changed_mean"] == 0.0  # nothing dedicated there
    assert 0 < swap["all"]["codes_changed_mean"] <= swap["all"]["active_codes_mean"]
    total = sum(model.codebooks[n].groups * model.codebooks[n].k for n in names) * (2 * d - 1)
    assert swap["all"]["active_codes_mean"] == total
    # the site with nothing dedicated: the swap there is no intervention at all
    for key in METRICS:
        assert swap["by_site"][names[-1]][key] == pytest.approx(res["clean"][key]), key
    assert rand["all"]["codes_changed_mean"] > 0


def test_state_code_swap_in_context(fsm, tokens) -> None:
    model = make_model(fsm, code_std=1.0)
    names = list(model.codebooks)
    rows = np.arange(0, len(tokens), 2)  # the "test half"
    first = fsm.state_labels(tokens[rows])[:, fsm.digits_per_state * np.arange(1, 4)]
    present = set(first.ravel().tolist())  # states among the first 3 of those rows
    pairs = [(a, b) for a in range(fsm.num_states) for b in (0, 5) if a != b]
    none = {n: np.full((model.codebooks[n].groups, fsm.num_states), -1) for n in names}
    res = A.intervention_experiment(model, fsm, pairs, dedicated=none,
                                    context=(tokens, rows), max_context_states=3)
    assert res["state_codes"]["all"]["n"] == sum(a in present for a, _ in pairs)
    for group in ("state_codes", "random_codes"):
        assert res[group]["all"]["codes_changed_mean"] == 0.0
        for key in METRICS:  # nothing swapped: the unpatched inputs' figures
            assert res[group]["all"][key] == pytest.approx(res["state_codes_clean"][key])
    # every code a state takes in context, as its "dedicated" code: swaps happen
    seen = read_codes(model, torch.as_tensor(tokens[rows])).codes
    labels = fsm.state_labels(tokens[rows])
    tables = {}
    for n in names:
        t = np.full((model.codebooks[n].groups, fsm.num_states), -1)
        for i, p in np.argwhere(labels >= 0):
            t[:, labels[i, p]] = seen[n][i, p, :, 0].numpy()
        tables[n] = t
    res = A.intervention_experiment(model, fsm, pairs, dedicated=tables,
                                    context=(tokens, rows), max_context_states=3)
    swap = res["state_codes"]["all"]
    assert 0 < swap["codes_changed_mean"] <= swap["active_codes_mean"]
    assert swap["inputs_changed_rate"] > 0.5


def test_select_pairs() -> None:
    rng = np.random.default_rng(0)
    pairs, mode = A.select_pairs({"s": [1, 2, 3], "t": [3, 9]}, range(10), 100, rng)
    assert mode == "dedicated"
    assert set(pairs) == {(1, 2), (1, 3), (2, 1), (2, 3), (3, 1), (3, 2), (3, 9), (9, 3)}
    pairs, mode = A.select_pairs({"s": [1]}, [0, 1, 2], 4, rng)
    assert mode == "fallback" and len(pairs) == 4 and all(a != b for a, b in pairs)


# ---------------------------------------------------------------------- the whole run
FRACTIONS = [
    "first_transition_accuracy", "transition_accuracy_all_positions", "code_precision_mean",
    "code_precision_median", "neuron_precision_mean", "neuron_precision_median",
    "neuron_precision_residual_mean", "intervention_success_rate",
    "intervention_jsd_normalised", "intervention_agreement_with_b",
    "intervention_last_position_next_token_jsd", "intervention_b_itself_success_rate",
    "code_precision_test_mean", "code_recall_test_mean", "code_precision_null_mean",
    "state_base_rate_mean", "neuron_precision_test_mean", "neuron_precision_residual_test_mean",
    "intervention_state_codes_success_rate", "intervention_state_codes_jsd_normalised",
    "intervention_single_site_best_success_rate", "intervention_full_swap_success_rate",
    "intervention_random_codes_success_rate",
]


def test_run_fsm_analysis_report_and_plots(model, fsm, tokens, tmp_path) -> None:
    report = A.run_fsm_analysis(model, fsm, tokens, max_pairs=4, seed=0,
                                all_positions_samples=16)
    assert len(report["intervention_pairs"]) == 4
    assert set(report["intervention_by_span"]) == {"last", "state", "state+next"}
    assert report["intervention_success_rate"] == \
        report["intervention_by_span"]["state+next"]["success_rate"] == \
        report["intervention_full_swap_success_rate"]
    assert report["selection_sequences"] + report["test_sequences"] == len(tokens)
    assert report["test_sequences"] == len(tokens) // 2
    assert report["code_candidates"] == sum(c.groups * c.num_codes
                                            for c in model.codebooks.values())
    assert report["neuron_candidates"] == 2 * sum(c.dim for c in model.codebooks.values())
    changed, active = report["intervention_codes_changed_mean"], \
        report["intervention_active_codes_mean"]
    assert 0 <= changed <= active and active > 0
    assert set(report["intervention_state_codes"]["by_site"]) == set(model.codebooks)
    if report["states_with_dedicated_code"]:
        assert 0 <= report["dedicated_recall_test_mean"] <= 1
        assert 1 <= report["dedicated_codebooks_per_state_mean"] <= report["codebooks_considered"]
        assert report["dedicated_codes_firing_test_mean"] <= \
            report["dedicated_codebooks_per_state_mean"]
    # the dictionary metrics, per site and their mean over sites
    assert set(report["sites"]) == set(model.codebooks)
    fves = [report["sites"][n]["fve"] for n in model.codebooks]
    assert report["fve_mean"] == pytest.approx(float(np.mean(fves)))
    assert all(report["sites"][n]["l0"] == model.codebooks[n].groups for n in model.codebooks)
    assert report["ce_loss_recovered_mean"] is not None
    json.dumps(report, allow_nan=False)
    for key in FRACTIONS:
        assert 0.0 <= report[key] <= 1.0, key
    assert 0 <= report["states_with_dedicated_code"] <= fsm.num_states
    assert set(report["intervention_by_site"]) == set(model.codebooks) | {"all"}
    per_state = report["per_state"]
    assert len(per_state["code_precision"]) == fsm.num_states
    assert len(per_state["neuron_precision_residual"]) == fsm.num_states
    assert report["intervention_pairs"] and report["pair_selection"] in ("dedicated", "fallback")
    again = A.run_fsm_analysis(model, fsm, tokens, max_pairs=4, seed=0, all_positions_samples=16)
    assert again == report

    a = plot_code_vs_neuron_precision(report, tmp_path / "figs" / "precision.png")
    b = plot_intervention_by_site(report, tmp_path / "figs" / "interventions.png")
    for path in (a, b):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [
        "interventions.png", "precision.png"]
