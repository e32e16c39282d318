"""The FSM experiment end to end, and its report: a typed record whose ``to_dict()`` is the
JSON that ``pipelines/fsm.py`` writes (conventions: ``codebook.analysis.fsm``)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from codebook.analysis.classifiers import precision_summary
from codebook.analysis.fsm.common import as_tokens
from codebook.analysis.fsm.interventions import intervention_experiment, select_pairs
from codebook.analysis.fsm.scoring import (
    first_transition_accuracy,
    transition_accuracy_all_positions,
)
from codebook.analysis.fsm.states import classify_state_codes, collect_state_data, neuron_baseline
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


@dataclass
class PerState:
    """Arrays over states, for plots: the best code and the neurons at its recall."""

    state: np.ndarray
    count: np.ndarray
    code_site: list[str | None]
    code_group: np.ndarray
    code: np.ndarray
    code_precision: np.ndarray
    code_recall: np.ndarray
    dedicated: np.ndarray
    neuron: list[str | None]  # over the raw site inputs, "<site>:<index>"
    neuron_precision: np.ndarray
    neuron_residual: list[str | None]  # over the residual stream, "hidden_<i>:<index>"
    neuron_precision_residual: np.ndarray


@dataclass
class FSMReport:
    """The FSM experiment's results; ``to_dict()`` gives the JSON, one key per field in this
    order (NaN -> None). Headline intervention figures: every site patched over the span
    ``"state+next"``; ``intervention_last_position_next_token_jsd``: every site patched at the
    last digit only (the reference's measure); ``intervention_clean_*``: no patch;
    ``intervention_b_itself_*``: b's own prediction (the ceiling)."""

    num_sequences: int
    num_states: int
    num_edges: int
    sites: list[str]
    settings: Settings
    first_transition_accuracy: float
    transition_accuracy_all_positions: float
    code_precision_mean: float
    code_precision_median: float
    code_precision_frac_ge_095: float
    code_recall_mean: float
    neuron_precision_mean: float  # over the raw inputs of the codebook sites
    neuron_precision_median: float
    neuron_precision_frac_ge_095: float
    neuron_precision_residual_mean: float  # over the residual stream
    neuron_precision_residual_median: float
    neuron_precision_residual_frac_ge_095: float
    states_with_dedicated_code: int
    states_classified: int
    codebooks_considered: int
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

    data = collect_state_data(model, fsm, tok, names,
                              batch_size=max(1, batch_tokens // tok.shape[1]))
    sizes = {name: model.codebooks[name].num_codes for name in names}
    cls = classify_state_codes(data.codes, data.labels, fsm.num_states, sizes, st.min_recall,
                               st.dedicated_precision)
    assert data.site_acts is not None and data.residual is not None
    nb_sites = neuron_baseline(data.site_acts, data.site_columns, data.labels, cls["recall"])
    nb_resid = neuron_baseline(data.residual, data.residual_columns, data.labels, cls["recall"])
    del data

    rng = np.random.default_rng(st.seed)
    pairs, mode = select_pairs(cls["dedicated_by_site"], range(fsm.num_states), st.max_pairs,
                               rng)
    inter = intervention_experiment(model, fsm, pairs, names, st.success_overlap, batch_tokens)
    headline = inter["by_span"]["state+next"]
    cp, ns, nr = cls["code_precision"], nb_sites["summary"], nb_resid["summary"]
    return FSMReport(
        num_sequences=int(tok.shape[0]), num_states=fsm.num_states, num_edges=fsm.num_edges,
        sites=names, settings=st,
        first_transition_accuracy=first, transition_accuracy_all_positions=every,
        code_precision_mean=cp["mean"], code_precision_median=cp["median"],
        code_precision_frac_ge_095=cp["frac_ge_095"],
        code_recall_mean=precision_summary(cls["recall"])["mean"],
        neuron_precision_mean=ns["mean"], neuron_precision_median=ns["median"],
        neuron_precision_frac_ge_095=ns["frac_ge_095"],
        neuron_precision_residual_mean=nr["mean"],
        neuron_precision_residual_median=nr["median"],
        neuron_precision_residual_frac_ge_095=nr["frac_ge_095"],
        states_with_dedicated_code=cls["states_with_dedicated_code"],
        states_classified=cp["n"], codebooks_considered=len(cls["codebooks"]),
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
            dedicated=cls["dedicated"], neuron=nb_sites["name"],
            neuron_precision=nb_sites["precision"], neuron_residual=nb_resid["name"],
            neuron_precision_residual=nb_resid["precision"]),
    )


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
) -> dict[str, Any]:
    """:func:`fsm_report` as its JSON-able dict (``FSMReport.to_dict``)."""
    settings = Settings(max_pairs, seed, min_recall, dedicated_precision, success_overlap,
                        all_positions_samples)
    return fsm_report(model, fsm, eval_tokens, settings, sites, batch_tokens).to_dict()
