"""The FSM experiment end to end, and its report: a typed record whose ``to_dict()`` is the
JSON that ``pipelines/fsm.py`` writes (conventions: ``codebook.analysis.fsm``)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from codebook.analysis.classifiers import precision_summary
from codebook.analysis.fsm.common import as_tokens
from codebook.analysis.fsm.interventions import intervention_experiment, select_pairs
from codebook.analysis.fsm.scoring import (
    first_transition_accuracy,
    transition_accuracy_all_positions,
)
from codebook.analysis.fsm.states import classify_state_codes, collect_state_data, neuron_baseline
from codebook.analysis.heldout import code_scores_at, neuron_scores_at, permute_codes, split_halves
from codebook.analysis.metrics import dictionary_metrics
from codebook.data.fsm import TokFSM
from codebook.model import CodebookModel

Metrics = dict[str, float]  # intervention_experiment's metrics of one patch (and "n")


@dataclass
class Settings:
    """The experiment's choices, as run_fsm_analysis takes them."""

    max_pairs: int = 2000
    seed: int = 0
    min_recall: float = 0.2
    dedicated_precision: float = 0.95
    success_overlap: float = 0.9
    all_positions_samples: int | None = 256
    test_fraction: float = 0.5  # of the sequences, held out from every choice


@dataclass
class PerState:
    """Arrays over states, for plots: the best code and the neurons at its recall."""

    state: np.ndarray
    count: np.ndarray
    code_site: list[str | None]
    code_group: np.ndarray
    code: np.ndarray
    code_precision: np.ndarray  # chosen and scored on the selection half
    code_recall: np.ndarray
    code_precision_test: np.ndarray  # the same code on the test half
    code_recall_test: np.ndarray
    dedicated: np.ndarray
    neuron: list[str | None]  # over the raw site inputs, "<site>:<index>"
    neuron_precision: np.ndarray
    neuron_precision_test: np.ndarray
    neuron_residual: list[str | None]  # over the residual stream, "hidden_<i>:<index>"
    neuron_precision_residual: np.ndarray
    neuron_precision_residual_test: np.ndarray


