"""The FSM experiment: next-state prediction, codes as state classifiers, and interventions.

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
  so its recall equals the best code's recall (``classifiers.neuron_precisions_at_recall``
  semantics, computed with one sort per neuron), over (a) the raw inputs of all codebook
  sites concatenated and (b) the residual stream (embedding output plus every layer's output,
  as ``output_hidden_states`` returns them, with the codebooks in effect).
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
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from codebook.analysis.classifiers import (
    best_code_per_label,
    code_feature_stats,
    normalised_jsd,
    precision_summary,
)
from codebook.data.fsm import TokFSM
from codebook.interventions import patch_codes, read_codes, recording
from codebook.model import CodebookModel

__all__ = [
    "StateData",
    "best_neurons_at_recall",
    "classify_state_codes",
    "code_state_classification",
    "collect_state_data",
    "first_transition_accuracy",
    "intervention_experiment",
    "neuron_baseline",
    "next_state_scores",
    "run_fsm_analysis",
    "select_pairs",
    "transition_accuracy_all_positions",
]

_CHUNK_ELEMENTS = 1 << 24  # activations sorted per chunk of neurons (~64 MB of float32)


# ---------------------------------------------------------------------- helpers
@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _tokens(tokens: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(tokens) if not torch.is_tensor(tokens) else tokens)
    if t.dim() != 2:
        raise ValueError(f"tokens must be (n, seq_len), got shape {tuple(t.shape)}")
    return t.to(torch.long).cpu()


def _state_spellings(fsm: TokFSM) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Digits (S, D), distinct (D-1)-digit prefixes (P, D-1), prefix index per state (S,)."""
    digits = fsm.encode_states(np.arange(fsm.num_states)[:, None])
    d = fsm.digits_per_state
    if d == 1:
        return digits, np.zeros((1, 0), dtype=np.int64), np.zeros(fsm.num_states, np.int64)
    prefixes, inverse = np.unique(digits[:, : d - 1], axis=0, return_inverse=True)
    return digits, prefixes.astype(np.int64), np.asarray(inverse, dtype=np.int64).ravel()


def _hits_needed(fraction: float, e: int) -> int:
    return min(e, max(1, math.ceil(fraction * e - 1e-9)))


def _top_mask(scores: np.ndarray, e: int) -> np.ndarray:
    """(n, S) boolean: the top-``e`` entries of each row."""
    mask = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(mask, np.argpartition(-scores, e - 1, axis=1)[:, :e], True, axis=1)
    return mask


def _overlaps(fsm: TokFSM, scores: np.ndarray, states: np.ndarray) -> np.ndarray:
    """Per row: |top-E scored states & out-neighbours(states)| / E."""
    e = fsm.num_edges
    return (_top_mask(scores, e) & (fsm.adjacency[np.asarray(states)] > 0)).sum(axis=1) / e


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


# ---------------------------------------------------------------------- next-state scores
def next_state_scores(
    model: CodebookModel,
    fsm: TokFSM,
    tokens: Any,
    positions: Any,
    *,
    renormalise: bool = False,
    kv_cache: bool = True,
    batch_tokens: int = 1 << 15,
) -> np.ndarray:
    """Log-probability of every state being the next one after ``positions``: (n, num_states).

    ``tokens`` (n, T) BOS-prefixed sequences; ``positions`` (n,) or a scalar: the last digit of
    the current state in each row (a multiple of ``D``; 0 = BOS scores the first state). Tokens
    after a row's position are ignored (the candidate digits are teacher-forced there), so a
    position may be the last one of the sequence. See the module docstring for the
    normalisation. Rows are processed in passes of about ``batch_tokens`` tokens.

    ``kv_cache=True`` runs each context once and the ``(D-1)``-digit candidate prefixes from its
    key/value cache (the cache repeated per prefix, keys after a row's own position masked out,
    rotary/absolute positions given explicitly): about ``P`` times cheaper than
    ``kv_cache=False``, which runs context + prefix afresh for each of the ``P`` prefixes. Both
    give the same scores.
    """
    tok = _tokens(tokens)
    n, seq_len = tok.shape
    d = fsm.digits_per_state
    pos = np.broadcast_to(np.asarray(positions, dtype=np.int64), (n,)).copy()
    if n == 0:
        return np.empty((0, fsm.num_states))
    if (pos < 0).any() or (pos >= seq_len).any() or (pos % d).any():
        raise ValueError(
            f"positions must be state positions: multiples of {d} in [0, {seq_len})"
        )
    digits, prefixes, prefix_idx = _state_spellings(fsm)
    n_prefix = len(prefixes)
    device = _device(model)
    out = np.empty((n, fsm.num_states), dtype=np.float64)
    order = np.argsort(pos, kind="stable")  # similar positions together: shorter inputs
    state_digit = torch.as_tensor(digits)
    state_prefix = torch.as_tensor(prefix_idx)
    # Tokens a row costs: P copies of context + prefix (plain), or P copies of its cache.
    cost = n_prefix * (pos[order] + d)
    start = 0
    with _eval_mode(model):
        while start < n:
            stop = start + 1  # positions ascend along ``order``: the last row is the longest
            while stop < n and (stop - start + 1) * cost[stop] <= batch_tokens:
                stop += 1
            chunk = order[start:stop]
            start = stop
            if kv_cache:
                lp = _cached_pass(model, tok, chunk, pos[chunk], prefixes, d, device)
            else:
                lp = _plain_pass(model, tok, chunk, pos[chunk], prefixes, d, device)
            c = len(chunk)
            lp = lp.view(c, n_prefix, d, -1)
            total = torch.zeros((c, fsm.num_states), dtype=torch.float64)
            for j in range(d):
                total += lp[:, state_prefix, j, state_digit[:, j]]
            out[chunk] = total.numpy()
    if renormalise:
        out = out - _logsumexp(out)
    return out


