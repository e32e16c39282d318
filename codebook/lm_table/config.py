"""The LM table's YAML file (``configs/lm_table/*.yaml``), read through ``codebook.schema``.

    name: text4
    train_config: configs/lm_table/text_base.yaml   # model, data, optimiser shared by all rows
    train_overrides: [model.from_config.num_hidden_layers=4]
    pretrain: [run.max_steps=6000]   # only when the train config builds a model from scratch
    finetune: [run.max_steps=400]    # every row: the same steps, data and schedule
    rows:                            # codebook rows (``finetuned`` and ``pretrained`` are added)
      attn_heads_k8: [codebook.sites=[attn_heads], codebook.k=8]
    eval: {blocks: 256}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from codebook.schema import load_overridden

RESERVED_ROWS = ("pretrained", "finetuned")


@dataclass
class EvalOptions:
    """The held-out evaluation every row gets: ``blocks`` blocks drawn (seeded) from the
    held-out documents (``data.heldout_fraction`` of the train config)."""

    blocks: int = 256
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.blocks < 1 or self.batch_size < 1:
            raise ValueError("eval.blocks and eval.batch_size must be >= 1")


@dataclass
class LMTableConfig:
    name: str
    train_config: str
    rows: dict[str, list[str]]
    train_overrides: list[str] = field(default_factory=list)
    pretrain: list[str] = field(default_factory=list)
    finetune: list[str] = field(default_factory=list)
    eval: EvalOptions = field(default_factory=EvalOptions)
    out: str = "~/codebook-runs/lm_table"
    mlflow: bool = True  # false: no MLflow (e.g. a GPU box without it)
    tracking_uri: str | None = None
    experiment: str = "codebook-lm-table"

    def __post_init__(self) -> None:
        clash = [r for r in self.rows if r in RESERVED_ROWS]
        if clash:
            raise ValueError(f"row name {clash[0]!r} is reserved (the table adds "
                             f"{list(RESERVED_ROWS)} itself): rename it")
        bad = [r for r in self.rows if not r.replace("_", "").replace("-", "").isalnum()]
        if bad:
            raise ValueError(f"row name {bad[0]!r}: use letters, digits, '_' and '-' "
                             "(it names the row's run folder)")


def load_lm_table_config(path: str | Path, overrides: list[str] | None = None) -> LMTableConfig:
    """Read, override (``key=value``, YAML values) and check an LM-table file."""
    return load_overridden(LMTableConfig, path, overrides, "configs/lm_table/")
