"""Interventions: state b's codes patched into state a's input, and how far the prediction
moves towards b (conventions: ``codebook.analysis.fsm``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from typing import Any, NamedTuple

import numpy as np
import torch

from codebook.analysis.classifiers import normalised_jsd
from codebook.analysis.fsm.common import (
    device_of,
    eval_mode,
    hits_needed,
    logsumexp,
    overlaps,
    progress,
    state_spellings,
    top_mask,
)
from codebook.data.fsm import TokFSM
from codebook.interventions import patch_codes, read_codes, swap_codes
from codebook.model import CodebookModel


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


Edit = Callable[[ExitStack, int, int], list[list[torch.Tensor]]]


def _patch(source: Mapping[str, torch.Tensor], positions: Sequence[int],
           model: CodebookModel, values: Mapping[str, torch.Tensor] | None = None) -> Edit:
    """Every code at ``source``'s sites and ``positions`` taken from ``source`` (row-aligned),
    with its recorded ``values`` (an SAE latent's activation; codebook codes ignore them)."""
    def edit(stack: ExitStack, start: int, stop: int) -> list[list[torch.Tensor]]:
        device = device_of(model)
        for site, src in source.items():
            val = None if values is None else values[site][start:stop].to(device)
            stack.enter_context(patch_codes(model, site, src[start:stop].to(device),
                                            positions=list(positions), values=val))
        return []
    return edit


def _swap(tables: Mapping[str, tuple[torch.Tensor, torch.Tensor]], positions: Sequence[int],
          model: CodebookModel) -> Edit:
    """Per site, code ``old[row, g]`` -> ``new[row, g]`` where chosen (``swap_codes``)."""
    def edit(stack: ExitStack, start: int, stop: int) -> list[list[torch.Tensor]]:
        return [stack.enter_context(swap_codes(model, site, old[start:stop], new[start:stop],
                                               positions=list(positions)))
                for site, (old, new) in tables.items()]
    return edit


def _short_scores(model: CodebookModel, fsm: TokFSM, x: torch.Tensor, edit: Edit | None,
                  batch_tokens: int, last: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For rows ``[..., state's digits, candidate prefix q]`` (``n_prefix`` rows per input, the
    state's last digit at ``last``, default D as in :func:`_state_inputs`): the next-state
    distribution (n, S) as log-probs conditioned on a valid state following, the next-token
    log-probs at the state's last digit (n, V), and the code slots ``edit`` changed (n,)."""
    digits, prefixes, prefix_idx = state_spellings(fsm)
    n_prefix, d = len(prefixes), fsm.digits_per_state
    last = d if last is None else last
    device = device_of(model)
    per_pass = max(1, batch_tokens // (x.shape[1] * n_prefix)) * n_prefix
    states, tokens, changed = [], [], []
    for start in range(0, x.shape[0], per_pass):
        stop = min(start + per_pass, x.shape[0])
        with ExitStack() as stack:
            counts = edit(stack, start, stop) if edit else []
            lp = model.model(input_ids=x[start:stop].to(device)).logits
        changed.append(sum((c for cs in counts for c in cs), torch.zeros(stop - start)).numpy())
        lp = lp[:, last:].double().log_softmax(-1).cpu()
        lp = lp.view(-1, n_prefix, lp.shape[1], lp.shape[-1])
        total = torch.zeros((lp.shape[0], fsm.num_states), dtype=torch.float64)
        for j in range(d):  # digit j of the next state is predicted at position last + j
            total += lp[:, torch.as_tensor(prefix_idx), j, torch.as_tensor(digits[:, j])]
        states.append(total.numpy())
        tokens.append(lp[:, 0, 0].numpy())
    logp = np.concatenate(states)
    return logp - logsumexp(logp), np.concatenate(tokens), np.concatenate(changed)


def intervention_experiment(
    model: CodebookModel,
    fsm: TokFSM,
    pairs: Sequence[tuple[int, int]],
    sites: Sequence[str] | None = None,
    success_overlap: float = 0.9,
    batch_tokens: int = 1 << 15,
    dedicated: Mapping[str, np.ndarray] | None = None,
    context: tuple[Any, Sequence[int]] | None = None,
    seed: int = 0,
    max_context_states: int = 6,
    linked: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Patch state b into state a's input; see ``codebook.analysis.fsm``.

    Returns ``clean`` (no patch), ``by_span`` {span: metrics, every code of every site
    replaced by b's: the full-swap control}, ``by_site`` {site: the same at one site, span
    ``"state+next"``}, ``b_itself`` (b's own unpatched prediction: the ceiling), ``pairs`` and
    ``n``. Metrics: ``success_rate``, ``mean_overlap`` (with b's out-neighbours),
    ``overlap_with_a``, ``agreement_with_b`` (with the model's own top-E for b),
    ``jsd_normalised`` (next-state distribution vs b's) and ``next_token_jsd_normalised`` (at
    the state's last digit), ``codes_changed_mean`` (code slots the edit changed per input)
    and ``inputs_changed_rate`` (inputs with at least one slot changed); and against the same
    inputs unpatched, ``jsd_shift``: how much of the distance to b's distribution the patch
    closed (1 - JSD / JSD unpatched, per input, mean: 1 = at b's, 0 = unmoved, below 0 =
    further away; the paper's graded measure). A patch writes b's codes, and where a layer's
    features carry magnitudes (an SAE's latents) b's recorded values.

    With ``dedicated`` and ``linked`` ({site: (groups, S)} each state's best code in each
    codebook, whatever its precision) also ``dose`` on the short inputs: a's dedicated codes
    swapped for b's, then every state-linked code of a for b's, then b's codes patched in
    codebook by codebook (``sites:1`` .. ``sites:N``, forward order, cumulative), the last
    being the full swap.

    With ``dedicated`` ({site: (groups, S) code dedicated to each state in each codebook, -1
    none}) also ``state_codes`` {``by_site``, ``all``}: only a's dedicated codes are replaced,
    by b's dedicated code in the same codebook, over a's digits and the next state's earlier
    digits, everything else left alone; ``random_codes`` {``all``}: the same slots set to
    random codes instead (the control); ``state_codes_clean``: the same inputs unpatched; and
    ``active_codes_mean`` (code slots active over that span at all sites per input). With
    ``context`` (``(tokens, rows)``: sequences and the rows to use, e.g. the held-out half)
    these run in context, where the dedicated codes were found: each pair gets an occurrence
    of a at one of the first ``max_context_states`` states of a row, the sequence up to it is
    the input; without it, on the short inputs.
    """
    names = list(sites) if sites is not None else list(model.codebooks)
    if not pairs:
        raise ValueError("intervention_experiment needs at least one (a, b) pair")
    a = np.asarray([int(p[0]) for p in pairs])
    b = np.asarray([int(p[1]) for p in pairs])
    _, prefixes, _ = state_spellings(fsm)
    d, e = fsm.digits_per_state, fsm.num_edges
    spans = {"last": [d], "state": list(range(1, d + 1)),
             "state+next": list(range(1, 2 * d))}
    x_a, x_b = _state_inputs(fsm, a, prefixes), _state_inputs(fsm, b, prefixes)
    with eval_mode(model):
        rows = max(1, batch_tokens // x_b.shape[1])
        source, values = _read_rows(model, x_b, names, rows, scores=True)
        own, own_token, _ = _short_scores(model, fsm, _state_inputs(
            fsm, np.arange(fsm.num_states), prefixes), None, batch_tokens)
        score = _Scorer(fsm, own, own_token, hits_needed(success_overlap, e))
        full = spans["state+next"]
        plan: list[tuple[str, str, Edit | None]] = [("clean", "", None)]
        plan += [("by_span", key, _patch(source, spans[key], model, values)) for key in spans]
        plan += [("by_site", name, _patch({name: source[name]}, full, model, values))
                 for name in names]
        if dedicated is not None and linked is not None:
            n_prefix = len(prefixes)
            for key, table in (("dedicated", dedicated), ("linked", linked)):
                plan.append(("dose", key, _swap(
                    {n: _swap_tables(table[n], a, b, n_prefix) for n in names}, full, model)))
            plan += [("dose", f"sites:{j}", _patch({n: source[n] for n in names[:j]}, full,
                                                    model, values))
                     for j in range(1, len(names) + 1)]
        out: dict[str, Any] = {"clean": None, "by_span": {}, "by_site": {}, "dose": {}}
        clean_jsd = None
        for group, key, edit in progress(plan, "interventions", unit="patch"):
            logp, token_lp, changed = _short_scores(model, fsm, x_a, edit, batch_tokens)
            swapped = group == "dose" and key in ("dedicated", "linked")
            res = score(logp, token_lp, a, b, changed if swapped else None,
                        reference=clean_jsd)
            if group == "clean":
                out[group], clean_jsd = res, score.jsd(logp, b)
            else:
                out[group][key] = res
        out.update({"b_itself": score(own[b], own_token[b], b, b), "n": len(a),
                    "pairs": [(int(x), int(y)) for x, y in zip(a, b, strict=True)]})
        if dedicated is not None:
            rng = np.random.default_rng(seed)
            if context is None:
                inputs = [_SwapInputs(x_a, d, a, b, spans["state+next"])]
            else:
                inputs = _context_inputs(fsm, context, a, b, prefixes, max_context_states, rng)
            out.update(_state_code_swaps(model, inputs, names, dedicated, score, rng,
                                         batch_tokens, len(prefixes)))
        return out


class _Scorer:
    """The metrics of one intervention from its next-state and next-token log-probs."""

    def __init__(self, fsm: TokFSM, own: np.ndarray, own_token: np.ndarray, need: int):
        self.fsm, self.own, self.own_token, self.need = fsm, own, own_token, need
        self.own_top = top_mask(own, fsm.num_edges)

    def jsd(self, logp: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Per input, the normalised JSD of the next-state distribution to b's own."""
        return np.clip(normalised_jsd(np.exp(logp), np.exp(self.own[b]), axis=1), 0.0, 1.0)

    def __call__(self, logp: np.ndarray, token_lp: np.ndarray, a: np.ndarray, b: np.ndarray,
                 changed: np.ndarray | None = None, reference: np.ndarray | None = None
                 ) -> dict[str, Any]:
        """``reference``: the same inputs' per-input JSD unpatched (gives ``jsd_shift``)."""
        fsm, e = self.fsm, self.fsm.num_edges
        over_b = overlaps(fsm, logp, b)
        agree = (top_mask(logp, e) & self.own_top[b]).sum(axis=1) / e
        jsd = self.jsd(logp, b)
        tok_jsd = normalised_jsd(np.exp(token_lp), np.exp(self.own_token[b]), axis=1)
        shift = None
        if reference is not None:
            moved = reference > 1e-6
            shift = float((1 - jsd[moved] / reference[moved]).mean()) if moved.any() else None
        return {
            "success_rate": float((over_b * e >= self.need - 1e-9).mean()),
            "mean_overlap": float(over_b.mean()),
            "overlap_with_a": float(overlaps(fsm, logp, a).mean()),
            "agreement_with_b": float(agree.mean()),
            "jsd_normalised": float(jsd.mean()),
            "jsd_shift": shift,
            "next_token_jsd_normalised": float(np.clip(tok_jsd, 0.0, 1.0).mean()),
            "codes_changed_mean": None if changed is None else float(changed.mean()),
            "inputs_changed_rate": None if changed is None else float((changed > 0).mean()),
            "n": len(a),
        }


class _SwapInputs(NamedTuple):
    """Inputs sharing one layout: ``n_prefix`` rows per pair, a's last digit at ``last``."""

    x: torch.Tensor
    last: int
    a: np.ndarray
    b: np.ndarray
    span: list[int]


def _context_inputs(fsm: TokFSM, context: tuple[Any, Sequence[int]], a: np.ndarray,
                    b: np.ndarray, prefixes: np.ndarray, max_states: int,
                    rng: np.random.Generator) -> list[_SwapInputs]:
    """Per pair, a random occurrence of a among the first ``max_states`` states of the given
    rows; inputs = the sequence up to it + each candidate prefix, grouped by position."""
    tokens, rows = np.asarray(context[0]), np.asarray(context[1], dtype=np.int64)
    d = fsm.digits_per_state
    labels = fsm.state_labels(tokens[rows])
    positions = np.flatnonzero(labels[0] >= 0)[:max_states]
    where: dict[int, list[tuple[int, int]]] = {}
    for i, p in np.argwhere(labels[:, positions] >= 0):
        where.setdefault(int(labels[i, positions[p]]), []).append((int(rows[i]), int(positions[p])))
    by_pos: dict[int, list[tuple[int, int, int]]] = {}
    for pa, pb in zip(a, b, strict=True):
        found = where.get(int(pa))
        if found:
            row, pos = found[rng.integers(len(found))]
            by_pos.setdefault(pos, []).append((row, int(pa), int(pb)))
    out = []
    for pos, items in sorted(by_pos.items()):
        ctx = tokens[[r for r, _, _ in items], : pos + 1]
        x = np.concatenate([np.repeat(ctx, len(prefixes), axis=0),
                            np.tile(prefixes, (len(items), 1))], axis=1)
        out.append(_SwapInputs(torch.as_tensor(x), pos, np.asarray([i[1] for i in items]),
                               np.asarray([i[2] for i in items]),
                               list(range(pos - d + 1, pos + d))))
    return out


def _state_code_swaps(model: CodebookModel, inputs: list[_SwapInputs], names: list[str],
                      dedicated: Mapping[str, np.ndarray], score: _Scorer,
                      rng: np.random.Generator, batch_tokens: int, n_prefix: int
                      ) -> dict[str, Any]:
    """The state-code swap (per site, all sites), its random-code control and the unpatched
    reference, over ``inputs``."""
    results: dict[tuple[str, str], list[tuple[np.ndarray, ...]]] = {}
    active = []
    for inp in progress(inputs, "state-code swaps", unit="position"):
        state = {n: _swap_tables(dedicated[n], inp.a, inp.b, n_prefix) for n in names}
        randomised = {n: _random_tables(old, model.codebooks[n].num_codes, n_prefix, rng)
                      for n, (old, _) in state.items()}
        plan: list[tuple[str, str, Edit | None]] = [("state_codes_clean", "", None)]
        plan += [("state_codes", n, _swap({n: state[n]}, inp.span, model)) for n in names]
        plan += [("state_codes", "all", _swap(state, inp.span, model)),
                 ("random_codes", "all", _swap(randomised, inp.span, model))]
        for group, key, edit in plan:
            logp, token_lp, changed = _short_scores(model, score.fsm, inp.x, edit,
                                                    batch_tokens, last=inp.last)
            results.setdefault((group, key), []).append((logp, token_lp, changed))
        rows = max(1, batch_tokens // inp.x.shape[1])
        active.append(_active_codes(model, inp.x, names, inp.span, rows) * inp.x.shape[0])
    a = np.concatenate([inp.a for inp in inputs])
    b = np.concatenate([inp.b for inp in inputs])
    active_mean = float(sum(active) / sum(inp.x.shape[0] for inp in inputs))
    out: dict[str, Any] = {"state_codes": {"by_site": {}}, "random_codes": {"by_site": {}},
                           "active_codes_mean": active_mean}
    clean = np.concatenate([p[0] for p in results[("state_codes_clean", "")]])
    reference = score.jsd(clean, b)
    for (group, key), parts in results.items():
        logp, token_lp, changed = (np.concatenate(p) for p in zip(*parts, strict=True))
        res = score(logp, token_lp, a, b, None if group == "state_codes_clean" else changed,
                    reference=reference)
        if group == "state_codes_clean":
            out[group] = res
        elif key == "all":
            out[group]["all"] = {**res, "active_codes_mean": active_mean}
        else:
            out[group]["by_site"][key] = res
    return out


def _swap_tables(dedicated: np.ndarray, a: np.ndarray, b: np.ndarray, n_prefix: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(old, new) per input row (pair-major, ``n_prefix`` rows per pair) and group: a's
    dedicated code and b's in each codebook, -1 where either state has none."""
    ded = np.asarray(dedicated, dtype=np.int64)  # (groups, S)
    old, new = ded[:, a].T, ded[:, b].T  # (pairs, groups)
    none = (old < 0) | (new < 0)
    old, new = np.where(none, -1, old), np.where(none, -1, new)
    return (torch.as_tensor(np.repeat(old, n_prefix, axis=0)),
            torch.as_tensor(np.repeat(new, n_prefix, axis=0)))


def _random_tables(old: torch.Tensor, num_codes: int, n_prefix: int, rng: np.random.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same slots as ``old`` but each replaced by a random other code (one draw per pair,
    shared by its ``n_prefix`` rows): the random-code control."""
    per_pair = old[::n_prefix].numpy()
    draw = rng.integers(0, num_codes - 1, size=per_pair.shape)
    draw = draw + (draw >= per_pair)  # any code but the one it replaces
    new = np.where(per_pair >= 0, draw, -1)
    return old, torch.as_tensor(np.repeat(new, n_prefix, axis=0))


def _active_codes(model: CodebookModel, x: torch.Tensor, names: list[str], span: Sequence[int],
                  batch_size: int) -> float:
    """Mean code slots active over ``span`` at all ``names`` per row of ``x``."""
    codes = _read_rows(model, x, names, batch_size)
    pos = torch.as_tensor(list(span))
    per_row = sum(((c[:, pos] >= 0).flatten(1).sum(1) for c in codes.values()),
                  torch.zeros(x.shape[0], dtype=torch.long))
    return float(per_row.float().mean())


def _read_rows(model: CodebookModel, tok: torch.Tensor, names: list[str], batch_size: int,
               scores: bool = False) -> Any:
    """Codes {site: (n, T, groups, k)} the model chooses on ``tok``, in batches; with
    ``scores`` also their recorded scores (an SAE latent's: its value), as a pair."""
    device = device_of(model)
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    vals: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for start in range(0, tok.shape[0], batch_size):
        rec = read_codes(model, tok[start : start + batch_size].to(device), sites=names,
                         scores=scores)
        for n in names:
            parts[n].append(rec.codes[n].cpu())
            if scores:
                vals[n].append(rec.scores[n].cpu())
    codes = {n: torch.cat(v) for n, v in parts.items()}
    return (codes, {n: torch.cat(v) for n, v in vals.items()}) if scores else codes
