"""Standard dictionary metrics of a codebook model, as SAELens ``evals.py`` / SAEBench "core"
compute them (../shared/reference/field-metrics.md), streamed over token batches.

Per site: L0 (active codes per token), FVE (fraction of variance explained:
``1 - sum||x - q||^2 / sum||x - mean(x)||^2`` over the tokens, ``x`` the site's input to its
codebook layer, ``q`` the layer's output), dead-code share and code frequencies; with
``site_metrics`` also, with ONLY that site's codebook on, its next-token CE loss, the CE loss
recovered ``(CE_zero - CE_site) / (CE_zero - CE_clean)`` and ``KL(clean || site)``. "Clean" is
the finetuned model with every codebook off (codebook models are finetuned, so the base model's
loss is reported apart, as ``ce_loss_base``); ``CE_zero`` zero-ablates the site (all heads of a
per-head site), with the other codebooks off: ``ablation = "zero"``, SAELens's convention.
Overall: CE with all codebooks on / off / of the base model, plain means over the sites, and
with ``site_metrics`` the same recovered CE and KL with every site on at once
(``ce_loss_recovered_all``, ``kl_all``; ``CE_zero`` then zero-ablates every site).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from codebook.interventions import recording
from codebook.model import CodebookModel

ABLATION = "zero"
SITE_KEYS = ("l0", "fve", "ce_loss", "ce_loss_recovered", "kl", "dead_fraction")
MEAN_KEYS = ("l0", "fve", "ce_loss_recovered", "kl")
Batch = torch.Tensor | Mapping[str, Any]  # input_ids, or {input_ids, attention_mask?, labels?}


@dataclass
class SiteMetrics:
    """One site's metrics (None: per-site passes not run)."""

    site: str
    l0: float
    fve: float
    mse: float  # mean ||x - q||^2 per token
    dead_fraction: float  # codes (over all groups) never chosen on the evaluated tokens
    ce_loss: float | None  # only this site's codebook on
    ce_loss_zero_ablation: float | None  # this site zeroed, the other codebooks off
    ce_loss_recovered: float | None
    kl: float | None  # mean per-token KL(clean || only this site on)
    groups: int
    num_codes: int
    frequencies: np.ndarray = field(repr=False)  # (groups * num_codes,) fires per token

    def row(self) -> dict[str, Any]:
        return {k: _num(v) for k, v in vars(self).items() if k != "frequencies"}


@dataclass
class DictionaryMetrics:
    """All metrics of one evaluation; ``to_dict()`` is the JSON summary, ``flat()`` the
    ``metrics/...`` keys for logging, ``rows()`` the per-site table."""

    tokens: int  # tokens whose activations were measured
    predicted_tokens: int  # next-token targets scored (padding and label -100 left out)
    ce_loss_on: float  # every codebook on
    ce_loss_off: float  # every codebook off: the finetuned weights alone ("clean")
    ce_loss_base: float | None  # the original base model, when one was given
    sites: dict[str, SiteMetrics]
    ablation: str = ABLATION
    ce_loss_zero_all: float | None = None  # every site zeroed at once
    ce_loss_recovered_all: float | None = None  # every codebook on at once
    kl_all: float | None = None  # mean per-token KL(clean || every codebook on)

    def mean(self, key: str) -> float | None:
        """Plain mean of a site metric over the sites (None where none has it)."""
        vals = [getattr(s, key) for s in self.sites.values() if getattr(s, key) is not None]
        return float(np.mean(vals)) if vals else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: _num(self.mean(k)) for k in MEAN_KEYS}
        out.update(ce_loss_on=_num(self.ce_loss_on), ce_loss_off=_num(self.ce_loss_off),
                   ce_loss_base=_num(self.ce_loss_base), ablation=self.ablation,
                   ce_loss_recovered_all=_num(self.ce_loss_recovered_all),
                   kl_all=_num(self.kl_all),
                   tokens=self.tokens, predicted_tokens=self.predicted_tokens)
        out["sites"] = {n: {k: _num(getattr(s, k)) for k in SITE_KEYS}
                        for n, s in self.sites.items()}
        return out

    def flat(self, prefix: str = "metrics") -> dict[str, float]:
        """``{prefix}/l0``, ``{prefix}/ce_loss_on``, ``{prefix}/<site>/fve``, ...; None left
        out, NaN kept."""
        out = {f"{prefix}/{k}": self.mean(k) for k in MEAN_KEYS}
        out.update({f"{prefix}/ce_loss_on": self.ce_loss_on,
                    f"{prefix}/ce_loss_off": self.ce_loss_off,
                    f"{prefix}/ce_loss_base": self.ce_loss_base,
                    f"{prefix}/tokens": float(self.tokens)})
        for name, s in self.sites.items():
            out.update({f"{prefix}/{name}/{k}": getattr(s, k) for k in (*SITE_KEYS, "mse")})
        return {k: float(v) for k, v in out.items() if v is not None}

    def rows(self) -> list[dict[str, Any]]:
        """One row per site (``pyarrow.Table.from_pylist`` / ``pandas.DataFrame`` ready)."""
        return [{**s.row(), "ablation": self.ablation, "tokens": self.tokens}
                for s in self.sites.values()]

    def histograms(self, bins: int = 20) -> dict[str, dict[str, Any]]:
        """Per site, a histogram of log10 code frequency over shared edges; codes that never
        fire are counted apart (``dead``)."""
        lo = math.floor(math.log10(1.0 / max(self.tokens, 1))) if self.tokens > 1 else -1
        edges = np.linspace(lo, 0.0, bins + 1)
        out = {}
        for name, s in self.sites.items():
            live = s.frequencies[s.frequencies > 0]
            counts, _ = np.histogram(np.log10(live), bins=edges)
            out[name] = {"edges": edges.tolist(), "counts": counts.tolist(),
                         "dead": int((s.frequencies == 0).sum()), "codes": int(s.frequencies.size)}
        return out


