"""Figures of the FSM analysis report (``codebook.analysis.fsm.run_fsm_analysis``).

Matplotlib's Agg canvas is used directly (no pyplot, no global backend switch), and every PNG
is written atomically: to a temporary file beside the target, then ``os.replace``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from codebook.io import atomic_write

__all__ = ["plot_code_vs_neuron_precision", "plot_feature_precision", "plot_intervention_by_site",
           "save_figure"]


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=dpi, bbox_inches="tight")
    return path


def _floats(values: Any) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def _mean_label(name: str, arr: np.ndarray) -> str:
    finite = arr[np.isfinite(arr)]
    return f"{name} (mean {finite.mean():.3f})" if finite.size else f"{name} (none)"


def plot_code_vs_neuron_precision(report: Mapping[str, Any],
                                  path: str | os.PathLike[str]) -> Path:
    """Per state: the best code's precision against the best neuron's at the same recall, on
    the held-out half where the report has it (chosen on the selection half).

    Left: states sorted by code precision, with the neuron baselines (site inputs, residual
    stream) at the same recall. Right: neuron vs code precision per state, with y = x.
    """
    per_state = report["per_state"]
    held = "code_precision_test" in per_state
    suffix = "_test" if held else ""
    code = _floats(per_state[f"code_precision{suffix}"])
    neuron = _floats(per_state[f"neuron_precision{suffix}"])
    resid = _floats(per_state.get(f"neuron_precision_residual{suffix}", [None] * len(code)))
    order = np.argsort(np.where(np.isfinite(code), code, -1.0), kind="stable")[::-1]
    x = np.arange(len(code))

    fig = Figure(figsize=(11, 4.2))
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
    ax1.plot(x, code[order], "o-", ms=3, lw=1, label=_mean_label("code", code))
    ax1.plot(x, neuron[order], "s", ms=3, alpha=0.8,
             label=_mean_label("neuron, site inputs", neuron))
    if np.isfinite(resid).any():
        ax1.plot(x, resid[order], "^", ms=3, alpha=0.8,
                 label=_mean_label("neuron, residual", resid))
    ax1.axhline(0.95, color="grey", ls=":", lw=1)
    ax1.set_xlabel("state (sorted by code precision)")
    ax1.set_ylabel("precision at the code's recall")
    ax1.set_ylim(-0.02, 1.02)
    ax1.legend(loc="lower left", fontsize=8)
    ax1.set_title("FSM states: best code vs best neuron"
                  + (" (held-out half)" if held else ""))

    ax2.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    ax2.scatter(code, neuron, s=12, label="site inputs")
    if np.isfinite(resid).any():
        ax2.scatter(code, resid, s=12, marker="^", label="residual")
    ax2.set_xlim(-0.02, 1.02)
    ax2.set_ylim(-0.02, 1.02)
    ax2.set_xlabel("code precision")
    ax2.set_ylabel("neuron precision")
    ax2.legend(loc="upper left", fontsize=8)
    ax2.set_aspect("equal")
    return save_figure(fig, path)


def plot_intervention_by_site(report: Mapping[str, Any],
                              path: str | os.PathLike[str]) -> Path:
    """Success rate and normalised JSD (to b's own next-state distribution) per patched site
    and for all sites at once: swapping only the state's dedicated codes (where the report has
    it) beside replacing every code (the full-swap control); the unpatched reference, the
    random-code control and b's own success (the ceiling) as lines."""
    full = report["intervention_by_site"]
    swap = report.get("intervention_state_codes") or {}
    swap_by = {**swap.get("by_site", {}), **({"all": swap["all"]} if "all" in swap else {})}
    names = [n for n in full if n != "all"] + (["all"] if "all" in full else [])
    bars = [("state codes: success", swap_by, "success_rate"),
            ("full swap: success", full, "success_rate"),
            ("state codes: JSD to b / ln 2", swap_by, "jsd_normalised"),
            ("full swap: JSD to b / ln 2", full, "jsd_normalised")]
    bars = [b for b in bars if b[1]]
    x = np.arange(len(names))
    width = 0.8 / len(bars)
    fig = Figure(figsize=(max(6.0, 0.7 * len(names) + 2), 4.2))
    ax = fig.subplots()
    for i, (label, table, key) in enumerate(bars):
        values = _floats([(table.get(n) or {}).get(key) for n in names])
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, np.nan_to_num(values), width, label=label)
    lines = [((report.get("intervention_clean") or {}).get("jsd_normalised"), "C2", "--",
              "JSD, no patch"),
             (((report.get("intervention_random_codes") or {}).get("all") or {})
              .get("success_rate"), "C3", "-.", "success, random codes (all sites)"),
             ((report.get("intervention_b_itself") or {}).get("success_rate"), "C0", ":",
              "success of b itself")]
    for value, color, style, label in lines:
        if value is not None and np.isfinite(float(value)):
            ax.axhline(float(value), color=color, ls=style, lw=1.2, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction")
    pairs = report.get("intervention_pairs") or []
    ax.set_title(f"Patching state b into state a ({len(pairs)} pairs, "
                 f"{report.get('pair_selection', '?')}; span state+next)")
    ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)


def plot_feature_precision(rows: list[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Bars per feature: best code's precision vs the best neuron's at the same recall."""
    names = [r["feature"] for r in rows]
    codes = _floats([r["code_precision"] for r in rows])
    neurons = _floats([r.get("neuron_precision") for r in rows])
    fig = Figure(figsize=(max(6.0, 0.6 * len(rows) + 2), 4))
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    ax.bar(x - 0.2, codes, 0.4, label=_mean_label("best code", codes))
    ax.bar(x + 0.2, np.nan_to_num(neurons), 0.4, label=_mean_label("best neuron, same recall",
                                                                   neurons))
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("precision")
    ax.set_title("Feature classifiers: codes vs neurons")
    ax.legend(loc="lower right")
    return save_figure(fig, path)
