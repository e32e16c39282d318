"""Codes and activations at state positions, codes as state classifiers, and the neuron
baseline at the codes' recall (conventions: ``codebook.analysis.fsm``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from codebook.analysis.classifiers import (
    best_code_per_label,
    code_feature_stats,
    precision_summary,
)
from codebook.analysis.fsm.common import as_tokens, device_of, eval_mode, progress
from codebook.analysis.labels import FSMStates, TokenRows, one_label
from codebook.analysis.neurons import best_neurons_at_recall
from codebook.data.fsm import TokFSM
from codebook.interventions import recording
from codebook.model import CodebookModel


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
    tok = as_tokens(tokens)
    names = list(sites) if sites is not None else list(model.codebooks)
    for name in names:
        model.site(name)
    rows = TokenRows.from_sequences(tok.numpy())
    labels_full = one_label(FSMStates(fsm).labels(rows)).reshape(tok.shape)
    state_pos = np.flatnonzero(labels_full[0] >= 0)
    if state_pos.size == 0:
        raise ValueError("tokens hold no FSM state: BOS-prefixed sequences of whole states "
                         f"expected, got shape {tuple(tok.shape)}")
    n, s = tok.shape[0], state_pos.size
    data = StateData(
        labels=labels_full[:, state_pos].reshape(-1),
        rows=np.repeat(np.arange(n), s),
        positions=np.tile(state_pos, n),
    )
    device = device_of(model)
    pos_t = torch.as_tensor(state_pos)
    code_parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    with eval_mode(model):
        for start in progress(range(0, n, batch_size), "FSM states", unit="batch"):
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
    """One batch's ``parts`` (one per name) side by side into rows ``[lo, hi)`` of
    ``data.<attr>``, made (with its column ranges) at the first batch."""
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
    recall, dedicated} arrays (C, S), ``best_site`` / ``best_group`` / ``best_code`` /
    ``precision`` / ``recall`` (S,) for the best code overall (site None, code -1, NaN where
    none is eligible), ``dedicated`` (S,) bool, ``states_with_dedicated_code``,
    ``dedicated_by_site`` {site: sorted states}, ``state_counts`` (S,) and ``code_precision``
    (``precision_summary``).
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
        "per_codebook": {"code": code_a, "precision": p_a, "recall": r_a,
                         "dedicated": dedicated_cb},
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


def neuron_baseline(
    acts: np.ndarray,
    columns: Mapping[str, tuple[int, int]],
    labels: np.ndarray,
    target_recall: np.ndarray,
) -> dict[str, Any]:
    """``neurons.best_neurons_at_recall`` over ``acts`` (M, D) whose column blocks are
    ``columns``, plus a readable neuron name ``"<block>:<index>"`` and a precision summary."""
    res = best_neurons_at_recall(acts, labels, target_recall)
    names: list[str | None] = []
    for j in res["neuron"]:
        name = None
        for block, (lo, hi) in columns.items():
            if lo <= j < hi:
                name = f"{block}:{int(j) - lo}"
        names.append(name)
    return {**res, "name": names, "summary": precision_summary(res["precision"])}
