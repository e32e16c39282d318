"""The LM table end to end, without Ray: plan every run, pretrain (if asked), finetune each row by
the one training loop (through the ``fit`` the caller hands in: Ray Train's, or the loop in this
process), score every row on the same held-out blocks, and write the table.

Reruns skip what is finished: the exported pretrained model, and each row whose result file
(``rows/<name>.json``) exists; a row whose run was interrupted resumes from its newest intact
checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codebook.errors import ConfigError
from codebook.io import atomic_dir, atomic_write
from codebook.lm_table.config import LMTableConfig, load_lm_table_config
from codebook.training.config import TrainConfig, load_config

# fit(train config, resume, MLflow parent run id or None) -> summary with "model" (the last
# checkpoint's HF folder), "wall_s" and, where MLflow is on, "mlflow_run_id".
Fit = Callable[[TrainConfig, bool, "str | None"], dict[str, Any]]
PRETRAINED_DIR = "pretrained"


@dataclass
class Plan:
    """Every run of a table, checked before any of them starts."""

    cfg: LMTableConfig
    out: Path
    base: TrainConfig  # the shared training config (data, tokenizer, evaluation split)
    pretrain: TrainConfig | None  # None: the train config names a pretrained model
    rows: dict[str, TrainConfig]  # "finetuned" first, then the config's rows

    @property
    def pretrained(self) -> str:
        """The pretrained model every row starts from (a folder or a Hub id)."""
        if self.pretrain is None:
            return str(self.base.model.name_or_path)
        return str(self.out / PRETRAINED_DIR)

    @property
    def tracking_uri(self) -> str | None:
        return _tracking_uri(self.cfg, self.out)


def _tracking_uri(cfg: LMTableConfig, out: Path) -> str | None:
    """The table's MLflow store (None: MLflow off): every row's run and the parent go there."""
    if not cfg.mlflow:
        return None
    from codebook.tracking import default_tracking_uri

    return default_tracking_uri(cfg.tracking_uri, out)


def prepare(config: str | Path, overrides: list[str] | None = None,
            extra: list[str] | None = None, out: Path | None = None) -> Plan:
    """Read the table's file and build (and check) every run's training config; ``extra``
    overrides every run last (``--quick`` shrinks them). Fails before any work on a bad
    config, a site the model lacks, or an evaluation that is not held out."""
    cfg = load_lm_table_config(config, overrides)
    extra = list(extra or [])
    out = Path(out or Path(cfg.out).expanduser() / cfg.name).resolve()
    runs = out / "runs"

    def train_config(where: str, items: list[str], name: str) -> TrainConfig:
        try:
            tc = load_config(cfg.train_config, [*cfg.train_overrides, *items, *extra])
        except ConfigError as err:
            raise ConfigError(where, str(err), "fix the overrides or the train config") from err
        tc.run.name, tc.run.storage_path = name, str(runs)
        tc.mlflow.experiment, tc.mlflow.tracking_uri = cfg.experiment, _tracking_uri(cfg, out)
        return tc

    base = train_config("train_overrides", [], "base")
    d = base.data
    if d.source == "fsm":
        raise ConfigError("train_config", "data.source is 'fsm'",
                          "the LM table reads text (text, parquet or hf sources)")
    if not d.heldout_fraction:
        raise ConfigError("data.heldout_fraction", "is 0: the eval blocks would come from "
                          "documents the rows train on", "hold out a share of the documents, "
                          "e.g. data.heldout_fraction: 0.1")
    pretrain = None
    if base.model.from_config is not None:
        pretrain = train_config("pretrain", [*cfg.pretrain, "codebook.sites=[]"], "pretrain")
    elif cfg.pretrain:
        raise ConfigError("pretrain", "the train config names a pretrained model "
                          f"({base.model.name_or_path}); there is nothing to pretrain",
                          "drop the pretrain overrides, or build the model from_config")
    rows = {"finetuned": train_config("finetune", [*cfg.finetune, "codebook.sites=[]"],
                                      "finetuned")}
    for name, items in cfg.rows.items():
        rows[name] = train_config(f"rows.{name}", [*cfg.finetune, *items], name)
        if not rows[name].codebook.sites:
            raise ConfigError(f"rows.{name}", "lists no codebook sites",
                              "set codebook.sites (the finetuned row without codebooks is "
                              "added by the table itself)")
    _check_sites(base, rows)
    return Plan(cfg, out, base, pretrain, rows)


def _check_sites(base: TrainConfig, rows: dict[str, TrainConfig]) -> None:
    """Every row's sites on the model's config (no weights read)."""
    from transformers import AutoConfig

    from codebook.sites import resolve_sites

    m = base.model
    if m.from_config is not None:
        spec = dict(m.from_config)
        model_config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    else:
        kwargs = {"gguf_file": m.gguf_file} if m.gguf_file else {}
        model_config = AutoConfig.from_pretrained(m.name_or_path, **kwargs)
    for name, tc in rows.items():
        try:
            resolve_sites(model_config, tc.codebook)
        except ConfigError as err:
            raise ConfigError(f"rows.{name}", str(err), "name sites the model has") from err


def run(plan: Plan, fit: Fit, device: str = "cpu") -> dict[str, Any]:
    """Pretrain (if planned), then every row, then the outputs; returns the JSON summary."""
    from codebook.lm_table import report
    from codebook.lm_table.score import heldout_eval_blocks, row_result, score_pretrained

    plan.out.mkdir(parents=True, exist_ok=True)
    parent = _parent_run(plan)
    if plan.pretrain is not None:
        _pretrain(plan, fit, parent)
    blocks = heldout_eval_blocks(plan.base, plan.pretrained, plan.cfg.eval)
    rows = [_finished(plan, "pretrained") or _save(plan, "pretrained", score_pretrained(
        plan, blocks, device), parent)]
    for name, tc in plan.rows.items():
        done = _finished(plan, name)
        if done is None:
            tc.model.name_or_path, tc.model.from_config = plan.pretrained, None
            model_dir, training = _train(plan, name, tc, fit, parent)
            done = _save(plan, name, row_result(plan, name, tc, model_dir, training, blocks,
                                                device), parent)
        rows.append(done)
    return report.write(plan, rows, parent)


def _pretrain(plan: Plan, fit: Fit, parent: str | None) -> None:
    """Train the model from scratch (no codebooks) and export it as a plain HF folder, the
    checkpoint every row starts from; skipped once exported."""
    from codebook.resolve import load_trained_model
    from codebook.training.loop import checkpoint_tokenizer

    target = plan.out / PRETRAINED_DIR
    if (target / "config.json").is_file():
        print(f"pretrained model: {target} (exported before; not trained again)", flush=True)
        return
    model_dir, training = _train(plan, "pretrain", plan.pretrain, fit, parent)
    model = load_trained_model(model_dir)
    tokenizer = checkpoint_tokenizer(plan.pretrain)
    with atomic_dir(target) as tmp:
        model.model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / "pretraining.json").write_text(json.dumps(training, indent=2))
    print(f"pretrained model exported to {target}", flush=True)


def _train(plan: Plan, name: str, tc: TrainConfig, fit: Fit, parent: str | None
           ) -> tuple[str, dict[str, Any]]:
    """Finetune one row (or pretrain) by ``fit``; on from its newest intact checkpoint when an
    earlier attempt was interrupted. Returns its model folder and what training cost."""
    from codebook.checkpoint import HF_DIR, checkpoint_step, latest_intact_checkpoint

    latest, _ = latest_intact_checkpoint(tc.run_dir)
    tokens = (tc.run.max_steps * tc.optim.batch_size * tc.optim.grad_accum
              * tc.run.num_workers * tc.data.block_size)
    if latest is not None and checkpoint_step(latest) == tc.run.max_steps:
        print(f"{name}: trained before ({latest})", flush=True)
        previous = _read_json(tc.run_dir / "training.json") or {}
        return str(latest / HF_DIR), {"tokens": tokens, **previous}
    print(f"{name}: {'resuming' if latest else 'training'} {tc.run.max_steps} steps", flush=True)
    summary = fit(tc, latest is not None, parent)
    training = {"tokens": tokens, "steps": tc.run.max_steps, "wall_s": summary.get("wall_s"),
                "resumed": latest is not None, "mlflow_run_id": summary.get("mlflow_run_id")}
    with atomic_write(tc.run_dir / "training.json") as fh:
        json.dump(training, fh, indent=2)
    return str(summary["model"]), training


def _finished(plan: Plan, name: str) -> dict[str, Any] | None:
    done = _read_json(plan.out / "rows" / f"{name}.json")
    if done is not None:
        print(f"{name}: finished before; skipped", flush=True)
    return done


def _save(plan: Plan, name: str, row: dict[str, Any], parent: str | None) -> dict[str, Any]:
    """The row's result file (written atomically: a rerun skips the row) and its MLflow run."""
    from codebook.lm_table.report import log_row

    if parent is not None:
        row["mlflow_run_id"] = log_row(plan, row, parent)
    with atomic_write(plan.out / "rows" / f"{name}.json") as fh:
        json.dump(row, fh, indent=2)
    print(f"{name}: loss {row['loss']:.4f} accuracy {row['accuracy']:.4f}", flush=True)
    return row


def _parent_run(plan: Plan) -> str | None:
    """The table's MLflow parent run, reopened on a rerun."""
    if plan.tracking_uri is None:
        return None
    from codebook.tracking import start_run

    id_file = plan.out / "mlflow_parent_run_id"
    old = id_file.read_text().strip() if id_file.is_file() else None
    run_id = start_run(plan.tracking_uri, plan.cfg.experiment, f"lm-table-{plan.cfg.name}",
                       {"train_config": plan.cfg.train_config, "rows": ",".join(plan.rows)},
                       {}, run_id=old)
    id_file.write_text(run_id)
    return run_id


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None
