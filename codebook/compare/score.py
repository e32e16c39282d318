"""One scoring code for every method of the comparison (``codebook.compare.methods``): the FSM
report (``codebook.analysis.fsm``, held out: choices on the selection half, figures on the
test half) turned into one row per method, and the rows as a Markdown table.

Conventions, the same for every method:
- reconstruction: L0, FVE, dead share, and with only one site's dictionary spliced in (mean over
  sites) or all of them at once, CE loss recovered against zero ablation and KL to the same
  weights with every dictionary out (the field's convention: the frozen base for the
  cache-trained methods, the finetuned weights for ``codebook``); and, one reference for all,
  the CE loss with every dictionary in against the plain-finetune control's
  (``ce_gap_control``, ``codebook.compare.rows``);
- FSM states as classifiers: each state's best feature (a code, an SAE latent: "fires" = among
  the active top-k) with recall >= ``min_recall`` on the selection half, its precision on the
  test half; neurons at the recall of the codebook's best code per state (a threshold on one
  unit, chosen on the selection half);
- interventions: at an occurrence of state a in a test-half sequence, a's dedicated features
  (precision >= 0.95 on the selection half) are replaced by b's at every site where both have
  one (an SAE latent takes its mean active value, a's is zeroed); success, JSD to b, the share
  of the distance to b's distribution closed (``*_jsd_shift``), top-E overlap, and features
  changed against active features per input. The random-feature control changes the same slots
  to random features; ``dose``: the graded ladder (dedicated, every state-linked feature, b's
  features written site by site up to the full swap, where an SAE's latents carry b's recorded
  values). ``neuron`` has no sparse features to swap: None.
"""

from __future__ import annotations

import math
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
        "swap_jsd_shift": rep.intervention_state_codes_jsd_shift,
        "swap_overlap": rep.intervention_state_codes_mean_overlap,
        "full_swap_jsd_shift": rep.intervention_full_swap_jsd_shift,
        "random_jsd_shift": rep.intervention_random_codes_jsd_shift,
        "dose": {k: {"success": v["success_rate"], "jsd_shift": v["jsd_shift"],
                     "overlap": v["mean_overlap"], "changed": v.get("codes_changed_mean")}
                 for k, v in rep.intervention_dose.items()},
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
        "swap_jsd_shift": None, "full_swap_jsd_shift": None, "random_jsd_shift": None,
        "features_changed": None, "features_active": None, "random_success": None,
        "full_swap_success": None, "swap_single_site_best": None,
        "note": "the site's own units; nothing to splice or swap",
    }


def _mean(values: Any) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(vals)) if vals else None
