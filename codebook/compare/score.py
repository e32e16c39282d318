"""One scoring code for every method of the comparison (``codebook.compare.methods``): the FSM
report (``codebook.analysis.fsm``, held out: choices on the selection half, figures on the
test half) turned into one row per method, and the rows as a Markdown table.

Conventions, the same for every method:
- reconstruction: L0, FVE, dead share, and with only one site's dictionary spliced in (mean over
  sites) or all of them at once, CE loss recovered against zero ablation and KL to the clean
  model. "Clean" is the same weights with every dictionary out: the frozen base model for the
  cache-trained methods, the finetuned weights with the codebooks off for ``codebook``;
- FSM states as classifiers: each state's best feature (a code, an SAE latent: "fires" = among
  the active top-k) with recall >= ``min_recall`` on the selection half, its precision on the
  test half; neurons at the recall of the codebook's best code per state (a threshold on one
  unit, chosen on the selection half);
- interventions: at an occurrence of state a in a test-half sequence, a's dedicated features
  (precision >= 0.95 on the selection half) are replaced by b's at every site where both have
  one (an SAE latent takes its mean active value, a's is zeroed); success, JSD to b, and
  features changed against active features per input. The random-feature control changes the
  same slots to random features. ``neuron`` has no sparse features to swap: None.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from codebook.analysis.classifiers import precision_summary
from codebook.analysis.fsm.report import FSMReport, Settings, fsm_report, neurons_held_out
from codebook.analysis.fsm.scoring import first_transition_accuracy
from codebook.analysis.fsm.states import collect_state_data
from codebook.analysis.heldout import split_halves
from codebook.data.fsm import TokFSM
from codebook.model import CodebookModel

RECONSTRUCTION = (
    ("method", "method"), ("l0", "L0"), ("dictionary_size", "dict. size"), ("fve", "FVE"),
    ("dead_fraction", "dead"), ("ce_loss_recovered", "CE rec. (1 site)"),
    ("kl", "KL (1 site)"), ("ce_loss_recovered_all", "CE rec. (all)"), ("kl_all", "KL (all)"))
TIMES = (("train_seconds", "train s"), ("train_tokens_per_s", "tok/s"))
COLUMNS = {  # (key, header) of the Markdown table per task, in order
    "fsm": RECONSTRUCTION + (
        ("first_transition_accuracy", "FTA"), ("state_precision_test", "state prec. (test)"),
        ("state_precision_selection", "(selection)"), ("state_precision_null", "null"),
        ("swap_success", "swap success"), ("swap_jsd", "swap JSD"),
        ("features_changed", "changed / active"), ("random_success", "random ctrl")) + TIMES,
    "text": RECONSTRUCTION + (
        ("ce_loss_on", "CE on (all)"), ("ce_loss_off", "CE clean"),
        ("regex_precision_test", "regex prec. (test)"),
        ("regex_precision_selection", "(selection)"), ("regex_coverage", "coverage"),
        ("steering_baseline_rate", "topic rate (base)"), ("steering_rate", "(steered)"),
        ("steering_topics_ge_060", "topics >= 0.6")) + TIMES,
}


def fsm_row(method: str, model: CodebookModel, fsm: TokFSM, tokens: torch.Tensor,
            settings: Settings) -> tuple[dict[str, Any], FSMReport]:
    """Score one method's model on the FSM; returns its row and the full report."""
    rep = fsm_report(model, fsm, tokens, settings)
    over, sites = rep.dictionary_overall, rep.sites.values()
    row = {
        "method": method,
        "l0": over["l0"], "fve": rep.fve_mean,
        "dictionary_size": float(np.mean([model.codebooks[s].groups * model.codebooks[s].num_codes
                                          for s in rep.sites])),
        "dead_fraction": _mean(s["dead_fraction"] for s in sites),
        "ce_loss_on": over["ce_loss_on"], "ce_loss_off": over["ce_loss_off"],
        "ce_loss_recovered": rep.ce_loss_recovered_mean, "kl": over["kl"],
        "ce_loss_recovered_all": over.get("ce_loss_recovered_all"),
        "kl_all": over.get("kl_all"),
        "first_transition_accuracy": rep.first_transition_accuracy,
        "state_precision_test": rep.code_precision_test_mean,
        "state_precision_selection": rep.code_precision_mean,
        "state_recall_test": rep.code_recall_test_mean,
        "state_precision_null": rep.code_precision_null_mean,
        "state_base_rate": rep.state_base_rate_mean,
        "states_classified": rep.states_classified,
        "swap_success": rep.intervention_state_codes_success_rate,
        "swap_jsd": rep.intervention_state_codes_jsd_normalised,
        "swap_clean_success": rep.intervention_state_codes["clean"]["success_rate"],
        "features_changed": rep.intervention_codes_changed_mean,
        "features_active": rep.intervention_active_codes_mean,
        "swap_single_site_best": rep.intervention_single_site_best_success_rate,
        "random_success": rep.intervention_random_codes_success_rate,
        "full_swap_success": rep.intervention_full_swap_success_rate,
        "pair_selection": rep.pair_selection,
    }
    return row, rep


def neuron_row(model: CodebookModel, fsm: TokFSM, tokens: torch.Tensor, settings: Settings,
               target_recall: np.ndarray, batch_size: int = 64) -> dict[str, Any]:
    """The ``neuron`` row: the base model's own units at each site (``IdentityLayer``s),
    each state's best unit and threshold chosen on the selection half at ``target_recall``
    (per state: the codebook's best code's recall), scored on the test half. Reconstruction is
    exact (FVE 1, nothing spliced); L0 counts the non-zero units per token."""
    names = list(model.codebooks)
    data = collect_state_data(model, fsm, tokens, names, residual=False, batch_size=batch_size)
    sel_seq, _ = split_halves(tokens.shape[0], settings.seed, settings.test_fraction)
    sel = np.isin(data.rows, sel_seq)
    assert data.site_acts is not None
    res = neurons_held_out(data.site_acts, data.site_columns, data.labels, sel, ~sel,
                           np.asarray(target_recall, dtype=float))
    l0 = _mean((data.site_acts[:, lo:hi] != 0).sum(1).mean()
               for lo, hi in data.site_columns.values())
    width = _mean(hi - lo for lo, hi in data.site_columns.values())
    return {
        "method": "neuron", "l0": l0, "dictionary_size": width, "fve": 1.0,
        "dead_fraction": None, "ce_loss_recovered": 1.0, "kl": 0.0,
        "ce_loss_recovered_all": 1.0, "kl_all": 0.0,
        "first_transition_accuracy": first_transition_accuracy(model, fsm, tokens),
        "state_precision_test": precision_summary(res["precision_test"])["mean"],
        "state_precision_selection": res["summary"]["mean"],
        "state_precision_null": None, "swap_success": None, "swap_jsd": None,
        "features_changed": None, "features_active": None, "random_success": None,
        "full_swap_success": None, "swap_single_site_best": None,
        "note": "the site's own units; nothing to splice or swap",
    }


def markdown_table(rows: Sequence[Mapping[str, Any]], task: str = "fsm") -> str:
    """The rows as one Markdown table (``COLUMNS[task]``)."""
    columns = COLUMNS[task]
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "---|" * len(columns)
    lines = [head, rule]
    for row in rows:
        cells = []
        for key, _ in columns:
            if key == "features_changed":
                cells.append(_fmt(row.get(key)) + " / " + _fmt(row.get("features_active")))
            else:
                cells.append(_fmt(row.get(key)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}" if abs(v) < 0.01 else f"{v:.3f}"
    return str(v)


def _mean(values: Any) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(vals)) if vals else None