def _plain_pass(model, tok, chunk, cp, prefixes, d, device) -> torch.Tensor:
    """(c * P, D, V) log-probs: context + each prefix run afresh."""
    n_prefix = len(prefixes)
    c, seq_len = len(chunk), tok.shape[1]
    length = int(cp.max()) + d
    x = torch.zeros((c, length), dtype=torch.long)
    keep = min(length, seq_len)
    x[:, :keep] = tok[torch.as_tensor(chunk), :keep]
    x = x.repeat_interleave(n_prefix, dim=0)  # row r * n_prefix + q
    rr = torch.as_tensor(np.repeat(cp, n_prefix))
    qq = torch.arange(n_prefix).repeat(c)
    rows = torch.arange(c * n_prefix)
    for j in range(d - 1):
        x[rows, rr + 1 + j] = torch.as_tensor(prefixes[:, j])[qq]
    logits = model.model(input_ids=x.to(device)).logits
    read_at = rr[:, None] + torch.arange(d)[None, :]  # (c*P, D)
    lp = logits[rows[:, None].to(device), read_at.to(device)].double().log_softmax(-1)
    return lp.cpu()


def _cached_pass(model, tok, chunk, cp, prefixes, d, device) -> torch.Tensor:
    """(c * P, D, V) log-probs: the contexts once, then every prefix from the repeated cache."""
    n_prefix = len(prefixes)
    c = len(chunk)
    length = int(cp.max()) + 1
    x = tok[torch.as_tensor(chunk), :length].to(device)
    rows = torch.arange(c)
    res = model.model(input_ids=x, use_cache=d > 1)
    first = res.logits[rows.to(device), torch.as_tensor(cp).to(device)].double().log_softmax(-1)
    first = first.cpu().repeat_interleave(n_prefix, dim=0)[:, None]  # (c*P, 1, V)
    if d == 1:
        return first
    cache = getattr(res, "past_key_values", None) or getattr(res, "cache", None)
    del res
    cache.batch_repeat_interleave(n_prefix)
    rr = torch.as_tensor(np.repeat(cp, n_prefix))  # (c*P,)
    y = torch.as_tensor(prefixes).repeat(c, 1)  # (c*P, D-1), prefix q of row r at r*P + q
    mask = torch.ones((c * n_prefix, length + d - 1), dtype=torch.long)
    mask[:, :length] = (torch.arange(length)[None, :] <= rr[:, None]).long()
    pos_ids = rr[:, None] + 1 + torch.arange(d - 1)[None, :]
    logits = model.model(
        input_ids=y.to(device), attention_mask=mask.to(device), position_ids=pos_ids.to(device),
        use_cache=True, **_cache_kwarg(model.model, cache),
    ).logits
    rest = logits.double().log_softmax(-1).cpu()  # (c*P, D-1, V)
    return torch.cat([first, rest], dim=1)


def _cache_kwarg(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The KV cache under the keyword this transformers takes (``cache`` from 5.24 on;
    ``past_key_values`` before, deprecated since and going in 5.40)."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def first_transition_accuracy(
    model: CodebookModel, fsm: TokFSM, tokens: Any, batch_tokens: int = 1 << 15
) -> float:
    """Mean overlap of the top-E predicted next states after the FIRST state (position D) with
    its E true out-neighbours (``fsm.first_transition_accuracy``)."""
    tok = _tokens(tokens)
    d = fsm.digits_per_state
    scores = next_state_scores(model, fsm, tok[:, : 2 * d], d, batch_tokens=batch_tokens)
    first = fsm.decode_tokens(tok[:, 1 : 1 + d].numpy(), has_bos=False)[:, 0]
    return fsm.first_transition_accuracy(scores, first)


