"""The FSM experiment: next-state prediction, codes as state classifiers, and interventions.

Modules: ``scoring`` (next-state scores, transition accuracies), ``states`` (codes and
activations at state positions, codes as classifiers, the neuron baseline),
``interventions`` and ``report`` (the whole run and its typed report).

All functions run under ``torch.no_grad`` with the model in eval mode (its previous mode is
restored afterwards), in batches, on the model's device.

Conventions
-----------
* A *state position* is the position of the LAST digit of a state (``fsm.state_labels``); the
  next state's digits follow it. ``next_state_scores`` scores every state as the next one:
  ``log P(s) = sum_j log p(digit_j(s) | context, digit_<j(s))``, the conditionals read from the
  model's full-vocabulary softmax with the candidate's earlier digits teacher-forced. One
  forward pass per distinct ``(D-1)``-digit prefix of the states' spellings covers all ``D``
  conditionals (10 passes for the paper's 100 states and two digits, 1 pass for one digit).
  Without ``renormalise`` the scores are the model's raw log-probabilities: their logsumexp over
  states is ``<= 0``, with equality only when the model puts all its mass on digit sequences
  that spell a valid state (no BOS, no out-of-range spelling such as "57" with 12 states);
  ``renormalise=True`` turns them into the distribution over states conditioned on a valid
  state following (used for every JSD below). Rankings (top-E) are the same either way.
* Codes as classifiers (``classify_state_codes``): every (site, group) is a codebook; only state
  positions are counted. A state's best code in a codebook maximises precision among codes with
  recall >= ``min_recall`` (default 0.2; ties: higher recall). Without a recall floor a code
  that fires on a handful of tokens is trivially 100% precise; 0.2 keeps the comparison about
  codes covering a real share of the state's tokens, and the neuron baseline is matched at the
  very same recall, so the comparison stays fair at any floor. The state's best code overall is
  the most precise of its per-codebook bests (ties: higher recall, then codebook order). A code
  is *dedicated* to a state when it is that state's best code in its codebook and its precision
  is >= ``dedicated_precision`` (0.95).
* Neuron baseline: for each state, the best single neuron (either sign) with its threshold set
  so its recall equals the best code's recall (``codebook.analysis.neurons``, the same
  routine the store evaluation uses), over (a) the raw inputs of all codebook sites
  concatenated and (b) the residual stream (embedding output plus every layer's output, as
  ``output_hidden_states`` returns them, with the codebooks in effect).
* Interventions, on short inputs as in the reference: for an ordered pair ``(a, b)`` of
  distinct states that both have a dedicated code at the same site (``pair_selection=
  "dedicated"``; when there is none, e.g. for an untrained model, random pairs and
  ``"fallback"``), the model reads ``[BOS, digits of a, candidate prefix]``, and the codes at
  the patched positions are replaced by those it chooses on ``[BOS, digits of b, the same
  prefix]``: at one site, or at every site. Spans: ``"last"`` (a's last digit: the position
  that predicts the next state's first digit), ``"state"`` (all of a's digits) and
  ``"state+next"`` (also the next state's teacher-forced earlier digits, where its later
  digits are predicted; their codes are computed from the state, and without them layer-0
  attention there still reads a's digit embeddings, which no codebook covers). The headline
  is every site over ``"state+next"``. Success: the top-E predicted next states overlap b's E
  out-neighbours in at least ``success_overlap * E`` states (default 0.9: 9 of 10 in the
  paper's FSM); also reported: the mean overlap, the overlap with a's out-neighbours, the
  agreement with the model's own top-E for b, the JSD between the intervened next-state
  distribution and b's own (divided by ln 2), and the next-token JSD at a's last digit (the
  reference's measure). ``"clean"`` is the same measurement without a patch, ``"b_itself"``
  b's own prediction (the ceiling: success cannot beat how well the model knows b).

Part of ``codebook.analysis`` and imports as it may: the core and the rest of analysis.
"""

from codebook.analysis.fsm.interventions import intervention_experiment, select_pairs
from codebook.analysis.fsm.report import FSMReport, PerState, Settings, fsm_report, run_fsm_analysis
from codebook.analysis.fsm.scoring import (
    first_transition_accuracy,
    next_state_scores,
    transition_accuracy_all_positions,
)
from codebook.analysis.fsm.states import (
    StateData,
    classify_state_codes,
    collect_state_data,
    neuron_baseline,
)

__all__ = [
    "FSMReport",
    "PerState",
    "Settings",
    "StateData",
    "classify_state_codes",
    "collect_state_data",
    "first_transition_accuracy",
    "fsm_report",
    "intervention_experiment",
    "neuron_baseline",
    "next_state_scores",
    "run_fsm_analysis",
    "select_pairs",
    "transition_accuracy_all_positions",
]