class MetricsAccumulator:
    """Streaming sums for :class:`DictionaryMetrics`: ``update`` per batch (no activations
    kept), ``all_reduce`` across ranks (every rank, same order), then ``result``."""

    def __init__(self, model: CodebookModel, sites: Sequence[str] | None = None,
                 base_model: nn.Module | None = None, site_metrics: bool = True):
        self.model, self.base, self.site_metrics = model, base_model, site_metrics
        self.sites = list(sites) if sites is not None else list(model.codebooks)
        for name in self.sites:
            model.site(name)  # a ConfigError listing the valid names
        dev = next(model.parameters()).device
        f64 = dict(dtype=torch.float64, device=dev)
        self.device = dev
        # ce_on, ce_off, ce_base, predicted, tokens, kl_all, ce_zero_all
        self.totals = torch.zeros(7, **f64)
        self.per_site = torch.zeros(len(self.sites), 6, **f64)  # x_sq, err, l0, ce, ce_zero, kl
        self.x_sum = {s: torch.zeros(model.codebooks[s].dim, **f64) for s in self.sites}
        self.counts = {s: torch.zeros(model.codebooks[s].groups * model.codebooks[s].num_codes,
                                      **f64) for s in self.sites}

    @torch.no_grad()
    def update(self, batch: Batch) -> torch.Tensor:
        """Run one batch (the model in eval mode); returns the all-codebooks-on logits."""
        ids, mask, targets = _inputs(batch, self.device)
        valid = targets != -100
        model, caught = self.model, {}
        hooks = [model.codebooks[s].register_forward_hook(_catch(caught, s)) for s in self.sites]
        try:
            with _codebooks(model, set(model.codebooks), track=None), \
                    recording(model, self.sites) as rec:
                logits = model(input_ids=ids).logits
        finally:
            for h in hooks:
                h.remove()
        flat_mask = mask.reshape(-1)
        for i, s in enumerate(self.sites):
            x, q = caught[s]
            x, q = x.reshape(-1, x.shape[-1])[flat_mask], q.reshape(-1, q.shape[-1])[flat_mask]
            x64 = x.double()
            self.x_sum[s] += x64.sum(0)
            self.per_site[i, 0] += x64.pow(2).sum()
            self.per_site[i, 1] += (x.float() - q.float()).double().pow(2).sum()
            codes = rec.codes[s]
            codes = codes.reshape(-1, *codes.shape[-2:])[flat_mask]  # (n, groups, slots)
            self.per_site[i, 2] += (codes >= 0).sum()
            layer = model.codebooks[s]
            offset = (torch.arange(layer.groups, device=codes.device) * layer.num_codes)
            ids_flat = (codes + offset.view(1, -1, 1))[codes >= 0]
            self.counts[s] += torch.bincount(ids_flat, minlength=self.counts[s].numel())
        self.totals[0] += _ce(logits, targets, valid)
        with _codebooks(model, set()):
            clean = model(input_ids=ids).logits
        self.totals[1] += _ce(clean, targets, valid)
        if self.base is not None:
            self.totals[2] += _ce(self.base(input_ids=ids).logits, targets, valid)
        self.totals[3] += valid.sum()
        self.totals[4] += mask.sum()
        if self.site_metrics:
            clean_logp = F.log_softmax(clean[:, :-1][valid].float(), -1)
            self.totals[5] += F.kl_div(F.log_softmax(logits[:, :-1][valid].float(), -1),
                                       clean_logp, reduction="sum", log_target=True)
            zeros = [model.codebooks[s].register_forward_hook(
                lambda m, args, out: torch.zeros_like(out)) for s in self.sites]
            try:
                with _codebooks(model, set()):
                    self.totals[6] += _ce(model(input_ids=ids).logits, targets, valid)
            finally:
                for h in zeros:
                    h.remove()
            for i, s in enumerate(self.sites):
                with _codebooks(model, {s}):
                    site = model(input_ids=ids).logits
                self.per_site[i, 3] += _ce(site, targets, valid)
                site_logp = F.log_softmax(site[:, :-1][valid].float(), -1)
                self.per_site[i, 5] += F.kl_div(site_logp, clean_logp, reduction="sum",
                                                log_target=True)
                zero = model.codebooks[s].register_forward_hook(
                    lambda m, args, out: torch.zeros_like(out))
                try:
                    with _codebooks(model, set()):
                        self.per_site[i, 4] += _ce(model(input_ids=ids).logits, targets, valid)
                finally:
                    zero.remove()
        return logits

    @property
    def tokens(self) -> int:
        return int(self.totals[4].item())

    def tensors(self) -> list[torch.Tensor]:
        """Every running sum, in a fixed order: adding them up over ranks merges the ranks."""
        return [self.totals, self.per_site, *self.x_sum.values(), *self.counts.values()]

    def all_reduce(self) -> None:
        """Sum every accumulator over the ranks of the default process group (if any)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for t in self.tensors():
                dist.all_reduce(t)

    def result(self) -> DictionaryMetrics:
        ce_on, ce_off, ce_base, pred, tokens, kl_all, ce_zero_all = self.totals.tolist()
        clean = _div(ce_off, pred)
        sites = {}
        for i, s in enumerate(self.sites):
            x_sq, err, l0, ce, ce_zero, kl = self.per_site[i].tolist()
            total_var = x_sq - float(self.x_sum[s].pow(2).sum()) / max(tokens, 1)
            counts = self.counts[s].cpu().numpy()
            layer = self.model.codebooks[s]
            site_ce, zero_ce = (_div(ce, pred), _div(ce_zero, pred)) if self.site_metrics \
                else (None, None)
            recovered = None if site_ce is None else _div(zero_ce - site_ce, zero_ce - clean)
            sites[s] = SiteMetrics(
                site=s, l0=_div(l0, tokens), fve=1.0 - _div(err, total_var),
                mse=_div(err, tokens), dead_fraction=float((counts == 0).mean()),
                ce_loss=site_ce, ce_loss_zero_ablation=zero_ce, ce_loss_recovered=recovered,
                kl=_div(kl, pred) if self.site_metrics else None, groups=layer.groups,
                num_codes=layer.num_codes, frequencies=counts / max(tokens, 1))
        on, zero_all = _div(ce_on, pred), _div(ce_zero_all, pred)
        extra = dict(ce_loss_zero_all=zero_all, kl_all=_div(kl_all, pred),
                     ce_loss_recovered_all=_div(zero_all - on, zero_all - clean)) \
            if self.site_metrics else {}
        return DictionaryMetrics(int(tokens), int(pred), on, clean,
                                 _div(ce_base, pred) if self.base is not None else None, sites,
                                 **extra)


@torch.no_grad()
def dictionary_metrics(model: CodebookModel, batches: Iterable[Batch], *,
                       base_model: nn.Module | None = None, sites: Sequence[str] | None = None,
                       site_metrics: bool = True,
                       max_tokens: int | None = None) -> DictionaryMetrics:
    """The dictionary metrics of ``model`` over ``batches`` (token id tensors (batch, seq), or
    dicts with ``input_ids`` and optional ``attention_mask`` (right padding) / ``labels``
    (-100 ignored)), on the model's device, in eval mode; stops once ``max_tokens`` real tokens
    are seen. ``sites``: the sites to report (default all; ``ce_loss_on`` has every codebook
    on). ``site_metrics=False`` skips the per-site CE / KL passes (2 forward passes per site
    and batch). ``base_model``: a plain HF causal LM of the same vocabulary (left in eval
    mode). No cross-rank
    reduction: use :class:`MetricsAccumulator` for that."""
    was_training = model.training
    model.eval()
    if base_model is not None:
        base_model.eval()
    acc = MetricsAccumulator(model, sites, base_model, site_metrics)
    try:
        for batch in batches:
            acc.update(batch)
            if max_tokens is not None and acc.tokens >= max_tokens:
                break
    finally:
        model.train(was_training)
    return acc.result()


def plot_code_frequencies(result: DictionaryMetrics, path: str | os.PathLike[str],
                          bins: int = 20) -> Path:
    """Per site, the share of codes per log10 frequency bin, dead codes as a point of their own
    left of the axis; written as a PNG (``codebook.analysis.plots.save_figure``)."""
    from matplotlib.figure import Figure

    from codebook.analysis.plots import save_figure

    hists = result.histograms(bins)
    fig = Figure(figsize=(8, 4.2))
    ax = fig.subplots()
    for name, h in hists.items():
        edges, codes = np.asarray(h["edges"]), max(h["codes"], 1)
        dead_x = edges[0] - 2 * (edges[1] - edges[0])
        line = ax.stairs(np.asarray(h["counts"]) / codes, edges, lw=1.2,
                         label=f"{name} (dead {h['dead'] / codes:.2f})")
        ax.plot([dead_x], [h["dead"] / codes], "o", color=line.get_edgecolor())
        decades = list(range(math.ceil(edges[0]), 1))
        ax.set_xticks([dead_x, *decades], ["dead", *map(str, decades)])
    ax.set_xlabel("log10 code frequency (fires per token)")
    ax.set_ylabel("share of codes")
    ax.set_title(f"Code frequencies over {result.tokens} tokens")
    if 0 < len(hists) <= 12:
        ax.legend(fontsize=7)
    return save_figure(fig, path)


# ---------------------------------------------------------------------- helpers
def _inputs(batch: Batch, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, token mask, next-token targets with -100 where not scored)."""
    get = batch.get if isinstance(batch, Mapping) else {"input_ids": batch}.get
    ids = torch.as_tensor(get("input_ids"), device=device).long()
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    am = get("attention_mask")
    mask = (torch.as_tensor(am, device=device).reshape(ids.shape).bool() if am is not None
            else torch.ones_like(ids, dtype=torch.bool))
    labels = get("labels")
    labels = ids.clone() if labels is None else torch.as_tensor(labels, device=device).long()
    labels = labels.reshape(ids.shape).masked_fill(~mask, -100)
    return ids, mask, labels[:, 1:]


def _ce(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the valid targets."""
    return F.cross_entropy(logits[:, :-1][valid].float(), targets[valid],
                           reduction="sum").double()


def _catch(store: dict[str, tuple[torch.Tensor, torch.Tensor]], name: str):
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        store[name] = (args[0].detach(), out.detach())
    return hook


@contextmanager
def _codebooks(model: CodebookModel, on: set[str], track: bool | None = False) -> Iterator[None]:
    """Only the codebooks in ``on`` enabled; ``track``: their statistics tracking (None: as
    it is), restored on exit."""
    before = {n: (layer.enabled, layer.track_stats) for n, layer in model.codebooks.items()}
    for n, layer in model.codebooks.items():
        layer.enabled = n in on
        if track is not None:
            layer.track_stats = track
    try:
        yield
    finally:
        for n, layer in model.codebooks.items():
            layer.enabled, layer.track_stats = before[n]


def _div(a: float, b: float) -> float:
    return a / b if b else math.nan


def _num(v: Any) -> Any:
    """NaN -> None (JSON), numpy scalars -> Python."""
    if isinstance(v, float | np.floating):
        return None if math.isnan(v) else float(v)
    return v.item() if isinstance(v, np.generic) else v
