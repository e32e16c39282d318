"""The comparison's Markdown report from its JSON summary: the headline over seeds, the
sparsity points (and their plot), the references, the graded FSM interventions, the regex
features per feature, and steering at matched cost."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from codebook.compare.aggregate import (
    CURVE,
    common_regex_precision,
    headline_columns,
    markdown,
    over_seeds,
    plot_curves,
)
from codebook.compare.steer import best_under_ceiling

CEILING_MULTIPLES = (1.5, 2, 3, 4, 8)

REFERENCE = (("method", "reference"), ("ce_loss_on", "CE loss"), ("accuracy", "accuracy"),
             ("first_transition_accuracy", "FTA"))


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, multiple): the mean and interval over its seeds."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r.get("multiple", 1))].append(r)
    return [over_seeds(g) for g in groups.values()]


def render(summary: dict[str, Any], curves: Path) -> str:
    """The whole report; the sparsity curves are drawn to ``curves``."""
    rows, task = summary["rows"], summary["task"]
    seed0 = [r for r in rows if r.get("seed") == summary["seeds"][0]
             and r.get("multiple", 1) == 1]
    if task == "text":
        common = common_regex_precision(rows)
    points = aggregate(rows)
    head = [p for p in points if p.get("multiple", 1) == 1]
    plot_curves([p for p in points if p["method"] != "neuron"], curves,
                f"{summary['name']}: sparsity curves (headline: mean ± 95% interval)")
    parts = [f"## Headline: L0 = the codebook's, mean ± 95% interval over seeds "
             f"{summary['seeds']}", "", markdown(head, headline_columns(task)), "",
             "## References (the same evaluation data)", "",
             markdown(summary["references"], REFERENCE[:3] + (REFERENCE[3:] if task == "fsm"
                                                              else ())), "",
             f"## Sparsity points (L0 multiples {summary['sparsity']}; curves: "
             f"{curves.name})", "", markdown(points, CURVE), ""]
    if task == "fsm":
        parts += ["## Interventions, graded (first seed): success / JSD shift towards b / "
                  "top-E overlap", "", _dose(seed0), ""]
    else:
        parts += [f"## Regex features, test precision per feature (first seed; common to "
                  f"every method: {len(common)})", "", _per_feature(seed0, "regex_per_feature"),
                  "", "## Regex features, test F1 of the best-F1 feature per feature", "",
                  _per_feature(seed0, "regex_f1_per_feature"), ""]
        if summary.get("steering"):
            steering = summary["steering"]
            parts += ["## Steering at matched cost", "", _steering(steering), "",
                      "## Steering against cost (selection samples: optimistic)", "",
                      "The best rate of the grid under other ceilings, in multiples of the "
                      "unsteered base's perplexity (topics >= 0.6 in brackets):", "",
                      _steering_by_ceiling(steering), "",
                      "Per intervention: the mean rate over topics (median perplexity):", "",
                      _steering_by_intervention(steering), ""]
    return "\n".join(parts)


def _dose(rows: list[dict[str, Any]]) -> str:
    levels: list[str] = []
    for r in rows:
        levels += [k for k in (r.get("dose") or {}) if k not in levels]
    columns = [("method", "method")] + [(k, k) for k in levels]
    table = []
    for r in rows:
        dose = r.get("dose") or {}
        if not dose:
            continue
        table.append({"method": r["method"], **{
            k: f"{_f(v['success'])} / {_f(v['jsd_shift'])} / {_f(v['overlap'])}"
            for k, v in dose.items()}})
    return markdown(table, columns) if table else "(no sparse features to swap)"


def _per_feature(rows: list[dict[str, Any]], key: str) -> str:
    features: list[str] = []
    for r in rows:
        features += [f for f in (r.get(key) or {}) if f not in features]
    table = [{"feature": f, **{r["method"]: _f((r.get(key) or {}).get(f)) for r in rows}}
             for f in features]
    return markdown(table, [("feature", "feature")] + [(r["method"], r["method"])
                                                       for r in rows])


def _steering(steering: dict[str, Any]) -> str:
    lines = ["| method | mean rate (test) [95% CI] | topics >= 0.6 | unsteered rate | "
             "ppl ceiling | per topic: chosen intervention -> test rate (ppl) |",
             "|---|---|---|---|---|---|"]
    for method, res in steering.items():
        per = "; ".join(
            f"{t['topic']}: {t['chosen']} -> {_f(t['test']['rate'])} "
            f"({_f(t['test']['perplexity'])})" if t["test"] else f"{t['topic']}: none"
            for t in res["topics"])
        lines.append(f"| {_method_label(method)} | "
                     f"{_f(res['steering_rate'])} [{_f(res.get('steering_rate_lo'))}, "
                     f"{_f(res.get('steering_rate_hi'))}] | {res['steering_topics_ge_060']} of "
                     f"{res['steering_topics']} | {_f(res['steering_baseline_rate'])} | "
                     f"{_f(res['ppl_ceiling'])} | {per} |")
    return "\n".join(lines)


def _steering_by_ceiling(steering: dict[str, Any]) -> str:
    """Rows: methods; columns: ceilings at CEILING_MULTIPLES x the unsteered base's
    perplexity (the dense baseline's model is the base, which splices nothing in)."""
    unit = steering["neuron"]["unsteered_perplexity"]
    lines = ["| method | " + " | ".join(f"<= {m:g} x {unit:.1f}" for m in CEILING_MULTIPLES)
             + " |", "|---" * (len(CEILING_MULTIPLES) + 1) + "|"]
    for method, res in steering.items():
        cells = [best_under_ceiling(res["topics"], m * unit) for m in CEILING_MULTIPLES]
        lines.append(f"| {_method_label(method)} (unsteered {res['unsteered_perplexity']:.1f}) | "
                     + " | ".join(f"{rate:.2f} ({n})" for rate, n in cells) + " |")
    return "\n".join(lines)


def _steering_by_intervention(steering: dict[str, Any]) -> str:
    cells: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for method, res in steering.items():
        for topic in res["topics"]:
            for g in topic["grid"]:
                cells[(g["intervention"], method)].append(g)
    labels = dict.fromkeys(label for label, _ in cells)  # in order of first appearance
    lines = ["| intervention | " + " | ".join(map(_method_label, steering)) + " |",
             "|---" * (len(steering) + 1) + "|"]
    for label in labels:
        row = []
        for method in steering:
            got = [g for g in cells[(label, method)] if g["perplexity"] is not None]
            row.append(f"{np.mean([g['rate'] for g in got]):.2f} "
                       f"({np.median([g['perplexity'] for g in got]):.0f})" if got else "-")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _method_label(method: str) -> str:
    return "dense (mean difference)" if method == "neuron" else method


def _f(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
