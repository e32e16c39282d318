"""The comparison's YAML file (``configs/compare/*.yaml``), read through ``codebook.schema``.

    name: fsm
    train_config: configs/fsm.yaml      # model, data and codebook settings of the codebook model
    codebook_model: RUN/checkpoint_.../hf   # optional: an existing one (else trained here)
    base_model: BASE/checkpoint_.../hf  # optional: the frozen base (else the codebook run's
                                        # checkpoint at codebook.start_step, before codebooks)
    sae: {token_budget: 4000000}     # codebook.compare.fitting.FitOptions
    posthoc: {token_budget: 4000000}
    sparsity: [1, 2, 4]   # L0 multiples of the codebook's k: the curve (1: the headline)
    seeds: [0, 1, 2]      # seeds at the headline point (the others: the first seed)
    cache: {sequences: 4096}
    analysis: {eval_sequences: 256, max_pairs: 500}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from codebook.compare.fitting import FitOptions
from codebook.compare.methods import METHODS
from codebook.schema import load_overridden


@dataclass
class CacheOptions:
    """Base-model activations at the sites, collected by Ray Data actors."""

    sequences: int = 2048  # FSM: fresh training-distribution sequences; text: corpus blocks
    rows_per_shard: int = 256
    batch_rows: int = 64  # rows per forward pass in an actor
    num_workers: int = 1  # actors

    def __post_init__(self) -> None:
        for name in ("sequences", "rows_per_shard", "batch_rows", "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"cache.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class AnalysisOptions:
    """The held-out FSM report's choices (``codebook.analysis.fsm.Settings``)."""

    eval_sequences: int = 256  # FSM: the fixed eval set; text: corpus blocks not cached
    max_pairs: int = 500
    seed: int = 0
    test_fraction: float = 0.5
    min_recall: float = 0.2


@dataclass
class SteeringOptions:
    """Topic steering on text, like for like (``codebook.compare.steer``): per topic and
    method, the ``features`` most effective of the ``pool`` features most enriched on its
    texts (the same numbers for every method), each intervention at each strength, ``samples``
    samples per prompt, with bootstrap intervals and the samples' perplexity under the control
    model; the headline is the best rate at perplexity <= ``ppl_ceiling`` x the unsteered base
    model's (one ceiling for every method)."""

    features: int = 2
    pool: int = 20
    samples: int = 4
    max_new_tokens: int = 64
    set_multiples: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    set_max: bool = True  # also set at the largest active value
    add_norms: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    ppl_ceiling: float = 2.0
    bootstrap: int = 1000

    def __post_init__(self) -> None:
        if self.features < 1 or self.pool < self.features:
            raise ValueError("steering needs 1 <= features <= pool")
        if self.samples < 1 or self.max_new_tokens < 1:
            raise ValueError("steering.samples and max_new_tokens must be >= 1")
        if any(m <= 0 for m in [*self.set_multiples, *self.add_norms]):
            raise ValueError("steering strengths must be > 0")


@dataclass
class CompareConfig:
    name: str
    train_config: str
    codebook_model: str | None = None
    base_model: str | None = None
    control_model: str | None = None  # a given base's plain finetune (else trained here)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    train_overrides: list[str] = field(default_factory=list)  # --set for the training config
    sae: FitOptions = field(default_factory=FitOptions)
    posthoc: FitOptions = field(default_factory=FitOptions)
    sparsity: list[int] = field(default_factory=lambda: [1, 2, 4])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    cache: CacheOptions = field(default_factory=CacheOptions)
    analysis: AnalysisOptions = field(default_factory=AnalysisOptions)
    # Text: regex features (the library's defaults plus this YAML file's) and the block size.
    features: str | None = None
    block_size: int = 256
    topics: str | None = None  # a topics file (codebook/topics.py): topic steering per method
    steering: SteeringOptions = field(default_factory=SteeringOptions)
    out: str = "~/codebook-runs/compare"
    tracking_uri: str | None = None
    experiment: str = "codebook-compare"

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method {bad[0]!r}: use some of {list(METHODS)}")
        if "codebook" not in self.methods:
            raise ValueError("methods must include 'codebook': the other rows are sized by it")
        if not self.sparsity or self.sparsity[0] != 1 or any(m < 1 for m in self.sparsity):
            raise ValueError(f"sparsity {self.sparsity}: L0 multiples >= 1, starting with 1 "
                             "(the headline point)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds}: give distinct seeds")


def load_compare_config(path: str | Path, overrides: list[str] | None = None) -> CompareConfig:
    """Read, override (``key=value``, YAML values) and check a comparison file."""
    return load_overridden(CompareConfig, path, overrides, "configs/compare/")