def transition_accuracy_all_positions(
    model: CodebookModel,
    fsm: TokFSM,
    tokens: Any,
    max_samples: int | None = 256,
    seed: int = 0,
    batch_tokens: int = 1 << 15,
) -> float:
    """Like :func:`first_transition_accuracy`, averaged over every state position but the last
    (whose next state is not in the sequence). ``max_samples`` (row, position) pairs are drawn
    uniformly without replacement (None: all; costs one pass per prefix per pair)."""
    tok = _tokens(tokens)
    labels = fsm.state_labels(tok.numpy())
    state_pos = np.flatnonzero(labels[0] >= 0)[:-1]
    if state_pos.size == 0:
        raise ValueError("sequences need at least two states for transition accuracy")
    rows, cols = np.meshgrid(np.arange(tok.shape[0]), state_pos, indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    if max_samples is not None and rows.size > max_samples:
        pick = np.random.default_rng(seed).choice(rows.size, size=max_samples, replace=False)
        rows, cols = rows[pick], cols[pick]
    scores = next_state_scores(model, fsm, tok[torch.as_tensor(rows)], cols,
                               batch_tokens=batch_tokens)
    return fsm.first_transition_accuracy(scores, labels[rows, cols])


# ---------------------------------------------------------------------- reading states
@dataclass
class StateData:
    """Codes and activations at every state position of a set of sequences (M = rows x states).

    ``site_acts`` holds the raw inputs of all sites side by side (``site_columns[site]`` is its
    column range); ``residual`` the residual stream (``residual_columns[name]``, names
    ``hidden_0`` = embeddings ... ``hidden_L`` = last layer output, as the HF model's
    ``output_hidden_states`` gives them: for GPT-NeoX the last is after the final layer norm).
    """

    labels: np.ndarray  # (M,) state
    rows: np.ndarray  # (M,) sequence index
    positions: np.ndarray  # (M,) token position
    codes: dict[str, np.ndarray] = field(default_factory=dict)  # (M, groups, k), -1 inactive
    site_acts: np.ndarray | None = None  # (M, sum of site dims) float32
    site_columns: dict[str, tuple[int, int]] = field(default_factory=dict)
    residual: np.ndarray | None = None  # (M, (layers + 1) * hidden) float32
    residual_columns: dict[str, tuple[int, int]] = field(default_factory=dict)


def collect_state_data(
    model: CodebookModel,
    fsm: TokFSM,
    tokens: Any,
    sites: Sequence[str] | None = None,
    activations: bool = True,
    residual: bool = True,
    batch_size: int = 64,
) -> StateData:
    """One batched pass over ``tokens`` recording codes (and activations) at state positions."""
    tok = _tokens(tokens)
    names = list(sites) if sites is not None else list(model.codebooks)
    for name in names:
        model.site(name)
    labels_full = fsm.state_labels(tok.numpy())
    state_pos = np.flatnonzero(labels_full[0] >= 0)
    n, s = tok.shape[0], state_pos.size
    data = StateData(
        labels=labels_full[:, state_pos].reshape(-1),
        rows=np.repeat(np.arange(n), s),
        positions=np.tile(state_pos, n),
    )
    device = _device(model)
    pos_t = torch.as_tensor(state_pos)
    code_parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    with _eval_mode(model):
        for start in range(0, n, batch_size):
            x = tok[start : start + batch_size].to(device)
            lo, hi = start * s, (start + x.shape[0]) * s
            with recording(model, names, activations=activations) as rec:
                out = model.model(input_ids=x, output_hidden_states=residual)
            for name in names:
                codes = rec.codes[name][:, pos_t.to(device)].cpu().numpy()
                code_parts[name].append(codes.reshape(-1, *codes.shape[2:]))
            if activations:
                parts = [rec.activations[name][:, pos_t.to(device)] for name in names]
                _store(data, "site_acts", "site_columns", names, parts, n * s, lo, hi)
            if residual:
                hidden = out.hidden_states
                hnames = [f"hidden_{i}" for i in range(len(hidden))]
                parts = [h[:, pos_t.to(device)] for h in hidden]
                _store(data, "residual", "residual_columns", hnames, parts, n * s, lo, hi)
    for name, chunks in code_parts.items():  # interventions may widen some batches' code slots
        width = max(c.shape[-1] for c in chunks) if chunks else 1
        groups = model.codebooks[name].groups
        out = np.full((n * s, groups, width), -1, dtype=np.int64)
        row = 0
        for c in chunks:
            out[row : row + c.shape[0], :, : c.shape[-1]] = c
            row += c.shape[0]
        data.codes[name] = out
    return data


def _store(data: StateData, attr: str, cols_attr: str, names: list[str],
           parts: list[torch.Tensor], total: int, lo: int, hi: int) -> None:
    flat = [p.reshape(-1, p.shape[-1]).float().cpu().numpy() for p in parts]
    if getattr(data, attr) is None:
        widths = [f.shape[1] for f in flat]
        edges = np.concatenate([[0], np.cumsum(widths)])
        setattr(data, cols_attr, {nm: (int(edges[i]), int(edges[i + 1]))
                                  for i, nm in enumerate(names)})
        setattr(data, attr, np.empty((total, int(edges[-1])), dtype=np.float32))
    np.concatenate(flat, axis=1, out=getattr(data, attr)[lo:hi])


# ---------------------------------------------------------------------- codes as classifiers
def classify_state_codes(
    codes: Mapping[str, np.ndarray],
    labels: np.ndarray,
    num_states: int,
    num_codes: int | Mapping[str, int],
    min_recall: float = 0.2,
    dedicated_precision: float = 0.95,
) -> dict[str, Any]:
    """Best code per state in every codebook and overall, from codes at labelled positions.

    ``codes``: ``{site: (M, groups, k) or (M, k)}`` code ids (-1 inactive); ``labels`` (M,)
    state ids (-1 = not a state position: ignored). ``num_codes`` per site or for all.

    Returns ``codebooks`` (list of ``(site, group)``), ``per_codebook`` {code, precision,
    recall} arrays (C, S), ``best_site`` / ``best_group`` / ``best_code`` / ``precision`` /
    ``recall`` (S,) for the best code overall (site None, code -1, NaN where none is eligible),
    ``dedicated`` (S,) bool, ``states_with_dedicated_code``, ``dedicated_by_site`` {site: sorted
    states}, ``state_counts`` (S,) and ``code_precision`` (``precision_summary``).
    """
    labels = np.asarray(labels, dtype=np.int64).ravel()
    mask = labels >= 0
    names: list[tuple[str, int]] = []
    per_code, per_p, per_r = [], [], []
    for site, arr in codes.items():
        arr = np.asarray(arr)
        if arr.ndim == 2:
            arr = arr[:, None, :]
        if arr.ndim != 3 or arr.shape[0] != labels.size:
            raise ValueError(f"codes[{site!r}] must be (M, groups, k) with M={labels.size}, "
                             f"got shape {arr.shape}")
        size = num_codes if isinstance(num_codes, int) else int(num_codes[site])
        for g in range(arr.shape[1]):
            stats = code_feature_stats(arr[:, g, :], labels, size, num_states, mask)
            code, p, r = best_code_per_label(stats, min_recall=min_recall)
            names.append((site, g))
            per_code.append(code)
            per_p.append(p)
            per_r.append(r)
    counts = np.bincount(labels[mask], minlength=num_states)[:num_states]
    if not names:
        raise ValueError("classify_state_codes needs at least one codebook")
    code_a, p_a, r_a = np.stack(per_code), np.stack(per_p), np.stack(per_r)  # (C, S)
    # Most precise, ties to higher recall, then to the earlier codebook.
    key_p = np.where(np.isfinite(p_a), p_a, -np.inf)
    key_r = np.where(np.isfinite(r_a), r_a, -np.inf)
    best_cb = _best_rows(key_p, key_r)
    cols = np.arange(num_states)
    precision = p_a[best_cb, cols]
    has = np.isfinite(precision)
    recall = np.where(has, r_a[best_cb, cols], np.nan)
    best_code = np.where(has, code_a[best_cb, cols], -1)
    dedicated_cb = np.isfinite(p_a) & (p_a >= dedicated_precision)  # (C, S)
    dedicated = dedicated_cb.any(axis=0)
    by_site: dict[str, list[int]] = {}
    for i, (site, _) in enumerate(names):
        states = set(by_site.get(site, [])) | set(np.flatnonzero(dedicated_cb[i]).tolist())
        by_site[site] = sorted(states)
    return {
        "codebooks": names,
        "per_codebook": {"code": code_a, "precision": p_a, "recall": r_a},
        "best_site": [names[best_cb[s]][0] if has[s] else None for s in range(num_states)],
        "best_group": np.where(has, [names[best_cb[s]][1] for s in range(num_states)], -1),
        "best_code": best_code,
        "precision": precision,
        "recall": recall,
        "dedicated": dedicated,
        "states_with_dedicated_code": int(dedicated.sum()),
        "dedicated_by_site": by_site,
        "state_counts": counts,
        "code_precision": precision_summary(precision),
    }


def _best_rows(key_p: np.ndarray, key_r: np.ndarray) -> np.ndarray:
    """Per column, the row with the highest key_p, ties to higher key_r, then lower row."""
    best_p = key_p.max(axis=0)
    tied = key_p == best_p[None, :]
    return np.where(tied, key_r, -np.inf).argmax(axis=0)


def code_state_classification(
    model: CodebookModel,
    fsm: TokFSM,
    tokens: Any,
    sites: Sequence[str] | None = None,
    min_recall: float = 0.2,
    dedicated_precision: float = 0.95,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Read codes at every state position of ``tokens`` and run :func:`classify_state_codes`
    over every (site, group) codebook."""
    data = collect_state_data(model, fsm, tokens, sites, activations=False, residual=False,
                              batch_size=batch_size)
    sizes = {name: model.codebooks[name].num_codes for name in data.codes}
    return classify_state_codes(data.codes, data.labels, fsm.num_states, sizes, min_recall,
                                dedicated_precision)


# ---------------------------------------------------------------------- neuron baseline
def best_neurons_at_recall(
    acts: np.ndarray,
    labels: np.ndarray,
    target_recall: np.ndarray,
    both_signs: bool = True,
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> dict[str, np.ndarray]:
    """For every label ``s`` with a finite ``target_recall[s]``: the best single neuron.

    Same semantics as ``classifiers.neuron_precision_at_recall`` (threshold = the
    ``ceil(recall * P)``-th largest signed activation among the P positives, predicted positive
    where ``sign * a >= threshold``; ties to the lower neuron, then sign +1), but all labels at
    once: each neuron's column is sorted once and counted by binary search. ``labels`` (M,)
    with -1 = none (still counted as negatives). Returns ``precision``, ``neuron``, ``sign``,
    ``threshold`` arrays of length ``len(target_recall)`` (NaN / -1 / 0 where skipped).
    """
    acts = np.asarray(acts)
    labels = np.asarray(labels, dtype=np.int64).ravel()
    target = np.asarray(target_recall, dtype=np.float64).ravel()
    if acts.ndim != 2 or acts.shape[0] != labels.size:
        raise ValueError(f"acts must be (M, D) with M={labels.size}, got {acts.shape}")
    num = target.size
    prec = np.full(num, np.nan)
    neuron = np.full(num, -1, dtype=np.int64)
    sign_out = np.zeros(num, dtype=np.int64)
    thr_out = np.full(num, np.nan)
    m_total, dim = acts.shape
    todo, pos_rows, needed = [], [], []
    for s in range(num):
        if not np.isfinite(target[s]):
            continue
        rows = np.flatnonzero(labels == s)
        if rows.size == 0:
            continue
        if not 0.0 < target[s] <= 1.0:
            raise ValueError(f"target_recall[{s}]={target[s]} must be in (0, 1]")
        todo.append(s)
        pos_rows.append(rows)
        needed.append(min(max(math.ceil(target[s] * rows.size - 1e-9), 1), rows.size))
    if not todo or dim == 0:
        return {"precision": prec, "neuron": neuron, "sign": sign_out, "threshold": thr_out}
    signs = (1, -1) if both_signs else (1,)
    best = np.full((len(todo),), -1.0)
    chunk = max(1, chunk_elements // max(m_total, 1))
    for start in range(0, dim, chunk):
        stop = min(start + chunk, dim)
        block = np.ascontiguousarray(acts[:, start:stop], dtype=np.float32)
        sorted_cols = np.sort(block.T, axis=1)  # (chunk, M)
        for sign in signs:
            thr = np.empty((len(todo), stop - start), dtype=np.float32)
            n_pos = np.empty((len(todo), stop - start), dtype=np.int64)
            for i, rows in enumerate(pos_rows):
                pos = block[rows] if sign == 1 else -block[rows]
                t = np.partition(pos, rows.size - needed[i], axis=0)[rows.size - needed[i]]
                thr[i] = t
                n_pos[i] = (pos >= t[None, :]).sum(axis=0)
            n_above = np.empty_like(n_pos)
            for j in range(stop - start):
                col = sorted_cols[j]
                if sign == 1:
                    n_above[:, j] = m_total - np.searchsorted(col, thr[:, j], side="left")
                else:  # -a >= t  <=>  a <= -t
                    n_above[:, j] = np.searchsorted(col, -thr[:, j], side="right")
            p = n_pos / np.maximum(n_above, 1)
            j_best = p.argmax(axis=1)
            p_best = p[np.arange(len(todo)), j_best]
            better = p_best > best  # strict: earlier chunks (lower index) and sign +1 win ties
            for i in np.flatnonzero(better):
                s = todo[i]
                best[i] = p_best[i]
                prec[s], neuron[s], sign_out[s] = p_best[i], start + j_best[i], sign
                thr_out[s] = thr[i, j_best[i]]
    return {"precision": prec, "neuron": neuron, "sign": sign_out, "threshold": thr_out}


def neuron_baseline(
    acts: np.ndarray,
    columns: Mapping[str, tuple[int, int]],
    labels: np.ndarray,
    target_recall: np.ndarray,
) -> dict[str, Any]:
    """:func:`best_neurons_at_recall` plus a readable neuron name ``"<block>:<index>"``."""
    res = best_neurons_at_recall(acts, labels, target_recall)
    names: list[str | None] = []
    for j in res["neuron"]:
        name = None
        for block, (lo, hi) in columns.items():
            if lo <= j < hi:
                name = f"{block}:{int(j) - lo}"
        names.append(name)
    return {**res, "name": names, "summary": precision_summary(res["precision"])}


# ---------------------------------------------------------------------- interventions
def select_pairs(
    dedicated_by_site: Mapping[str, Sequence[int]],
    present_states: Sequence[int],
    max_pairs: int,
    rng: np.random.Generator,
) -> tuple[list[tuple[int, int]], str]:
    """Ordered pairs (a, b), a != b, both dedicated at one site and both in ``present_states``;
    up to ``max_pairs`` drawn at random. Falls back to random pairs of present states (and
    says so: ``"fallback"``) when there is no such pair."""
    present = set(int(s) for s in present_states)
    candidates: set[tuple[int, int]] = set()
    for states in dedicated_by_site.values():
        ok = sorted(present & set(int(s) for s in states))
        candidates.update((a, b) for a in ok for b in ok if a != b)
    mode = "dedicated"
    if not candidates:
        mode = "fallback"
        ok = sorted(present)
        candidates = {(a, b) for a in ok for b in ok if a != b}
    pool = sorted(candidates)
    if not pool or max_pairs <= 0:
        return [], mode
    pick = rng.choice(len(pool), size=min(max_pairs, len(pool)), replace=False)
    return [pool[i] for i in sorted(pick)], mode


def _state_inputs(fsm: TokFSM, states: np.ndarray, prefixes: np.ndarray) -> torch.Tensor:
    """Rows ``[BOS, digits of s, candidate prefix q]`` (n * P, 2D); row ``i * P + q``."""
    digits = fsm.encode_states(np.asarray(states, dtype=np.int64)[:, None])
    n, n_prefix = len(digits), len(prefixes)
    bos = np.full((n * n_prefix, 1), fsm.bos_token_id, dtype=np.int64)
    return torch.as_tensor(np.concatenate(
        [bos, np.repeat(digits, n_prefix, axis=0), np.tile(prefixes, (n, 1))], axis=1))


def _short_scores(model: CodebookModel, fsm: TokFSM, x: torch.Tensor,
                  patch: Mapping[str, torch.Tensor], positions: Sequence[int],
                  batch_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """For :func:`_state_inputs` rows: the next-state distribution (n, S) as log-probs
    conditioned on a valid state following, and the next-token log-probs at the state's last
    digit (n, V); ``patch`` {site: source codes, row-aligned with ``x``} at ``positions``."""
    digits, prefixes, prefix_idx = _state_spellings(fsm)
    n_prefix, d = len(prefixes), fsm.digits_per_state
    device = _device(model)
    per_pass = max(1, batch_tokens // (2 * d * n_prefix)) * n_prefix
    states, tokens = [], []
    for start in range(0, x.shape[0], per_pass):
        stop = min(start + per_pass, x.shape[0])
        with ExitStack() as stack:
            for site, src in patch.items():
                stack.enter_context(patch_codes(model, site, src[start:stop].to(device),
                                                positions=list(positions)))
            lp = model.model(input_ids=x[start:stop].to(device)).logits
        lp = lp.double().log_softmax(-1).cpu().view(-1, n_prefix, 2 * d, lp.shape[-1])
        total = torch.zeros((lp.shape[0], fsm.num_states), dtype=torch.float64)
        for j in range(d):  # digit j of the next state is predicted at position D + j
            total += lp[:, torch.as_tensor(prefix_idx), d + j, torch.as_tensor(digits[:, j])]
        states.append(total.numpy())
        tokens.append(lp[:, 0, d].numpy())
    logp = np.concatenate(states)
    return logp - _logsumexp(logp), np.concatenate(tokens)


def intervention_experiment(
    model: CodebookModel,
    fsm: TokFSM,
    pairs: Sequence[tuple[int, int]],
    sites: Sequence[str] | None = None,
    success_overlap: float = 0.9,
    batch_tokens: int = 1 << 15,
) -> dict[str, Any]:
    """Patch state b's codes into state a's input; see the module docstring.

    Returns ``clean`` (no patch), ``by_span`` {span: metrics, every site patched},
    ``by_site`` {site: metrics, span ``"state+next"``}, ``b_itself`` (b's own unpatched
    prediction scored the same way: the ceiling), ``pairs`` and ``n``. Metrics:
    ``success_rate``, ``mean_overlap`` (with b's out-neighbours), ``overlap_with_a``,
    ``agreement_with_b`` (with the model's own top-E for b), ``jsd_normalised`` (next-state
    distribution vs b's) and ``next_token_jsd_normalised`` (at the state's last digit).
    """
    names = list(sites) if sites is not None else list(model.codebooks)
    if not pairs:
        raise ValueError("intervention_experiment needs at least one (a, b) pair")
    a = np.asarray([int(p[0]) for p in pairs])
    b = np.asarray([int(p[1]) for p in pairs])
    _, prefixes, _ = _state_spellings(fsm)
    d, e = fsm.digits_per_state, fsm.num_edges
    spans = {"last": [d], "state": list(range(1, d + 1)),
             "state+next": list(range(1, 2 * d))}
    x_a, x_b = _state_inputs(fsm, a, prefixes), _state_inputs(fsm, b, prefixes)
    with _eval_mode(model):
        rows = max(1, batch_tokens // x_b.shape[1])
        source = _read_rows(model, x_b, names, rows)
        own, own_token = _short_scores(model, fsm, _state_inputs(
            fsm, np.arange(fsm.num_states), prefixes), {}, [], batch_tokens)
        need = _hits_needed(success_overlap, e)
        own_top = _top_mask(own, e)

        def metrics(logp: np.ndarray, token_lp: np.ndarray) -> dict[str, Any]:
            over_b = _overlaps(fsm, logp, b)
            agree = (_top_mask(logp, e) & own_top[b]).sum(axis=1) / e
            jsd = normalised_jsd(np.exp(logp), np.exp(own[b]), axis=1)
            tok_jsd = normalised_jsd(np.exp(token_lp), np.exp(own_token[b]), axis=1)
            return {
                "success_rate": float((over_b * e >= need - 1e-9).mean()),
                "mean_overlap": float(over_b.mean()),
                "overlap_with_a": float(_overlaps(fsm, logp, a).mean()),
                "agreement_with_b": float(agree.mean()),
                "jsd_normalised": float(np.clip(jsd, 0.0, 1.0).mean()),
                "next_token_jsd_normalised": float(np.clip(tok_jsd, 0.0, 1.0).mean()),
                "n": len(a),
            }

        def measure(patched: Sequence[str], span: str) -> dict[str, Any]:
            return metrics(*_short_scores(model, fsm, x_a, {s: source[s] for s in patched},
                                          spans[span], batch_tokens))

        return {
            "clean": measure([], "last"),
            "by_span": {span: measure(names, span) for span in spans},
            "by_site": {name: measure([name], "state+next") for name in names},
            "b_itself": metrics(own[b], own_token[b]),
            "pairs": [(int(x), int(y)) for x, y in zip(a, b, strict=True)],
            "n": len(a),
        }


def _read_rows(model: CodebookModel, tok: torch.Tensor, names: list[str],
               batch_size: int) -> dict[str, torch.Tensor]:
    device = _device(model)
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for start in range(0, tok.shape[0], batch_size):
        rec = read_codes(model, tok[start : start + batch_size].to(device), sites=names)
        for n in names:
            parts[n].append(rec.codes[n].cpu())
    return {n: torch.cat(v) for n, v in parts.items()}


# ---------------------------------------------------------------------- the whole experiment
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
    """The FSM experiment's JSON-able report (NaN -> None); see the module docstring.

    Top-level keys: ``first_transition_accuracy``, ``transition_accuracy_all_positions``,
    ``code_precision_{mean,median,frac_ge_095}``, ``code_recall_mean``,
    ``neuron_precision_{mean,median,frac_ge_095}`` (raw site inputs),
    ``neuron_precision_residual_{mean,median,frac_ge_095}``, ``states_with_dedicated_code``,
    ``intervention_success_rate`` / ``intervention_mean_overlap`` /
    ``intervention_agreement_with_b`` / ``intervention_jsd_normalised`` (every site patched
    over the span ``"state+next"``), ``intervention_last_position_next_token_jsd`` (every
    site patched at the last digit only, next-token JSD: the reference's measure),
    ``intervention_clean_*`` (no patch), ``intervention_b_itself_success_rate`` (the ceiling),
    ``intervention_by_span``, ``intervention_by_site`` {site: metrics, "all": ...},
    ``intervention_pairs``, ``pair_selection``, ``per_state`` (arrays over states for plots),
    ``settings``.
    """
    tok = _tokens(eval_tokens)
    names = list(sites) if sites is not None else list(model.codebooks)
    report: dict[str, Any] = {
        "num_sequences": int(tok.shape[0]),
        "num_states": fsm.num_states,
        "num_edges": fsm.num_edges,
        "sites": names,
        "settings": {
            "max_pairs": max_pairs, "seed": seed,
            "min_recall": min_recall, "dedicated_precision": dedicated_precision,
            "success_overlap": success_overlap, "all_positions_samples": all_positions_samples,
        },
    }
    report["first_transition_accuracy"] = first_transition_accuracy(
        model, fsm, tok, batch_tokens=batch_tokens)
    report["transition_accuracy_all_positions"] = transition_accuracy_all_positions(
        model, fsm, tok, max_samples=all_positions_samples, seed=seed,
        batch_tokens=batch_tokens)

    data = collect_state_data(model, fsm, tok, names,
                              batch_size=max(1, batch_tokens // tok.shape[1]))
    sizes = {name: model.codebooks[name].num_codes for name in names}
    cls = classify_state_codes(data.codes, data.labels, fsm.num_states, sizes, min_recall,
                               dedicated_precision)
    assert data.site_acts is not None and data.residual is not None
    nb_sites = neuron_baseline(data.site_acts, data.site_columns, data.labels, cls["recall"])
    nb_resid = neuron_baseline(data.residual, data.residual_columns, data.labels, cls["recall"])
    del data

    cp, ns, nr = cls["code_precision"], nb_sites["summary"], nb_resid["summary"]
    report.update({
        "code_precision_mean": cp["mean"], "code_precision_median": cp["median"],
        "code_precision_frac_ge_095": cp["frac_ge_095"],
        "code_recall_mean": precision_summary(cls["recall"])["mean"],
        "neuron_precision_mean": ns["mean"], "neuron_precision_median": ns["median"],
        "neuron_precision_frac_ge_095": ns["frac_ge_095"],
        "neuron_precision_residual_mean": nr["mean"],
        "neuron_precision_residual_median": nr["median"],
        "neuron_precision_residual_frac_ge_095": nr["frac_ge_095"],
        "states_with_dedicated_code": cls["states_with_dedicated_code"],
        "states_classified": cp["n"],
        "codebooks_considered": len(cls["codebooks"]),
    })

    rng = np.random.default_rng(seed)
    pairs, mode = select_pairs(cls["dedicated_by_site"], range(fsm.num_states), max_pairs, rng)
    inter = intervention_experiment(model, fsm, pairs, names, success_overlap, batch_tokens)
    headline = inter["by_span"]["state+next"]
    report.update({
        "intervention_success_rate": headline["success_rate"],
        "intervention_mean_overlap": headline["mean_overlap"],
        "intervention_agreement_with_b": headline["agreement_with_b"],
        "intervention_jsd_normalised": headline["jsd_normalised"],
        "intervention_last_position_next_token_jsd":
            inter["by_span"]["last"]["next_token_jsd_normalised"],
        "intervention_clean_success_rate": inter["clean"]["success_rate"],
        "intervention_clean_jsd_normalised": inter["clean"]["jsd_normalised"],
        "intervention_b_itself_success_rate": inter["b_itself"]["success_rate"],
        "intervention_by_span": inter["by_span"],
        "intervention_by_site": {**inter["by_site"], "all": headline},
        "intervention_clean": inter["clean"],
        "intervention_b_itself": inter["b_itself"],
        "intervention_pairs": [list(p) for p in inter["pairs"]],
        "pair_selection": mode,
    })
    report["per_state"] = {
        "state": np.arange(fsm.num_states),
        "count": cls["state_counts"],
        "code_site": cls["best_site"],
        "code_group": cls["best_group"],
        "code": cls["best_code"],
        "code_precision": cls["precision"],
        "code_recall": cls["recall"],
        "dedicated": cls["dedicated"],
        "neuron": nb_sites["name"],
        "neuron_precision": nb_sites["precision"],
        "neuron_residual": nb_resid["name"],
        "neuron_precision_residual": nb_resid["precision"],
    }
    return _clean(report)
