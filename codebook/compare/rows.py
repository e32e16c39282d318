"""One row of the comparison per (method, L0 multiple, seed): fit the method (or load the
end-to-end model), score it with the one scoring code, and add what fitting it cost and its
reconstruction cost against the common references (the base and the plain-finetune control,
on the same evaluation data)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codebook.compare import methods as M
from codebook.compare.data import CompareData
from codebook.io import atomic_write


@dataclasses.dataclass
class Context:
    """What every row needs: the comparison's settings, data, cache and models."""

    cfg: Any
    data: CompareData
    cache: Any
    base: Any  # the frozen base (a plain HF causal LM)
    config: Any  # the headline codebook model's CodebookConfig
    out: Path
    references: dict[str, float]  # {"ce_base": ..., "ce_control": ...}
    log: Any = None


def fit(ctx: Context, method: str, multiple: int, seed: int,
        codebook_models: dict[tuple[int, int], Any]) -> M.Fitted:
    """The method's model at L0 ``multiple`` x the codebook's, fitted with ``seed``."""
    from codebook.resolve import load_trained_model

    name = M.method_name(method, multiple)
    log = None if ctx.log is None else ctx.log(f"{name} s{seed}")
    if method == "codebook":
        trained = codebook_models[(multiple, seed)]
        return M.Fitted(load_trained_model(trained.path), trained.seconds or 0.0, trained.tokens,
                        dead_train=trained.dead_fraction)
    if method == "posthoc_codebook":
        config = ctx.config.at_k(ctx.config.k * multiple)  # as the end-to-end models
        opts = dataclasses.replace(ctx.cfg.posthoc, seed=seed)
        return M.posthoc_codebook(ctx.base, config, ctx.cache, opts, log=log)
    if method == "sae":
        opts = dataclasses.replace(ctx.cfg.sae, seed=seed)
        return M.sae_model(ctx.base, ctx.config, ctx.cache, opts, multiple,
                           ctx.out / "saes" / f"{name}-s{seed}", log=log)
    raise ValueError(f"no fitting for method {method!r}")


def score(ctx: Context, name: str, fitted: M.Fitted, *, multiple: int = 1, seed: int = 0,
          target_recall: np.ndarray | None = None) -> tuple[dict[str, Any], Any]:
    """The row of a fitted method (and the FSM report, or the chosen features' recall on
    text, for the neuron baseline's target)."""
    from codebook.compare.score import fsm_row, neuron_row
    from codebook.compare.text import text_row

    started = time.perf_counter()
    a = ctx.cfg.analysis
    extra: Any = None
    if ctx.data.task == "fsm":
        from codebook.analysis.fsm.report import Settings

        settings = Settings(max_pairs=a.max_pairs, seed=a.seed, min_recall=a.min_recall,
                            test_fraction=a.test_fraction)
        if name == "neuron":
            row = neuron_row(fitted.model, ctx.data.fsm, ctx.data.eval, settings, target_recall)
        else:
            row, rep = fsm_row(name, fitted.model, ctx.data.fsm, ctx.data.eval, settings)
            extra = rep.to_dict()
    else:
        row, extra = text_row(name, fitted.model, ctx.data.eval, a.seed, a.test_fraction,
                              a.min_recall, target_recall=target_recall)
        units = row.pop("units_nonzero", None)
        if name == "neuron":  # the site's own units: their L0 is how many are non-zero
            widths = [layer.dim for layer in fitted.model.codebooks.values()]
            row.update(l0=units, fve=1.0, dead_fraction=None,
                       dictionary_size=sum(widths) / len(widths),
                       note="the site's own units; nothing spliced")
    row.update(method=M.method_name(name, 1) if name == "neuron" else name,
               multiple=multiple, seed=seed, train_tokens=fitted.train_tokens or None,
               train_seconds=fitted.train_seconds or None, stopped_early=fitted.stopped_early,
               dead_fraction_train=fitted.dead_fraction,
               score_seconds=round(time.perf_counter() - started, 1))
    row["ce_gap_control"] = row["ce_gap_base"] = None  # nothing spliced: no cost
    if row.get("ce_loss_on") is not None:
        row["ce_gap_control"] = row["ce_loss_on"] - ctx.references["ce_control"]
        row["ce_gap_base"] = row["ce_loss_on"] - ctx.references["ce_base"]
    if fitted.fits:
        row["fits"] = {site: f.to_dict() for site, f in fitted.fits.items()}
    print(f"scored {name} (seed {seed}) in {row['score_seconds']}s", flush=True)
    return row, extra


