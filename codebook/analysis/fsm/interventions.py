"""Interventions: state b's codes patched into state a's input, and how far the prediction
moves towards b (conventions: ``codebook.analysis.fsm``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

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
from codebook.interventions import patch_codes, read_codes
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


def _short_scores(model: CodebookModel, fsm: TokFSM, x: torch.Tensor,
                  patch: Mapping[str, torch.Tensor], positions: Sequence[int],
                  batch_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """For :func:`_state_inputs` rows: the next-state distribution (n, S) as log-probs
    conditioned on a valid state following, and the next-token log-probs at the state's last
    digit (n, V); ``patch`` {site: source codes, row-aligned with ``x``} at ``positions``."""
    digits, prefixes, prefix_idx = state_spellings(fsm)
    n_prefix, d = len(prefixes), fsm.digits_per_state
    device = device_of(model)
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
    return logp - logsumexp(logp), np.concatenate(tokens)


def intervention_experiment(
    model: CodebookModel,
    fsm: TokFSM,
    pairs: Sequence[tuple[int, int]],
    sites: Sequence[str] | None = None,
    success_overlap: float = 0.9,
    batch_tokens: int = 1 << 15,
) -> dict[str, Any]:
    """Patch state b's codes into state a's input; see ``codebook.analysis.fsm``.

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
    _, prefixes, _ = state_spellings(fsm)
    d, e = fsm.digits_per_state, fsm.num_edges
    spans = {"last": [d], "state": list(range(1, d + 1)),
             "state+next": list(range(1, 2 * d))}
    x_a, x_b = _state_inputs(fsm, a, prefixes), _state_inputs(fsm, b, prefixes)
    with eval_mode(model):
        rows = max(1, batch_tokens // x_b.shape[1])
        source = _read_rows(model, x_b, names, rows)
        own, own_token = _short_scores(model, fsm, _state_inputs(
            fsm, np.arange(fsm.num_states), prefixes), {}, [], batch_tokens)
        need = hits_needed(success_overlap, e)
        own_top = top_mask(own, e)

        def metrics(logp: np.ndarray, token_lp: np.ndarray) -> dict[str, Any]:
            over_b = overlaps(fsm, logp, b)
            agree = (top_mask(logp, e) & own_top[b]).sum(axis=1) / e
            jsd = normalised_jsd(np.exp(logp), np.exp(own[b]), axis=1)
            tok_jsd = normalised_jsd(np.exp(token_lp), np.exp(own_token[b]), axis=1)
            return {
                "success_rate": float((over_b * e >= need - 1e-9).mean()),
                "mean_overlap": float(over_b.mean()),
                "overlap_with_a": float(overlaps(fsm, logp, a).mean()),
                "agreement_with_b": float(agree.mean()),
                "jsd_normalised": float(np.clip(jsd, 0.0, 1.0).mean()),
                "next_token_jsd_normalised": float(np.clip(tok_jsd, 0.0, 1.0).mean()),
                "n": len(a),
            }

        plan = [("clean", "", [], "last"),
                *(("by_span", span, names, span) for span in spans),
                *(("by_site", name, [name], "state+next") for name in names)]
        out: dict[str, Any] = {"clean": None, "by_span": {}, "by_site": {}}
        for group, key, patched, span in progress(plan, "interventions", unit="patch"):
            res = metrics(*_short_scores(model, fsm, x_a, {s: source[s] for s in patched},
                                         spans[span], batch_tokens))
            if group == "clean":
                out[group] = res
            else:
                out[group][key] = res
        return {**out, "b_itself": metrics(own[b], own_token[b]),
                "pairs": [(int(x), int(y)) for x, y in zip(a, b, strict=True)], "n": len(a)}


def _read_rows(model: CodebookModel, tok: torch.Tensor, names: list[str],
               batch_size: int) -> dict[str, torch.Tensor]:
    """Codes {site: (n, T, groups, k)} the model chooses on ``tok``, in batches."""
    device = device_of(model)
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for start in range(0, tok.shape[0], batch_size):
        rec = read_codes(model, tok[start : start + batch_size].to(device), sites=names)
        for n in names:
            parts[n].append(rec.codes[n].cpu())
    return {n: torch.cat(v) for n, v in parts.items()}
