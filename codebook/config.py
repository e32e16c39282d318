"""Codebook settings: which sites get codebooks and how each one scores, selects and learns."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from codebook.errors import ConfigError

SITE_KINDS = ("attn_heads", "attn", "mlp", "mlp_hidden", "block")
# Named widths a site pattern can use (anything else is an integer or a model-config attribute).
SITE_WIDTHS = ("hidden", "heads", "intermediate")
# "inner": x . c; "cosine": x . c / (|x| |c|); "euclidean": -|x - c|^2 (ranked as 2 x.c - |c|^2).
SCORES = ("inner", "cosine", "euclidean")
# Old names still read, with a warning: "dot" normalised the codes, so it ranked exactly as
# "cosine" does (a token's own norm scales all its scores alike).
SCORE_ALIASES = {"dot": "cosine"}
COMBINES = ("sum", "mean")

Score = Literal["inner", "cosine", "euclidean"]
Combine = Literal["sum", "mean"]
Hook = Literal["pre", "post"]
_KIND_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


@dataclass(frozen=True)
class SitePattern:
    """Where one site kind lives in every decoder layer, by module name, and how wide it is.

    module: a name from ``model.named_modules()`` with one ``*`` standing for the layer index,
    e.g. ``model.layers.*.mlp``. hook: ``pre`` replaces the module's (first) input, ``post`` its
    output. width: ``hidden`` (hidden_size), ``heads`` (number of heads x head_dim, head_dim from
    the model config when it has one), ``intermediate`` (MLP width), an integer, or the name of
    an integer attribute of the model config (its text_config on a multimodal model).
    per_head: one codebook per attention head instead of ``codebook.groups``. order: where a
    layer's forward pass reaches the site (built-in kinds: attn_heads 0, attn 0.5, mlp_hidden 1,
    mlp 2, block 3; other kinds default to 4); k-means initialisation fits sites in this order.
    """

    module: str
    hook: Hook = "post"
    width: int | str = "hidden"
    per_head: bool = False
    order: float | None = None

    def validate(self, where: str) -> None:
        """Check the pattern alone (no model needed); raise ConfigError on the first fault."""
        parts = self.module.split(".") if isinstance(self.module, str) else []
        if parts.count("*") != 1 or self.module.count("*") != 1 or not all(parts):
            raise ConfigError(
                f"{where}.module", f"got {self.module!r}",
                "give a dotted module name with one '*' segment for the layer index, "
                "e.g. 'model.layers.*.mlp'")
        if self.hook not in ("pre", "post"):
            raise ConfigError(f"{where}.hook", f"got {self.hook!r}",
                              "use 'pre' (replace the input) or 'post' (replace the output)")
        w = self.width
        if isinstance(w, bool) or not isinstance(w, int | str) or (
                isinstance(w, int) and w <= 0) or (isinstance(w, str) and not w.isidentifier()):
            raise ConfigError(
                f"{where}.width", f"got {w!r}",
                f"use one of {SITE_WIDTHS}, a positive integer or a model-config attribute name")
        if not isinstance(self.per_head, bool):
            raise ConfigError(f"{where}.per_head", f"got {self.per_head!r}", "use true or false")
        if self.order is not None and (
                isinstance(self.order, bool) or not isinstance(self.order, int | float)):
            raise ConfigError(f"{where}.order", f"got {self.order!r}", "use a number or null")


@dataclass
class CodebookConfig:
    """Where codebooks go and how they behave.

    sites: any of ``attn_heads`` (per-head attention output before the output projection, one
    codebook per head: the paper's main site), ``attn`` (attention output), ``mlp`` (MLP output),
    ``mlp_hidden`` (input of the MLP down projection), ``block`` (transformer block output).
    ``attn`` and ``mlp`` are what the sublayer adds to the residual stream (on Gemma 2/3, the
    output of the norm that follows it). An empty list attaches no codebooks: the plain model,
    trained by the same loop (the control a codebook model is compared with). Each model_type
    with a preset (``codebook.sites.PRESETS``) knows where these live; ``site_patterns``
    overrides them or adds new kinds by module name.
    """

    sites: list[str] = field(default_factory=lambda: ["attn_heads"])
    # Site kind -> SitePattern (or a mapping of its fields): sites by module-name pattern, for
    # models without a preset or sites the presets lack. Codebooks are named ``<kind>_<layer>``.
    site_patterns: dict[str, SitePattern] = field(default_factory=dict)
    layers: str | list[int] = "all"
    num_codes: int = 1000
    k: int = 8
    # k schedule: k decays linearly from ``k`` to ``k_min`` over ``k_schedule_steps`` steps.
    k_min: int | None = None
    k_schedule_steps: int = 0
    score: Score = "cosine"
    combine: Combine = "sum"
    layer_norm: bool = False
    # Independent codebooks over equal chunks of non-head sites (``attn_heads`` uses one per head).
    groups: int = 1
    recon_weight: float = 1.0
    commit_weight: float = 0.0
    # Dead-code replacement: codes unused for this many training forward passes are re-seeded
    # from recent inputs plus noise (0 disables).
    dead_code_steps: int = 0
    dead_code_noise: float = 0.01
    # Codebooks are bypassed before this optimizer step (the model trains without them), then
    # initialised by k-means (if kmeans_init_batches > 0) on the current activations and enabled.
    start_step: int = 0
    # k-means initialisation from this many batches of real activations (0 disables).
    kmeans_init_batches: int = 0
    kmeans_iters: int = 10
    # (token, group) rows scored at once by the PyTorch path; bounds the score matrix to this
    # many x num_codes. None: chosen per device by measurement (codebook.layer.CHUNK_BYTES).
    score_chunk_tokens: int | None = None
    init_std: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.site_patterns, dict):  # mappings (JSON, Python) -> SitePattern
            from codebook.schema import build

            self.site_patterns = {
                k: build(SitePattern, v, f"codebook.site_patterns.{k}")
                for k, v in self.site_patterns.items()}
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check the settings alone (no model needed); raise ConfigError on the first fault."""
        p = "codebook"
        if not isinstance(self.site_patterns, dict):
            raise ConfigError(f"{p}.site_patterns", f"got {self.site_patterns!r}",
                              "give a mapping of site kind -> pattern")
        for kind, pattern in self.site_patterns.items():
            if not isinstance(kind, str) or not _KIND_NAME.fullmatch(kind):
                raise ConfigError(f"{p}.site_patterns", f"bad site kind name {kind!r}",
                                  "use a name of letters, digits and '_' starting with a letter")
            if not isinstance(pattern, SitePattern):
                raise ConfigError(f"{p}.site_patterns.{kind}", f"got {pattern!r}",
                                  "give a SitePattern or a mapping of its fields")
            pattern.validate(f"{p}.site_patterns.{kind}")
        kinds = (*SITE_KINDS, *(k for k in self.site_patterns if k not in SITE_KINDS))
        if not isinstance(self.sites, list | tuple):  # [] : no codebooks, the plain model
            raise ConfigError(
                f"{p}.sites", f"got {self.sites!r}", f"give a list from {kinds} ([]: none)"
            )
        for s in self.sites:
            if s not in kinds:
                raise ConfigError(
                    f"{p}.sites", f"unknown site {s!r}",
                    f"use one of {kinds}, or define {s!r} in codebook.site_patterns")
        if len(set(self.sites)) != len(self.sites):
            raise ConfigError(f"{p}.sites", f"duplicate entries in {self.sites}", "list each once")
        if self.layers != "all" and (
            not isinstance(self.layers, list | tuple)
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers)
        ):
            raise ConfigError(
                f"{p}.layers", f"got {self.layers!r}", "use 'all' or a list of layer indices"
            )
        _positive_int(f"{p}.num_codes", self.num_codes)
        _positive_int(f"{p}.k", self.k)
        if self.k > self.num_codes:
            raise ConfigError(
                f"{p}.k",
                f"k={self.k} is larger than num_codes={self.num_codes}",
                "choose 1 <= k <= num_codes",
            )
        if self.k_min is not None:
            _positive_int(f"{p}.k_min", self.k_min)
            if self.k_min > self.k:
                raise ConfigError(
                    f"{p}.k_min", f"k_min={self.k_min} > k={self.k}",
                    "the schedule decays k: k_min <= k",
                )
            if self.k_schedule_steps <= 0:
                raise ConfigError(
                    f"{p}.k_schedule_steps",
                    "k_min is set but k_schedule_steps <= 0",
                    "set k_schedule_steps to the number of steps over which k decays",
                )
        if self.score in SCORE_ALIASES:
            new = SCORE_ALIASES[self.score]
            warnings.warn(
                f"{p}.score: {self.score!r} is read as {new!r} (it normalised the codes, so it "
                f"ranked exactly like cosine); write {new!r}, or 'inner' for an unnormalised "
                "inner product", FutureWarning, stacklevel=2)
            self.score = new
        if self.score not in SCORES:
            raise ConfigError(f"{p}.score", f"unknown score {self.score!r}", f"use one of {SCORES}")
        if self.combine not in COMBINES:
            raise ConfigError(
                f"{p}.combine", f"unknown combine {self.combine!r}", f"use one of {COMBINES}"
            )
        if self.score == "euclidean" and self.combine == "sum" and self.k > 1:
            # The k codes nearest to x are each close to x, so their sum is near k x; k-means
            # initialisation and dead-code re-seeding put codes at x / k instead, which the
            # nearest-code search then passes over (measured: the reconstruction error of an
            # FSM model at k=2 started 9x that at k=1 and the LM loss rose from 1.26 to 2.3).
            raise ConfigError(
                f"{p}.combine", f"score euclidean with combine sum and k={self.k}: the sum of "
                "the k nearest codes is about k times the input",
                "use combine: mean (the average of the k nearest codes), or a cosine or inner "
                "score with combine sum")
        _positive_int(f"{p}.groups", self.groups)
        for name in ("recon_weight", "commit_weight", "dead_code_noise"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or v < 0:
                raise ConfigError(f"{p}.{name}", f"got {v!r}", "use a number >= 0")
        for name in ("dead_code_steps", "kmeans_init_batches", "start_step"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{p}.{name}", f"got {v!r}", "use an integer >= 0 (0 disables)")
        _positive_int(f"{p}.kmeans_iters", self.kmeans_iters)
        if self.score_chunk_tokens is not None:
            _positive_int(f"{p}.score_chunk_tokens", self.score_chunk_tokens)

    def at_k(self, k: int) -> CodebookConfig:
        """This config with ``k`` codes per token; a euclidean codebook above k=1 averages its
        codes (``combine: mean``): the sum of the k nearest codes is about k times the input."""
        combine = "mean" if self.score == "euclidean" and k > 1 else self.combine
        return dataclasses.replace(self, k=k, combine=combine)

    def k_at(self, step: int) -> int:
        """k in force at optimizer step ``step`` under the linear k schedule."""
        if self.k_min is None or self.k_schedule_steps <= 0:
            return self.k
        frac = min(1.0, max(0, step) / self.k_schedule_steps)
        return max(self.k_min, round(self.k - (self.k - self.k_min) * frac))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "codebook") -> CodebookConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{where}.{unknown[0]}", "unknown key", f"valid keys are {sorted(known)}"
            )
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CodebookConfig:
        return cls.from_dict(json.loads(Path(path).read_text()), where=str(path))


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(name, f"got {value!r}", "use a positive integer")
