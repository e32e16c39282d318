"""Scoring the LM table's rows: every model on the same held-out blocks, by the training loop's
own evaluation (``codebook.training.loop.evaluate``: next-token loss and accuracy, and with
codebooks on the dictionary metrics per site: L0, FVE, dead share over these blocks)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from codebook.lm_table.config import EvalOptions
from codebook.training.config import TrainConfig


def heldout_eval_blocks(base: TrainConfig, pretrained: str, opts: EvalOptions) -> np.ndarray:
    """``opts.blocks`` blocks drawn (seeded) from the held-out documents of ``base.data``
    (``codebook.data.heldout``): no row ever trains on them."""
    from codebook.data.blocks import sample_blocks, split_blocks
    from codebook.data.text import load_tokenizer

    m = base.model
    tokenizer = load_tokenizer(m.tokenizer or pretrained, None if m.tokenizer else m.gguf_file)
    _, held = split_blocks(base.data, tokenizer, train=False)
    return sample_blocks(held, opts.blocks, opts.seed)


@torch.no_grad()
def score_model(model: Any, blocks: np.ndarray, batch_size: int, device: str = "cpu"
                ) -> dict[str, Any]:
    """Held-out loss and accuracy of ``model`` (a CodebookModel) on ``blocks``, and per site
    L0, FVE and dead-code share (codebooks on; the weights' loss with them off beside)."""
    from codebook.training import metric_names as names
    from codebook.training.loop import Workers, evaluate

    model.to(device)
    batches = ({"input_ids": torch.from_numpy(blocks[i: i + batch_size]).long()}
               for i in range(0, len(blocks), batch_size))
    ev = evaluate(model, batches, Workers(device=torch.device(device)), site_metrics=False)
    prefix = names.EVAL_METRICS
    sites = {s: {k: ev.get(f"{prefix}/{s}/{k}") for k in ("l0", "fve", "dead_fraction")}
             for s in model.codebooks}
    layers = list(model.codebooks.values())
    return {
        "loss": ev[names.EVAL_LOSS], "accuracy": ev[names.EVAL_ACCURACY],
        "loss_codebooks_off": ev.get(names.EVAL_CE_LOSS_OFF),
        "l0": ev.get(names.EVAL_L0), "fve": ev.get(names.EVAL_FVE),
        "dead_fraction": (float(np.mean([v["dead_fraction"] for v in sites.values()]))
                          if sites else None),
        "per_site": sites, "eval_tokens": int(blocks.size),
        "num_codes": layers[0].num_codes if layers else None,
        "groups": layers[0].groups if layers else None,
    }


def score_pretrained(plan: Any, blocks: np.ndarray, device: str = "cpu") -> dict[str, Any]:
    """The ``pretrained`` row: the checkpoint as it is, no training."""
    from codebook.config import CodebookConfig
    from codebook.model import CodebookModel

    gguf = plan.base.model.gguf_file if plan.pretrain is None else None
    model = CodebookModel.from_pretrained(plan.pretrained, CodebookConfig(sites=[]),
                                          **({"gguf_file": gguf} if gguf else {}))
    scores = score_model(model.float(), blocks, plan.cfg.eval.batch_size, device)
    return {"row": "pretrained", "sites": "-", "k": None, "tokens": 0, "steps": 0,
            "train_seconds": None, **scores}


def row_result(plan: Any, name: str, tc: TrainConfig, model_dir: str,
               training: dict[str, Any], blocks: np.ndarray, device: str = "cpu"
               ) -> dict[str, Any]:
    """A finetuned row: its last checkpoint scored, beside what its training cost."""
    from codebook.resolve import load_trained_model

    model = load_trained_model(model_dir)
    scores = score_model(model.float(), blocks, plan.cfg.eval.batch_size, device)
    cb = tc.codebook
    return {"row": name, "sites": ",".join(cb.sites) or "-",
            "k": cb.k if cb.sites else None, "score": cb.score if cb.sites else None,
            "tokens": training.get("tokens"), "steps": tc.run.max_steps,
            "train_seconds": training.get("wall_s"), "resumed": training.get("resumed", False),
            "training_run_id": training.get("mlflow_run_id"), "model": model_dir, **scores}
