"""One row of the comparison per (method, L0 multiple, seed): fit the method (or load the
end-to-end model), score it with the one scoring code, and add what fitting it cost and its
reconstruction cost against the common references (the base and the plain-finetune control,
on the same evaluation data)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codebook.compare import methods as M
from codebook.compare.data import CompareData


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
