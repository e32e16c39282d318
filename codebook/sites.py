"""Where codebook sites live inside each supported Hugging Face model family.

A site is hooked, never re-implemented: a forward pre-hook replaces a module's input, a forward
hook replaces its output. Only module *names* are family-specific, so new ``transformers``
releases keep working as long as they keep those names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from codebook.config import CodebookConfig
from codebook.errors import ConfigError


@dataclass(frozen=True)
class FamilySpec:
    """Module paths of one model family (relative paths are inside one decoder layer)."""

    layers: str
    attn_out_proj: str
    mlp: str
    mlp_down_proj: str


FAMILIES: dict[str, FamilySpec] = {
    "gpt_neox": FamilySpec("gpt_neox.layers", "attention.dense", "mlp", "mlp.dense_4h_to_h"),
    "gpt2": FamilySpec("transformer.h", "attn.c_proj", "mlp", "mlp.c_proj"),
    "gpt_neo": FamilySpec("transformer.h", "attn.attention.out_proj", "mlp", "mlp.c_proj"),
    "llama": FamilySpec("model.layers", "self_attn.o_proj", "mlp", "mlp.down_proj"),
}
# model_type (from the HF config) -> family. Llama-style models share module names.
MODEL_TYPES: dict[str, str] = {
    "gpt_neox": "gpt_neox",
    "gpt2": "gpt2",
    "gpt_neo": "gpt_neo",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
}

HookKind = Literal["pre", "post"]


@dataclass(frozen=True)
class Site:
    """One codebook site in one layer."""

    kind: str
    layer: int
    module_path: str
    hook: HookKind
    dim: int
    groups: int

    @property
    def name(self) -> str:
        """Stable identifier, e.g. ``attn_heads_3`` (also the key of its codebook)."""
        return f"{self.kind}_{self.layer}"


def family_of(model_config: Any) -> str:
    """The family name of a HF config, or a ConfigError listing the supported ones."""
    model_type = getattr(model_config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            "model.model_type",
            f"unsupported model family {model_type!r}",
            f"use a model whose model_type is one of {sorted(MODEL_TYPES)}",
        )
    return MODEL_TYPES[model_type]


def _num_heads(cfg: Any) -> int:
    for attr in ("num_attention_heads", "n_head", "num_heads"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise ConfigError("model.num_attention_heads", "not found in the model config", "set it")


def _num_layers(cfg: Any) -> int:
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise ConfigError("model.num_hidden_layers", "not found in the model config", "set it")


def _intermediate_size(cfg: Any) -> int:
    for attr in ("intermediate_size", "n_inner"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    return 4 * int(cfg.hidden_size)


# Within a layer, the order in which a block computes its sites.
KIND_FORWARD_ORDER = {"attn_heads": 0, "attn": 0, "mlp_hidden": 1, "mlp": 2, "block": 3}


def resolve_sites(model_config: Any, config: CodebookConfig) -> list[Site]:
    """Turn codebook settings into concrete sites for a model config (no weights touched),
    in the order the forward pass reaches them.

    Raises ConfigError for an unknown family, a layer index out of range, a group count that
    does not divide a site's dimension, or heads that do not divide the attention width.
    """
    family = FAMILIES[family_of(model_config)]
    n_layers = _num_layers(model_config)
    n_heads = _num_heads(model_config)
    hidden = int(model_config.hidden_size)
    head_dim = int(getattr(model_config, "head_dim", None) or hidden // n_heads)
    if getattr(model_config, "head_dim", None) is None and hidden % n_heads:
        raise ConfigError(
            "model.num_attention_heads",
            f"{n_heads} heads do not divide hidden_size={hidden}",
            "use a model whose head count divides its width",
        )
    layers = list(range(n_layers)) if config.layers == "all" else list(config.layers)
    for i in layers:
        if not 0 <= i < n_layers:
            raise ConfigError(
                "codebook.layers",
                f"layer {i} does not exist (the model has {n_layers} layers)",
                f"use indices in 0..{n_layers - 1} or 'all'",
            )
    sites: list[Site] = []
    kinds = sorted(dict.fromkeys(config.sites), key=KIND_FORWARD_ORDER.__getitem__)
    for layer in sorted(set(layers)):  # forward order: layer by layer, then kind by kind
        base = f"{family.layers}.{layer}"
        for kind in kinds:
            if kind == "attn_heads":
                site = Site(kind, layer, f"{base}.{family.attn_out_proj}", "pre",
                            n_heads * head_dim, n_heads)
            elif kind == "attn":
                site = Site(kind, layer, f"{base}.{family.attn_out_proj}", "post",
                            hidden, config.groups)
            elif kind == "mlp":
                site = Site(kind, layer, f"{base}.{family.mlp}", "post", hidden, config.groups)
            elif kind == "mlp_hidden":
                site = Site(kind, layer, f"{base}.{family.mlp_down_proj}", "pre",
                            _intermediate_size(model_config), config.groups)
            else:  # block
                site = Site(kind, layer, base, "post", hidden, config.groups)
            if site.dim % site.groups:
                raise ConfigError(
                    "codebook.groups",
                    f"{site.groups} groups do not divide the {kind} dimension {site.dim}",
                    f"choose a divisor of {site.dim}",
                )
            sites.append(site)
    return sites