@dataclass
class FSMReport:
    """The FSM experiment's results; ``to_dict()`` gives the JSON, one key per field in this
    order (NaN -> None).

    Held out: the sequences are split (seeded) into a selection half and a test half. Every
    code, neuron, threshold and dedicated code is chosen on the selection half;
    ``*_precision_*`` without ``test`` are the selection half's own figures, ``*_test_*`` the
    headline: the same choices scored on the test half. ``code_precision_null_mean``: the same
    protocol after each codebook's assignments are shuffled across tokens (frequencies kept),
    beside ``state_base_rate_mean`` (a state's share of the test positions).

    Interventions (pairs with dedicated codes at a common site): the headline
    ``intervention_state_codes_*`` replaces only a's dedicated codes by b's, in every codebook
    where both have one, over a's digits and the next state's earlier digits, in context: at
    an occurrence of a in a test-half sequence (``intervention_codes_changed_mean`` of
    ``intervention_active_codes_mean`` code slots per input); ``intervention_random_codes_*``
    sets the same slots to random codes (the control). The full-swap control replaces every
    code of every site: ``intervention_success_rate`` (= ``intervention_full_swap_success_rate``),
    ``intervention_mean_overlap``, ``intervention_agreement_with_b``,
    ``intervention_jsd_normalised``, ``intervention_by_span``, ``intervention_by_site``.
    ``intervention_last_position_next_token_jsd``: every site patched at the last digit only
    (the reference's measure); ``intervention_clean_*``: no patch; ``intervention_b_itself_*``:
    b's own prediction (the ceiling).

    Dictionary metrics (``codebook.analysis.metrics`` on the eval sequences): ``fve_mean``,
    ``ce_loss_recovered_mean`` and per site under ``sites`` ({site: metrics}; iterating it
    gives the site names)."""

    num_sequences: int
    num_states: int
    num_edges: int
    sites: dict[str, dict[str, Any]]
    settings: Settings
    selection_sequences: int
    test_sequences: int
    code_candidates: int  # codes searched per state: all codes of all codebooks
    neuron_candidates: int  # site-input neurons x 2 signs
    neuron_candidates_residual: int
    first_transition_accuracy: float
    transition_accuracy_all_positions: float
    code_precision_mean: float
    code_precision_median: float
    code_precision_frac_ge_095: float
    code_recall_mean: float
    code_precision_test_mean: float
    code_precision_test_median: float
    code_precision_test_frac_ge_095: float
    code_recall_test_mean: float
    code_precision_null_mean: float
    state_base_rate_mean: float
    neuron_precision_mean: float  # over the raw inputs of the codebook sites
    neuron_precision_median: float
    neuron_precision_frac_ge_095: float
    neuron_precision_residual_mean: float  # over the residual stream
    neuron_precision_residual_median: float
    neuron_precision_residual_frac_ge_095: float
    neuron_precision_test_mean: float
    neuron_precision_residual_test_mean: float
    states_with_dedicated_code: int
    # Where the state lives: codebooks holding a code dedicated to the state (of
    # codebooks_considered), and on the test half the share of the state's positions where one
    # of its dedicated codes fires and how many of them fire there (means over states with one).
    dedicated_codebooks_per_state_mean: float
    dedicated_recall_test_mean: float
    dedicated_codes_firing_test_mean: float
    states_classified: int
    codebooks_considered: int
    intervention_state_codes_success_rate: float
    intervention_state_codes_jsd_normalised: float
    intervention_state_codes_jsd_shift: float  # share of the distance to b's closed
    intervention_state_codes_mean_overlap: float  # top-E predictions among b's neighbours
    intervention_codes_changed_mean: float
    intervention_active_codes_mean: float
    intervention_single_site_best_success_rate: float  # state codes, best single site
    intervention_full_swap_success_rate: float
    intervention_full_swap_jsd_shift: float
    intervention_random_codes_success_rate: float
    intervention_random_codes_jsd_shift: float
    # The dose-response on the short inputs: "dedicated" (a's dedicated codes -> b's),
    # "linked" (a's best code in every codebook -> b's), "sites:j" (b's codes patched in the
    # first j sites, forward order; the last is the full swap)
    intervention_dose: dict[str, Metrics]
    # {"by_site": {site: metrics}, "all": metrics, "clean": the same inputs unpatched}
    intervention_state_codes: dict[str, Any]
    intervention_random_codes: dict[str, Any]
    fve_mean: float
    ce_loss_recovered_mean: float
    # The rest of the dictionary metrics: means over sites (l0, kl, ...), CE on / off, and
    # every site on at once (ce_loss_recovered_all, kl_all).
    dictionary_overall: dict[str, Any]
    intervention_success_rate: float
    intervention_mean_overlap: float
    intervention_agreement_with_b: float
    intervention_jsd_normalised: float
    intervention_last_position_next_token_jsd: float
    intervention_clean_success_rate: float
    intervention_clean_jsd_normalised: float
    intervention_b_itself_success_rate: float
    intervention_by_span: dict[str, Metrics]
    intervention_by_site: dict[str, Metrics]  # per site, and "all" (the headline)
    intervention_clean: Metrics
    intervention_b_itself: Metrics
    intervention_pairs: list[list[int]]
    pair_selection: str  # "dedicated", or "fallback" (random pairs: no dedicated codes)
    per_state: PerState

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able report: numpy -> Python, non-finite floats -> None."""
        return _clean(dataclasses.asdict(self))


def _clean(value: Any) -> Any:
    """JSON-able copy: numpy -> Python, non-finite floats -> None."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [_clean(v) for v in value.tolist()]
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        f = float(value)
        return f if math.isfinite(f) else None
    return value