@torch.no_grad()
def reference_row(name: str, model: Any, data: CompareData) -> dict[str, Any]:
    """A plain model's loss (and, on the FSM, first-transition accuracy) on the evaluation
    data: the base and the control, the references every method is measured against."""
    from codebook.config import CodebookConfig
    from codebook.model import CodebookModel
    from codebook.training.loop import Workers, evaluate

    wrapped = CodebookModel(model, CodebookConfig(sites=[]))
    ev = evaluate(wrapped, ({"input_ids": b} for b in data.eval_batches()), Workers())
    row = {"method": name, "ce_loss_on": ev["eval/loss"], "accuracy": ev["eval/accuracy"]}
    if data.task == "fsm":
        from codebook.analysis.fsm.scoring import first_transition_accuracy

        row["first_transition_accuracy"] = first_transition_accuracy(wrapped, data.fsm,
                                                                     data.eval)
    return row


def row_key(ctx: Context, method: str, multiple: int, seed: int, model: str | None = None,
            target: Any = None) -> str:
    """What a saved row was scored from, as a digest: the method, its L0 multiple and seed, its
    fitting options, the analysis settings, the evaluation split, the cache and the model
    (an end-to-end model's path; the neurons' target recall). A row saved under another key is
    scored again."""
    opts = {"posthoc_codebook": ctx.cfg.posthoc, "sae": ctx.cfg.sae}.get(method)
    spec = {"method": method, "multiple": multiple, "seed": seed, "model": model,
            "fit": dataclasses.asdict(opts) if opts is not None else None,
            "analysis": dataclasses.asdict(ctx.cfg.analysis), "split": ctx.data.split,
            "cache_tokens": ctx.cache.tokens, "config": ctx.config.to_dict(),
            "target": None if target is None else np.asarray(target, dtype=float).tolist()}
    text = json.dumps(spec, sort_keys=True, default=json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_stamp(path: str) -> str:
    """A model folder as a row's key sees it: its path and when its files were last written,
    so that a model retrained into the same path has its rows scored again."""
    files = [f for f in Path(path).iterdir() if f.is_file()]
    return f"{path}@{max((f.stat().st_mtime_ns for f in files), default=0)}"


def row_path(out: Path, name: str, seed: int) -> Path:
    """Where a scored row is kept: ``rows/<method>-s<seed>.json`` in the output folder."""
    return out / "rows" / f"{name}-s{seed}.json"


def save_row(path: Path, key: str, row: dict[str, Any], extra: Any) -> None:
    """Keep a scored row (and its FSM report or chosen features' recall), written atomically,
    so that a rerun of the comparison resumes after it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as fh:
        json.dump({"key": key, "row": row, "extra": extra}, fh, default=json_default)


def load_row(path: Path, key: str, task: str) -> tuple[dict[str, Any], Any] | None:
    """The row saved at ``path`` under ``key`` (with its extra), or None: not saved, saved
    from other settings, or unreadable."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if saved.get("key") != key:
        print(f"{path.name}: saved from other settings; scoring again", flush=True)
        return None
    extra = saved["extra"]
    if task == "text" and extra is not None:  # the chosen features' recall, NaN where none
        extra = np.asarray([np.nan if v is None else v for v in extra], dtype=float)
    return saved["row"], extra


def json_default(value: Any) -> Any:
    """numpy scalars and arrays as Python values (NaN as null)."""
    if isinstance(value, np.ndarray):
        return [None if isinstance(v, float) and np.isnan(v) else v for v in value.tolist()] \
            if value.dtype.kind == "f" else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON-able: {type(value).__name__}")
