"""The comparison's rows over seeds and sparsity points: means with 95% intervals, the tables,
and the sparsity curves.

A method's headline row is the mean over its seeds with a t-interval (95%, n - 1 degrees of
freedom); two methods differ on a metric only where their intervals do not overlap
(``differs``). Regex precision is also averaged over the features every method covers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# two-sided 95% quantiles of Student's t by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228}

HEADLINE = (  # (key, header) in every task's headline table
    ("method", "method"), ("seeds", "seeds"), ("l0", "L0"), ("fve", "FVE"),
    ("ce_loss_recovered_all", "CE rec. (all)"), ("ce_gap_control", "CE - control (all)"),
    ("dead_fraction", "dead (eval)"), ("dead_fraction_train", "dead (train window)"),
    ("train_tokens", "train tokens"), ("train_seconds", "train s"),
    ("stopped_early", "stopped early"))
TASK = {
    "fsm": (("first_transition_accuracy", "FTA"), ("state_precision_test", "state prec. (test)"),
            ("swap_success", "swap success"), ("swap_jsd_shift", "swap JSD shift"),
            ("full_swap_jsd_shift", "full-swap JSD shift"),
            ("random_jsd_shift", "random-ctrl JSD shift")),
    "text": (("regex_precision_common", "regex prec. (common)"),
             ("regex_f1_test", "regex F1 (test)"), ("regex_coverage", "coverage"),
             ("steering_rate", "steering rate (test)"),
             ("steering_topics_ge_060", "topics >= 0.6")),
}
CURVE = (("method", "method"), ("multiple", "L0 x"), ("l0", "L0"), ("fve", "FVE"),
         ("ce_loss_recovered_all", "CE rec. (all)"), ("ce_gap_control", "CE - control (all)"),
         ("dead_fraction_train", "dead (train window)"), ("train_tokens", "train tokens"),
         ("stopped_early", "stopped early"))


def mean_interval(values: Sequence[float | None]) -> tuple[float, float, int]:
    """Mean, 95% t-interval half-width (NaN for one value) and count of the finite values."""
    vals = np.asarray([float(v) for v in values if _finite(v)], dtype=float)
    if not vals.size:
        return math.nan, math.nan, 0
    if vals.size == 1:
        return float(vals[0]), math.nan, 1
    half = _T95.get(vals.size - 1, 1.96) * vals.std(ddof=1) / math.sqrt(vals.size)
    return float(vals.mean()), float(half), int(vals.size)


def differs(a: tuple[float, float, int], b: tuple[float, float, int]) -> bool:
    """Whether two (mean, half-width, n) intervals are apart (both need n >= 2)."""
    if a[2] < 2 or b[2] < 2:
        return False
    return a[0] - a[1] > b[0] + b[1] or b[0] - b[1] > a[0] + a[1]


def over_seeds(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One row from a method's per-seed rows: every numeric key as its mean, with
    ``<key>_ci`` (the 95% half-width) and ``seeds``."""
    out: dict[str, Any] = {"method": rows[0]["method"], "seeds": len(rows),
                           "multiple": rows[0].get("multiple", 1)}
    keys = {k for r in rows for k, v in r.items() if isinstance(v, int | float)
            and not isinstance(v, bool)}
    for k in sorted(keys - {"multiple", "seed"}):
        mean, half, n = mean_interval([r.get(k) for r in rows])
        out[k], out[f"{k}_ci"] = (mean if n else None), (half if n > 1 else None)
    out["stopped_early"] = any(r.get("stopped_early") for r in rows)
    return out


def common_regex_precision(rows: Sequence[dict[str, Any]]) -> set[str]:
    """Adds ``regex_precision_common`` to each row: its mean test precision over the regex
    features that every row covers; returns those features."""
    per = [r.get("regex_per_feature") or {} for r in rows]
    common = set.intersection(*[{f for f, v in p.items() if v is not None} for p in per]) \
        if per else set()
    for r, p in zip(rows, per, strict=True):
        vals = [p[f] for f in common]
        r["regex_precision_common"] = float(np.mean(vals)) if vals else None
        r["regex_common_features"] = len(common)
    return common


def markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    head = "| " + " | ".join(h for _, h in columns) + " |"
    lines = [head, "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r, k) for k, _ in columns) + " |")
    return "\n".join(lines)


def headline_columns(task: str) -> tuple[tuple[str, str], ...]:
    return HEADLINE + TASK[task]


def curve_series(points: Sequence[Mapping[str, Any]], key: str
                 ) -> dict[str, list[tuple[float, float, float]]]:
    """Per method family (``sae``, ``sae_2x`` and ``sae_4x`` are one: ``sae``), its points
    (L0, value of ``key``, 95% interval half-width or 0) in order of L0."""
    from codebook.compare.methods import method_family

    series: dict[str, list[tuple[float, float, float]]] = {}
    for p in points:
        if _finite(p.get(key)) and _finite(p.get("l0")):
            ci = p.get(f"{key}_ci")
            series.setdefault(method_family(p["method"]), []).append(
                (p["l0"], p[key], ci if _finite(ci) else 0.0))
    return {m: sorted(v) for m, v in sorted(series.items())}


def plot_curves(points: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """CE loss recovered (all sites) and FVE against L0, a line per method through its
    sparsity points; the headline point's 95% interval over seeds as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "ce_loss_recovered_all", "CE loss recovered (all sites)"),
                           (axes[1], "fve", "FVE")):
        for method, pts in curve_series(points, key).items():
            l0, value, err = zip(*pts, strict=True)
            ax.errorbar(l0, value, yerr=err, marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active features per token and site)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _cell(row: Mapping[str, Any], key: str) -> str:
    v = row.get(key)
    if isinstance(v, bool):
        return "yes" if v else "no"
    if not _finite(v):
        return "-" if not isinstance(v, str) else v
    text = _num(key, v)
    half = row.get(f"{key}_ci")
    if key == "steering_rate" and _finite(row.get("steering_rate_lo")):
        return f"{text} [{row['steering_rate_lo']:.2f}, {row['steering_rate_hi']:.2f}]"
    if not _finite(half) or key in ("train_tokens", "train_seconds", "seeds", "multiple"):
        return text
    return f"{text} ± {_num(key, half) if half >= 0.001 or key == 'l0' else f'{half:.1g}'}"


def _num(key: str, v: float) -> str:
    if key in ("train_tokens",):
        return f"{v / 1e6:.2f}M"
    if key in ("train_seconds", "seeds", "steering_topics_ge_060", "multiple"):
        return f"{v:.0f}"
    if abs(v) >= 1000:
        return f"{v:.0f}"
    return f"{v:.4g}" if abs(v) < 0.01 else f"{v:.3f}"
