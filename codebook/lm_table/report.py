"""The LM table's outputs: a Markdown table in the paper's format (with each row's gap to
``finetuned``), the JSON summary, a plot of held-out loss against k, and the MLflow runs (a
parent for the table, a child per row)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from codebook.io import atomic_write

COLUMNS = (  # (key, header)
    ("row", "row"), ("sites", "sites"), ("k", "k"), ("num_codes", "codes"),
    ("groups", "groups"), ("loss", "loss"), ("accuracy_pct", "acc. (%)"),
    ("loss_gap", "loss - finetuned"), ("accuracy_gap_pct", "acc. - finetuned"),
    ("l0", "L0"), ("fve", "FVE"), ("dead_fraction", "dead"),
    ("loss_codebooks_off", "loss, codebooks off"), ("tokens", "tokens"),
    ("train_minutes", "train min"), ("tokens_per_s", "tok/s"))


def with_gaps(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with their gap to ``finetuned`` (loss and accuracy) and display units."""
    ref = next((r for r in rows if r["row"] == "finetuned"), None)
    out = []
    for r in rows:
        r = dict(r)
        r["accuracy_pct"] = 100 * r["accuracy"]
        if ref is not None:
            r["loss_gap"] = r["loss"] - ref["loss"]
            r["accuracy_gap_pct"] = 100 * (r["accuracy"] - ref["accuracy"])
        seconds = r.get("train_seconds")
        r["train_minutes"] = None if seconds is None else seconds / 60
        r["tokens_per_s"] = r["tokens"] / seconds if seconds and r.get("tokens") else None
        out.append(r)
    return out


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(k, r.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def plot_loss_vs_k(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Held-out loss against k, one line per site set (and grouping); ``finetuned`` and
    ``pretrained`` as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    lines: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r.get("k") is not None:
            label = r["sites"] + (f" ({r['groups']} groups)" if (r.get("groups") or 1) > 1 else "")
            lines.setdefault(label, []).append((r["k"], r["loss"]))
    for label, points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
    for r, style in ((_row(rows, "finetuned"), "--"), (_row(rows, "pretrained"), ":")):
        if r is not None:
            ax.axhline(r["loss"], linestyle=style, color="gray", label=r["row"])
    ax.set_xscale("log")
    ax.set_xlabel("k (codes per codebook)")
    ax.set_ylabel("held-out loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_row(plan: Any, row: dict[str, Any], parent: str) -> str:
    """The row's scores in its MLflow run (the training run fit made, or a new child of the
    table's run); returns the run id."""
    from codebook.tracking import MLflowLogger, finish_run, start_run

    uri = plan.tracking_uri
    trained = row.get("training_run_id")
    child = trained or start_run(uri, plan.cfg.experiment, row["row"], {"row": row["row"]},
                                 {"mlflow.parentRunId": parent})
    metrics = {f"lm_table/{k}": float(v) for k, v in row.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    metrics.update({f"lm_table/{s}/{k}": float(v) for s, m in row["per_site"].items()
                    for k, v in m.items() if v is not None})
    MLflowLogger(uri, child).log(0, metrics)
    if not trained:
        finish_run(uri, child)
    return child


def write(plan: Any, rows: list[dict[str, Any]], parent: str | None) -> dict[str, Any]:
    """table.md, table.json, loss_vs_k.png; the MLflow parent run finished with them; the table
    printed; returns the JSON summary, which the entry point prints last, once
    Ray is shut down."""
    rows = with_gaps(rows)
    out = plan.out
    table = markdown_table(rows)
    with atomic_write(out / "table.md") as fh:
        fh.write(table + "\n")
    plot = plot_loss_vs_k(rows, out / "loss_vs_k.png")
    summary = {"name": plan.cfg.name, "pretrained": plan.pretrained,
               "eval_blocks": plan.cfg.eval.blocks, "rows": rows, "mlflow_run_id": parent}
    with atomic_write(out / "table.json") as fh:
        json.dump(summary, fh, indent=2)
    if parent is not None:
        from codebook.tracking import finish_run

        finish_run(plan.tracking_uri, parent, artifacts={
            "lm_table": out / "table.md", "lm_table_json": out / "table.json",
            "lm_table_plot": plot})
    print(table, flush=True)
    return summary


def _row(rows: Sequence[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["row"] == name), None)


def _fmt(key: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if key == "tokens":
        return f"{v / 1e6:.2f}M" if v >= 1e5 else str(v)
    if key in ("loss_gap", "accuracy_gap_pct"):
        return f"{v:+.3f}" if key == "loss_gap" else f"{v:+.2f}"
    if key == "accuracy_pct":
        return f"{v:.2f}"
    if key == "l0":
        return f"{v:.1f}"
    if key == "tokens_per_s":
        return f"{v:.0f}"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
