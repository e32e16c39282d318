"""Reading and steering codes: record active codes, force codes on, disable codes, patch codes.

Every intervention is a context manager that attaches an editor to one site's codebook layer and
removes it on exit; they compose, and work inside ``model.generate`` (positions are absolute and
KV-cache aware, so ``positions=None`` means every position, generated tokens included).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from codebook.errors import ConfigError
from codebook.layer import CodebookLayer
from codebook.model import CodebookModel

ForceMode = Literal["add", "replace", "overwrite"]
FORCE_MODES = ("add", "replace", "overwrite")


@dataclass
class CodeRecord:
    """Codes (and optionally raw inputs) per site from one forward pass."""

    codes: dict[str, torch.Tensor] = field(default_factory=dict)  # (batch, seq, groups, n), -1 pads
    activations: dict[str, torch.Tensor] = field(default_factory=dict)  # (batch, seq, dim)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # as codes; NaN where -1


@contextmanager
def recording(model: CodebookModel, sites: Sequence[str] | None = None,
              activations: bool = False, scores: bool = False) -> Iterator[CodeRecord]:
    """Record the codes chosen at ``sites`` (default all) during the enclosed forward passes,
    with ``scores`` each chosen code's similarity (``CodebookLayer.code_scores``).

    Several passes (e.g. generation steps) are concatenated along the sequence axis.
    """
    names = list(sites) if sites is not None else list(model.codebooks)
    layers = {n: _layer(model, n) for n in names}
    record = CodeRecord()
    for layer in layers.values():
        layer.recording, layer.record_inputs, layer.record_scores = True, activations, scores
        layer.recorded_codes, layer.recorded_inputs, layer.recorded_scores = [], [], []
    try:
        yield record
    finally:
        for name, layer in layers.items():
            if layer.recorded_codes:
                record.codes[name] = _cat_seq(layer.recorded_codes)
            if layer.recorded_inputs:
                record.activations[name] = _cat_seq(layer.recorded_inputs)
            if layer.recorded_scores:
                record.scores[name] = _cat_seq(layer.recorded_scores, float("nan"))
            layer.recording = layer.record_inputs = layer.record_scores = False
            layer.recorded_codes, layer.recorded_inputs, layer.recorded_scores = [], [], []


@torch.no_grad()
def read_codes(model: CodebookModel, input_ids: torch.Tensor, sites: Sequence[str] | None = None,
               activations: bool = False, scores: bool = False, **kwargs: Any) -> CodeRecord:
    """Run one batch; return per site the active code ids per token (and raw activations,
    and the codes' similarity scores)."""
    with recording(model, sites, activations, scores) as record:
        model(input_ids=input_ids, **kwargs)
    return record


# ---------------------------------------------------------------------- editors
class _Editor:
    def disabled_mask(self, layer: CodebookLayer) -> torch.Tensor | None:
        return None

    def edit(self, idx, weight, positions):
        return idx, weight


class _ForceEditor(_Editor):
    def __init__(self, codes: torch.Tensor, groups: list[int],
                 positions: torch.Tensor | None, mode: str):
        self.codes, self.groups, self.positions, self.mode = codes, groups, positions, mode

    def edit(self, idx, weight, positions):
        b, t, g, _ = idx.shape
        at = _position_mask(positions, self.positions)  # (t,)
        in_group = torch.zeros(g, dtype=torch.bool, device=idx.device)
        in_group[self.groups] = True
        where = at.view(1, t, 1) & in_group.view(1, 1, g)  # (1, t, g)
        if self.mode == "overwrite":
            return self._overwrite(idx, weight, where)
        m = self.codes.shape[-1]
        forced = self.codes.to(idx.device).view(1, 1, g, m).expand(b, t, g, m)
        forced_w = (self.codes.to(idx.device) >= 0).view(1, 1, g, m) & where.unsqueeze(-1)
        if self.mode == "replace":
            weight = weight & ~where.unsqueeze(-1)
        return (torch.cat([idx, forced.clamp_min(0)], -1),
                torch.cat([weight, forced_w.expand(b, t, g, m)], -1))

    def _overwrite(self, idx, weight, where):
        """Forced codes take the group's lowest-ranked slots (the last ones of the top-k)."""
        n = idx.shape[-1]
        codes = self.codes.to(idx.device)  # (g, m), -1 padded
        count = (codes >= 0).sum(-1, keepdim=True)  # (g, 1)
        slot = torch.arange(n, device=idx.device).view(1, n) - (n - count)  # (g, n)
        aligned = codes.gather(-1, slot.clamp(0, codes.shape[-1] - 1))
        aligned = aligned.masked_fill(slot < 0, -1)  # (g, n): right-aligned forced codes
        take = (aligned >= 0).unsqueeze(0).unsqueeze(0) & where.unsqueeze(-1)  # (1, t, g, n)
        return torch.where(take, aligned, idx), weight | take


class _DisableEditor(_Editor):
    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def disabled_mask(self, layer):
        return self.mask.to(layer.codes.device)


class _PatchEditor(_Editor):
    def __init__(self, source: torch.Tensor, positions: torch.Tensor | None,
                 values: torch.Tensor | None = None):
        self.source, self.positions = source, positions  # (b or 1, t_src, g, n)
        self.values = values  # as source: the recorded magnitudes (layers that have them)

    def edit(self, idx, weight, positions):
        b, t, g, _ = idx.shape
        src = self.source.to(idx.device)
        inside = positions < src.shape[1]
        at = _position_mask(positions, self.positions) & inside  # (t,)
        take = positions.clamp(max=src.shape[1] - 1)
        patched = src[:, take].expand(b, t, g, src.shape[-1])  # (b, t, g, n)
        patched_w = (patched >= 0) & at.view(1, t, 1, 1)
        weight = weight & ~at.view(1, t, 1, 1)
        return torch.cat([idx, patched.clamp_min(0)], -1), torch.cat([weight, patched_w], -1)


class _SwapEditor(_Editor):
    """Per row, group ``g``'s code ``old[row, g]`` becomes ``new[row, g]`` wherever it is chosen
    (at ``positions``); -1 in either leaves that group alone. Counts what it changed."""

    def __init__(self, old: torch.Tensor, new: torch.Tensor, positions: torch.Tensor | None):
        self.old, self.new, self.positions = old, new, positions  # (b, g)
        self.changed: list[torch.Tensor] = []  # (b,) slots changed, one entry per call

    def edit(self, idx, weight, positions):
        b, t, g, _ = idx.shape
        old, new = self.old.to(idx.device), self.new.to(idx.device)
        if old.shape != (b, g):
            raise ValueError(f"swap tables are {tuple(old.shape)}, the batch needs ({b}, {g})")
        at = _position_mask(positions, self.positions).view(1, t, 1, 1)
        live = ((old >= 0) & (new >= 0)).view(b, 1, g, 1)
        where = at & live & weight & (idx == old.view(b, 1, g, 1))
        self.changed.append(where.sum(dim=(1, 2, 3)).cpu())
        return torch.where(where, new.view(b, 1, g, 1).expand_as(idx), idx), weight


# ---------------------------------------------------------------------- public context managers
@contextmanager
def force_codes(model: CodebookModel, site: str, codes: Sequence[int] | dict[int, Sequence[int]],
                positions: Sequence[int] | None = None, groups: Sequence[int] | None = None,
                mode: ForceMode = "add") -> Iterator[None]:
    """Force ``codes`` on at ``site`` (all positions if ``positions`` is None).

    ``codes`` is a list applied to every group in ``groups`` (default: all groups), or a dict
    ``{group: [code, ...]}``. ``mode='add'`` adds them to the top-k codes; ``'replace'`` makes
    them the only codes at those positions and groups; ``'overwrite'`` puts them in place of the
    group's lowest-ranked codes, keeping k codes in all (the reference's steering: at most k).
    """
    layer = _layer(model, site)
    if mode not in FORCE_MODES:
        raise ConfigError("mode", f"unknown mode {mode!r}", f"use one of {FORCE_MODES}")
    per_group = codes if isinstance(codes, dict) else {
        g: codes for g in (range(layer.groups) if groups is None else groups)}
    for g, ids in per_group.items():
        _check_group(site, layer, g)
        _check_codes(site, layer, ids)
        if mode == "overwrite" and len(ids) > layer.k:
            raise ConfigError(
                f"codes for {site} group {g}", f"{len(ids)} codes to overwrite but k={layer.k}",
                "force at most k codes per group with mode='overwrite', or use mode='add'")
    width = max(len(ids) for ids in per_group.values())
    table = torch.full((layer.groups, width), -1, dtype=torch.long)
    for g, ids in per_group.items():
        table[g, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
    editor = _ForceEditor(table, sorted(per_group), _as_positions(positions), mode)
    with _attached(layer, editor):
        yield


@contextmanager
def disable_codes(model: CodebookModel, site: str, codes: Sequence[int],
                  groups: Sequence[int] | None = None) -> Iterator[None]:
    """Bar ``codes`` from selection at ``site``: the next-best codes are chosen instead."""
    layer = _layer(model, site)
    _check_codes(site, layer, codes)
    mask = torch.zeros(layer.groups, layer.num_codes, dtype=torch.bool)
    for g in range(layer.groups) if groups is None else groups:
        _check_group(site, layer, g)
        mask[g, list(codes)] = True
    with _attached(layer, _DisableEditor(mask)):
        yield


@contextmanager
def patch_codes(model: CodebookModel, site: str, source: CodeRecord | torch.Tensor,
                positions: Sequence[int] | None = None,
                values: torch.Tensor | None = None) -> Iterator[None]:
    """Replace all codes at ``site`` by those recorded on another input (same positions).

    ``values`` (shaped as the codes; a ``CodeRecord``'s scores by default) are the recorded
    magnitudes: a layer whose features carry one (an SAE's latents,
    ``codebook.compare.sparse_coder``) takes them as they were; a codebook's codes have none
    (each enters the sum once) and ignore them."""
    layer = _layer(model, site)
    codes = source.codes[site] if isinstance(source, CodeRecord) else source
    if values is None and isinstance(source, CodeRecord):
        values = source.scores.get(site)
    if codes.dim() != 4 or codes.shape[2] != layer.groups:
        raise ConfigError(
            "source", f"expected recorded codes (batch, seq, {layer.groups}, n) for {site}, "
            f"got shape {tuple(codes.shape)}", "pass read_codes(...) of the same model")
    if values is not None and values.shape != codes.shape:
        raise ConfigError("values", f"shape {tuple(values.shape)} differs from the codes' "
                          f"{tuple(codes.shape)}", "pass the scores recorded with the codes")
    _check_codes(site, layer, codes[codes >= 0].unique().tolist())
    with _attached(layer, _PatchEditor(codes, _as_positions(positions), values)):
        yield


@contextmanager
def swap_codes(model: CodebookModel, site: str, old: torch.Tensor, new: torch.Tensor,
               positions: Sequence[int] | None = None) -> Iterator[list[torch.Tensor]]:
    """Per batch row, put code ``new[row, g]`` wherever ``old[row, g]`` is chosen in group
    ``g`` of ``site`` (at ``positions``; -1 in ``old`` or ``new`` leaves the group alone); every
    other code stays. Yields a list that gets, per forward call, the (batch,) count of code
    slots changed."""
    layer = _layer(model, site)
    old, new = torch.as_tensor(old, dtype=torch.long), torch.as_tensor(new, dtype=torch.long)
    if old.dim() != 2 or old.shape != new.shape or old.shape[1] != layer.groups:
        raise ConfigError("old/new", f"expected two (batch, {layer.groups}) tables for {site}, "
                          f"got {tuple(old.shape)} and {tuple(new.shape)}",
                          "give one code id (or -1) per batch row and group")
    _check_codes(site, layer, torch.cat([old, new])[torch.cat([old, new]) >= 0].unique().tolist())
    editor = _SwapEditor(old, new, _as_positions(positions))
    with _attached(layer, editor):
        yield editor.changed


@contextmanager
def force_codes_at_sites(model: CodebookModel,
                         codes_by_site: dict[str, Sequence[int] | dict[int, Sequence[int]]],
                         mode: ForceMode = "add") -> Iterator[None]:
    """Force codes on at several sites at every position (topic steering during generation)."""
    with ExitStack() as stack:
        for site, codes in codes_by_site.items():
            stack.enter_context(force_codes(model, site, codes, mode=mode))
        yield


# ---------------------------------------------------------------------- helpers
def _layer(model: CodebookModel, site: str) -> CodebookLayer:
    model.site(site)  # clear error for unknown names
    return model.codebooks[site]


def _check_codes(site: str, layer: CodebookLayer, ids: Sequence[int]) -> None:
    bad = [int(i) for i in ids if not 0 <= int(i) < layer.num_codes]
    if bad:
        raise ConfigError(f"codes[{site}]", f"code ids {bad[:5]} out of range",
                          f"use ids in 0..{layer.num_codes - 1}")


def _check_group(site: str, layer: CodebookLayer, g: int) -> None:
    if not 0 <= g < layer.groups:
        raise ConfigError(f"groups[{site}]", f"group {g} out of range",
                          f"use groups in 0..{layer.groups - 1}")


def _as_positions(positions: Sequence[int] | None) -> torch.Tensor | None:
    return None if positions is None else torch.as_tensor(list(positions), dtype=torch.long)


def _position_mask(positions: torch.Tensor, chosen: torch.Tensor | None) -> torch.Tensor:
    if chosen is None:
        return torch.ones_like(positions, dtype=torch.bool)
    return torch.isin(positions, chosen.to(positions.device))


@contextmanager
def _attached(layer: CodebookLayer, editor: _Editor) -> Iterator[None]:
    layer.editors.append(editor)
    try:
        yield
    finally:
        layer.editors.remove(editor)


def _cat_seq(chunks: list[torch.Tensor], pad: float = -1) -> torch.Tensor:
    """Concatenate per-call recordings along the sequence axis (padding widths with ``pad``)."""
    if len(chunks) == 1:
        return chunks[0]
    if chunks[0].dim() == 4:
        width = max(c.shape[-1] for c in chunks)
        chunks = [torch.nn.functional.pad(c, (0, width - c.shape[-1]), value=pad) for c in chunks]
    return torch.cat(chunks, dim=1)