def fsm_report(
    model: CodebookModel,
    fsm: TokFSM,
    eval_tokens: Any,
    settings: Settings | None = None,
    sites: Sequence[str] | None = None,
    batch_tokens: int = 1 << 15,
) -> FSMReport:
    """Run the whole experiment on ``eval_tokens`` (n, seq_len) over ``sites`` (default: all)."""
    st = settings or Settings()
    tok = as_tokens(eval_tokens)
    names = list(sites) if sites is not None else list(model.codebooks)
    first = first_transition_accuracy(model, fsm, tok, batch_tokens=batch_tokens)
    every = transition_accuracy_all_positions(model, fsm, tok, max_samples=st.all_positions_samples,
                                              seed=st.seed, batch_tokens=batch_tokens)
    dictionary = _dictionary_metrics(model, tok, names, batch_tokens)

    data = collect_state_data(model, fsm, tok, names,
                              batch_size=max(1, batch_tokens // tok.shape[1]))
    sel_seq, test_seq = split_halves(tok.shape[0], st.seed, st.test_fraction)
    sel = np.isin(data.rows, sel_seq)
    test = ~sel
    sizes = {name: model.codebooks[name].num_codes for name in names}
    cls, held = _codes_held_out(data.codes, data.labels, sel, test, fsm.num_states, sizes, st)
    permuted = {k: permute_codes(v, np.random.default_rng([st.seed, i]))
                for i, (k, v) in enumerate(data.codes.items())}
    _, null = _codes_held_out(permuted, data.labels, sel, test, fsm.num_states, sizes, st)
    base_rate = np.bincount(data.labels[test], minlength=fsm.num_states) / max(1, test.sum())
    assert data.site_acts is not None and data.residual is not None
    neurons = {key: neurons_held_out(acts, cols, data.labels, sel, test, cls["recall"])
               for key, acts, cols in (("sites", data.site_acts, data.site_columns),
                                       ("residual", data.residual, data.residual_columns))}
    neuron_dims = {"sites": data.site_acts.shape[1], "residual": data.residual.shape[1]}
    coverage = _dedicated_coverage(cls, data.codes, data.labels, test, fsm.num_states)
    del data, permuted

    rng = np.random.default_rng(st.seed)
    pairs, mode = select_pairs(cls["dedicated_by_site"], range(fsm.num_states), st.max_pairs,
                               rng)
    dedicated = _dedicated_tables(cls, names, model, fsm)
    linked = _dedicated_tables(cls, names, model, fsm, linked=True)
    inter = intervention_experiment(model, fsm, pairs, names, st.success_overlap, batch_tokens,
                                    dedicated=dedicated, context=(tok.numpy(), test_seq),
                                    seed=st.seed, linked=linked)
    headline = inter["by_span"]["state+next"]
    swap = {**inter["state_codes"], "clean": inter["state_codes_clean"]}
    cp, ns, nr = cls["code_precision"], neurons["sites"]["summary"], neurons["residual"]["summary"]
    ct = precision_summary(held["precision"])
    has_code = np.isfinite(cls["precision"])
    return FSMReport(
        num_sequences=int(tok.shape[0]), num_states=fsm.num_states, num_edges=fsm.num_edges,
        sites=dictionary["sites"], settings=st,
        selection_sequences=len(sel_seq), test_sequences=len(test_seq),
        code_candidates=int(sum(sizes[s] * model.codebooks[s].groups for s in names)),
        neuron_candidates=2 * neuron_dims["sites"],
        neuron_candidates_residual=2 * neuron_dims["residual"],
        first_transition_accuracy=first, transition_accuracy_all_positions=every,
        code_precision_mean=cp["mean"], code_precision_median=cp["median"],
        code_precision_frac_ge_095=cp["frac_ge_095"],
        code_recall_mean=precision_summary(cls["recall"])["mean"],
        code_precision_test_mean=ct["mean"], code_precision_test_median=ct["median"],
        code_precision_test_frac_ge_095=ct["frac_ge_095"],
        code_recall_test_mean=precision_summary(held["recall"])["mean"],
        code_precision_null_mean=precision_summary(null["precision"])["mean"],
        state_base_rate_mean=float(base_rate[has_code].mean()) if has_code.any() else math.nan,
        neuron_precision_mean=ns["mean"], neuron_precision_median=ns["median"],
        neuron_precision_frac_ge_095=ns["frac_ge_095"],
        neuron_precision_residual_mean=nr["mean"],
        neuron_precision_residual_median=nr["median"],
        neuron_precision_residual_frac_ge_095=nr["frac_ge_095"],
        neuron_precision_test_mean=neurons["sites"]["test_summary"]["mean"],
        neuron_precision_residual_test_mean=neurons["residual"]["test_summary"]["mean"],
        states_with_dedicated_code=cls["states_with_dedicated_code"],
        **coverage,
        states_classified=cp["n"], codebooks_considered=len(cls["codebooks"]),
        intervention_state_codes_success_rate=swap["all"]["success_rate"],
        intervention_state_codes_jsd_normalised=swap["all"]["jsd_normalised"],
        intervention_state_codes_jsd_shift=_num(swap["all"]["jsd_shift"]),
        intervention_state_codes_mean_overlap=swap["all"]["mean_overlap"],
        intervention_codes_changed_mean=swap["all"]["codes_changed_mean"],
        intervention_active_codes_mean=inter["active_codes_mean"],
        intervention_single_site_best_success_rate=max(
            (m["success_rate"] for m in swap["by_site"].values()), default=math.nan),
        intervention_full_swap_success_rate=headline["success_rate"],
        intervention_full_swap_jsd_shift=_num(headline["jsd_shift"]),
        intervention_random_codes_success_rate=inter["random_codes"]["all"]["success_rate"],
        intervention_random_codes_jsd_shift=_num(inter["random_codes"]["all"]["jsd_shift"]),
        intervention_dose=inter["dose"],
        intervention_state_codes=swap, intervention_random_codes=inter["random_codes"],
        fve_mean=dictionary["fve"], ce_loss_recovered_mean=dictionary["ce_loss_recovered"],
        dictionary_overall={k: v for k, v in dictionary.items() if k != "sites"},
        intervention_success_rate=headline["success_rate"],
        intervention_mean_overlap=headline["mean_overlap"],
        intervention_agreement_with_b=headline["agreement_with_b"],
        intervention_jsd_normalised=headline["jsd_normalised"],
        intervention_last_position_next_token_jsd=(
            inter["by_span"]["last"]["next_token_jsd_normalised"]),
        intervention_clean_success_rate=inter["clean"]["success_rate"],
        intervention_clean_jsd_normalised=inter["clean"]["jsd_normalised"],
        intervention_b_itself_success_rate=inter["b_itself"]["success_rate"],
        intervention_by_span=inter["by_span"],
        intervention_by_site={**inter["by_site"], "all": headline},
        intervention_clean=inter["clean"], intervention_b_itself=inter["b_itself"],
        intervention_pairs=[list(p) for p in inter["pairs"]], pair_selection=mode,
        per_state=PerState(
            state=np.arange(fsm.num_states), count=cls["state_counts"],
            code_site=cls["best_site"], code_group=cls["best_group"], code=cls["best_code"],
            code_precision=cls["precision"], code_recall=cls["recall"],
            code_precision_test=held["precision"], code_recall_test=held["recall"],
            dedicated=cls["dedicated"], neuron=neurons["sites"]["name"],
            neuron_precision=neurons["sites"]["precision"],
            neuron_precision_test=neurons["sites"]["precision_test"],
            neuron_residual=neurons["residual"]["name"],
            neuron_precision_residual=neurons["residual"]["precision"],
            neuron_precision_residual_test=neurons["residual"]["precision_test"]),
    )


def _dictionary_metrics(model: CodebookModel, tok: torch.Tensor, names: Sequence[str],
                        batch_tokens: int) -> dict[str, Any]:
    """The field's standard metrics (``codebook.analysis.metrics``) on the eval sequences."""
    rows = max(1, batch_tokens // tok.shape[1])
    device = next(model.parameters()).device
    batches = (tok[i : i + rows].to(device) for i in range(0, tok.shape[0], rows))
    return dictionary_metrics(model, batches, sites=names).to_dict()


def _dedicated_coverage(cls: Mapping[str, Any], codes: Mapping[str, np.ndarray],
                        labels: np.ndarray, test: np.ndarray, num_states: int
                        ) -> dict[str, float]:
    """How much of a state its dedicated codes cover (see ``FSMReport``)."""
    dedicated, code = cls["per_codebook"]["dedicated"], cls["per_codebook"]["code"]  # (C, S)
    firing = np.zeros((int(test.sum()), len(cls["codebooks"])), dtype=bool)
    lab = labels[test]
    own = code[:, np.clip(lab, 0, None)].T  # (M_test, C): the row's state's code per codebook
    ok = dedicated[:, np.clip(lab, 0, None)].T & (lab >= 0)[:, None]
    for i, (site, group) in enumerate(cls["codebooks"]):
        arr = np.asarray(codes[site])
        arr = arr[:, None] if arr.ndim == 2 else arr
        firing[:, i] = ok[:, i] & (arr[test][:, group] == own[:, i][:, None]).any(-1)
    has = dedicated.any(axis=0)
    recall, count = [], []
    for s in np.flatnonzero(has):
        rows = lab == s
        if rows.any():
            recall.append(firing[rows].any(axis=1).mean())
            count.append(firing[rows].sum(axis=1).mean())
    nan = math.nan
    return {
        "dedicated_codebooks_per_state_mean": float(dedicated.sum(0)[has].mean()) if has.any()
        else nan,
        "dedicated_recall_test_mean": float(np.mean(recall)) if recall else nan,
        "dedicated_codes_firing_test_mean": float(np.mean(count)) if count else nan,
    }


def _codes_held_out(codes: Mapping[str, np.ndarray], labels: np.ndarray, sel: np.ndarray,
                    test: np.ndarray, num_states: int, sizes: Mapping[str, int], st: Settings
                    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Each state's best code chosen on the ``sel`` rows (``classify_state_codes``) and its
    precision and recall on the ``test`` rows."""
    cls = classify_state_codes({k: v[sel] for k, v in codes.items()}, labels[sel], num_states,
                               sizes, st.min_recall, st.dedicated_precision)
    precision, recall = np.full(num_states, np.nan), np.full(num_states, np.nan)
    site_of, group_of = cls["best_site"], cls["best_group"]
    for site, group in cls["codebooks"]:
        mine = np.asarray([site_of[s] == site and group_of[s] == group
                           for s in range(num_states)])
        if not mine.any():
            continue
        arr = np.asarray(codes[site])
        arr = arr[:, None] if arr.ndim == 2 else arr
        chosen = np.where(mine, cls["best_code"], -1)
        p, r = code_scores_at(arr[test][:, group], labels[test], chosen, sizes[site], num_states)
        precision[mine], recall[mine] = p[mine], r[mine]
    return cls, {"precision": precision, "recall": recall}


def neurons_held_out(acts: np.ndarray, columns: Mapping[str, tuple[int, int]],
                      labels: np.ndarray, sel: np.ndarray, test: np.ndarray,
                      target_recall: np.ndarray) -> dict[str, Any]:
    """The neuron baseline chosen (neuron, sign, threshold) on ``sel`` rows, scored on
    ``test`` rows too."""
    res = neuron_baseline(acts[sel], columns, labels[sel], target_recall)
    p, _ = neuron_scores_at(acts[test], labels[test], res["neuron"], res["sign"],
                            res["threshold"])
    return {**res, "precision_test": p, "test_summary": precision_summary(p)}


def _dedicated_tables(cls: Mapping[str, Any], names: Sequence[str], model: CodebookModel,
                      fsm: TokFSM, linked: bool = False) -> dict[str, np.ndarray]:
    """{site: (groups, S)} the code dedicated to each state in each codebook, -1 none; with
    ``linked`` each state's best code there (recall >= min_recall), whatever its precision."""
    tables = {n: np.full((model.codebooks[n].groups, fsm.num_states), -1, dtype=np.int64)
              for n in names}
    code, dedicated = cls["per_codebook"]["code"], cls["per_codebook"]["dedicated"]
    for i, (site, group) in enumerate(cls["codebooks"]):
        tables[site][group] = code[i] if linked else np.where(dedicated[i], code[i], -1)
    return tables


def _num(value: float | None) -> float:
    return math.nan if value is None else float(value)


def run_fsm_analysis(
    model: CodebookModel,
    fsm: TokFSM,
    eval_tokens: Any,
    max_pairs: int = 2000,
    seed: int = 0,
    sites: Sequence[str] | None = None,
    min_recall: float = 0.2,
    dedicated_precision: float = 0.95,
    success_overlap: float = 0.9,
    all_positions_samples: int | None = 256,
    batch_tokens: int = 1 << 15,
    test_fraction: float = 0.5,
) -> dict[str, Any]:
    """:func:`fsm_report` as its JSON-able dict (``FSMReport.to_dict``)."""
    settings = Settings(max_pairs, seed, min_recall, dedicated_precision, success_overlap,
                        all_positions_samples, test_fraction)
    return fsm_report(model, fsm, eval_tokens, settings, sites, batch_tokens).to_dict()
