"""The sweep's summary table, plots and best-config export (no Ray needed).

Plots use Matplotlib's Agg canvas and ``codebook.analysis.plots.save_figure`` (atomic PNGs):
eval loss against k per codebook size, dead-code fraction against codebook size, and the
Pareto front of eval loss against k (fewer active codes per site vs lower loss).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure

from codebook.analysis.plots import save_figure

STATUS_MARKERS = {"finished": "o", "stopped_early": "x", "error": "s"}


def summary_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per trial; list values (e.g. codebook.sites) become JSON strings."""
    clean = [{k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in r.items()}
             for r in rows]
    return pd.DataFrame(clean)


def write_table(df: pd.DataFrame, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    csv, parquet = folder / "summary.csv", folder / "summary.parquet"
    df.to_csv(csv, index=False)
    df.to_parquet(parquet, index=False)
    return [csv, parquet]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (both minimised)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and y2 <= y) and (x2 < x or y2 < y)
            for j, (x2, y2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def write_plots(df: pd.DataFrame, folder: Path, metric: str = "eval_loss") -> list[Path]:
    """The three sweep plots; trials without the metric (errors) are left out."""
    folder.mkdir(parents=True, exist_ok=True)
    ok = df[df[metric].notna()] if metric in df else df.iloc[0:0]
    return [_loss_vs_k(ok, folder / "eval_loss_vs_k.png", metric),
            _dead_vs_codes(ok, folder / "dead_code_fraction_vs_num_codes.png"),
            _pareto(ok, folder / "pareto_loss_vs_k.png", metric)]


def _loss_vs_k(df: pd.DataFrame, path: Path, metric: str) -> Path:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for n, group in sorted(df.groupby("num_codes"), key=lambda g: g[0]):
        group = group.sort_values("k")
        finished = group[group.status == "finished"]
        line = ax.plot(finished.k, finished[metric], "o-", label=f"num_codes {n}")[0]
        stopped = group[group.status != "finished"]
        if len(stopped):
            ax.plot(stopped.k, stopped[metric], "x", color=line.get_color(), ms=8,
                    label=f"num_codes {n}, stopped early")
    _k_axis(ax, df)
    ax.set_ylabel(f"{metric} (last report)")
    ax.set_title("Eval loss vs k per codebook size")
    if len(df):
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def _dead_vs_codes(df: pd.DataFrame, path: Path) -> Path:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    col = "dead_code_fraction"
    for i, (k, group) in enumerate(sorted(df.groupby("k"), key=lambda g: g[0])):
        for status, marker in STATUS_MARKERS.items():
            part = group[(group.status == status) & group[col].notna()]
            if len(part):
                ax.scatter(part.num_codes, part[col], marker=marker, s=40, color=f"C{i % 10}",
                           label=f"k={k}" + ("" if status == "finished" else f" ({status})"))
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("num_codes (codebook size)")
    ax.set_ylabel("dead-code fraction (training, last report)")
    ax.set_title("Dead codes vs codebook size")
    if len(df):
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def _pareto(df: pd.DataFrame, path: Path, metric: str) -> Path:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    finished = df[df.status == "finished"]
    points = list(zip(finished.k.astype(float), finished[metric].astype(float), strict=True))
    sc = ax.scatter(df.k, df[metric], c=np.log10(df.num_codes.astype(float)) if len(df) else [],
                    cmap="viridis", s=36, label="trials")
    if len(df):
        fig.colorbar(sc, ax=ax, label="log10 num_codes")
    front = [points[i] for i in pareto_front(points)]
    if front:
        xs, ys = zip(*front, strict=True)
        ax.step(xs, ys, where="post", color="C3", lw=1.5, label="Pareto front (finished)")
        ax.scatter(xs, ys, facecolors="none", edgecolors="C3", s=110)
    _k_axis(ax, df)
    ax.set_ylabel(f"{metric} (last report)")
    ax.set_title("Pareto front: loss vs k")
    if len(df):
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def _k_axis(ax, df: pd.DataFrame) -> None:
    ax.set_xscale("log", base=2)
    ks = sorted({int(k) for k in df.k}) if len(df) else []
    if ks:
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
    ax.set_xlabel("k (active codes per codebook)")


def write_best_config(config: dict[str, Any], path: Path, header: str) -> Path:
    """A ready-to-run training config (``pipelines/train.py --config PATH``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"# {line}\n" for line in header.splitlines())
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(text + yaml.safe_dump(config, sort_keys=False))
    tmp.replace(path)
    return path
