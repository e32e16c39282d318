"""Training a cache-fitted dictionary (a post-hoc codebook, a sparsify SAE) to a token budget.

The same rules for every method: batches of ``batch_tokens`` (sparsify's default, 32 x 2,048;
accumulated over micro-batches of ``micro_batch_tokens``) drawn from the training shards of the
cache, a validation FVU on the held-out shards every ``eval_every_tokens``, and a stop at the
token budget or, earlier, once the validation FVU has not improved by ``min_improvement``
(relative) for ``patience`` evaluations. The curve, the tokens trained, the wall time and the
share of latents dead over the training window (at most the last 1M tokens) are kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

DEAD_WINDOW_TOKENS = 1_000_000  # a latent is dead if it has not fired for this many tokens


@dataclass
class FitOptions:
    """How the cache-trained methods are fitted (the ``sae`` and ``posthoc`` sections)."""

    token_budget: int = 4_000_000  # tokens per site: the same for every dictionary method
    batch_tokens: int = 65_536  # tokens per optimizer step (sparsify's default batch)
    micro_batch_tokens: int = 8_192  # accumulated up to batch_tokens (memory)
    plateau: bool = True  # stop before the budget once the validation FVU stops improving
    patience: int = 3
    min_improvement: float = 0.01  # relative
    eval_every_tokens: int = 524_288
    val_tokens: int = 32_768  # validation tokens, from the held-out shards
    val_fraction: float = 0.125  # share of the cache's shards held out for validation
    lr: float | None = None  # None: the method's default (sparsify's rule; 1e-3 for codebooks)
    seed: int = 0
    # SAE dead latents: "auxk" (sparsify's AuxK loss, its gradient reaching the encoder),
    # "multi_topk" (sparsify's multi-TopK loss), or "none".
    dead_latents: Literal["auxk", "multi_topk", "none"] = "auxk"
    auxk_alpha: float = 1 / 32
    dead_tokens: int = 100_000  # AuxK: latents idle this many tokens are "dead" to the loss

    def __post_init__(self) -> None:
        for name in ("token_budget", "batch_tokens", "micro_batch_tokens", "eval_every_tokens",
                     "val_tokens", "patience", "dead_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_tokens > self.batch_tokens:
            raise ValueError("micro_batch_tokens must be <= batch_tokens")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.dead_latents not in ("auxk", "multi_topk", "none"):
            raise ValueError(f"dead_latents {self.dead_latents!r}: use auxk, multi_topk or none")


@dataclass
class FitRecord:
    """What fitting one site's dictionary did: the validation curve and what it cost."""

    tokens: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens, validation FVU)
    dead_fraction: float = math.nan  # no firing over the dead window
    dead_window_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FiringClock:
    """Tokens since each latent last fired, on the host's terms (no per-step sync)."""

    def __init__(self, num_latents: int):
        self.since = torch.zeros(num_latents, dtype=torch.long)

    def update(self, tokens: int, fired: torch.Tensor) -> None:
        """``fired``: the latent ids (any shape) active in a batch of ``tokens`` tokens."""
        self.since += tokens
        self.since[fired.flatten().cpu()] = 0

    def dead(self, threshold: int) -> torch.Tensor:
        return self.since >= threshold

    def dead_fraction(self, trained: int) -> tuple[float, int]:
        """Share of latents silent over the last min(1M, trained) tokens, and that window."""
        window = min(DEAD_WINDOW_TOKENS, trained)
        return float(self.dead(max(window, 1)).float().mean()), window


def fit_to_budget(step: Callable[[torch.Tensor], None], validate: Callable[[], float],
                  batches: Callable[[int], Iterator[torch.Tensor]], opts: FitOptions,
                  clock: FiringClock, log: Callable[[int, float], None] | None = None
                  ) -> FitRecord:
    """Call ``step(batch)`` on ``opts.batch_tokens`` batches (``batches(epoch)`` yields them,
    re-called per pass over the cache) until the token budget or a plateau of ``validate()``;
    ``log(tokens, val_fvu)`` at each evaluation."""
    record, started = FitRecord(), time.perf_counter()
    best, bad, next_eval = math.inf, 0, opts.eval_every_tokens
    epoch = 0
    while record.tokens < opts.token_budget:
        empty = True
        for x in batches(epoch):
            empty = False
            step(x)
            record.tokens += x.shape[0]
            if record.tokens >= next_eval or record.tokens >= opts.token_budget:
                next_eval += opts.eval_every_tokens
                fvu = validate()
                record.curve.append((record.tokens, fvu))
                if log is not None:
                    log(record.tokens, fvu)
                if fvu < best * (1 - opts.min_improvement):
                    best, bad = fvu, 0
                else:
                    bad += 1
                if opts.plateau and bad >= opts.patience:
                    record.stopped_early = record.tokens < opts.token_budget
                    break
            if record.tokens >= opts.token_budget:
                break
        if empty:
            raise ValueError("the activation cache's training shards give no whole batch: "
                             "lower batch_tokens or collect a larger cache")
        if record.stopped_early:
            break
        epoch += 1
    record.seconds = time.perf_counter() - started
    record.dead_fraction, record.dead_window_tokens = clock.dead_fraction(record.tokens)
    return record

