"""Where codebook sites live inside a Hugging Face decoder: module-name patterns and presets.

A site is hooked, never re-implemented: a forward pre-hook replaces a module's input, a forward
hook replaces its output. A ``SitePattern`` names the module of every layer by a pattern with
one ``*`` for the layer index (``model.layers.*.mlp``); a preset is the patterns of the five
built-in kinds for one ``model_type``. Any other decoder works by giving the patterns in
``CodebookConfig.site_patterns``. Only module *names* are model-specific, so new
``transformers`` releases keep working as long as they keep those names.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any, Literal

from torch import nn

from codebook.config import CodebookConfig, SitePattern
from codebook.errors import ConfigError

HookKind = Literal["pre", "post"]

# Within a layer, the order in which the forward pass reaches the built-in kinds (the pre-hook
# on the output projection runs before its post-hook). Other kinds default to OTHER_ORDER.
KIND_FORWARD_ORDER = {"attn_heads": 0.0, "attn": 0.5, "mlp_hidden": 1.0, "mlp": 2.0, "block": 3.0}
OTHER_ORDER = 4.0


def decoder_preset(layers: str, attn_out_proj: str, mlp: str, mlp_down_proj: str, *,
                   attn_residual: str | None = None,
                   mlp_residual: str | None = None) -> dict[str, SitePattern]:
    """The five built-in kinds of a decoder whose layers are ``<layers>.<i>`` (other names are
    inside one layer). ``attn``/``mlp`` hook what the sublayer adds to the residual stream: the
    output projection and the MLP, or ``attn_residual``/``mlp_residual`` (a norm after them)."""
    layer = f"{layers}.*"
    return {
        "attn_heads": SitePattern(f"{layer}.{attn_out_proj}", "pre", "heads", per_head=True),
        "attn": SitePattern(f"{layer}.{attn_residual or attn_out_proj}", "post", "hidden"),
        "mlp_hidden": SitePattern(f"{layer}.{mlp_down_proj}", "pre", "intermediate"),
        "mlp": SitePattern(f"{layer}.{mlp_residual or mlp}", "post", "hidden"),
        "block": SitePattern(layer, "post", "hidden"),
    }


# Llama layout: attention ``self_attn.o_proj`` (its input: the heads' merged outputs,
# num_heads x head_dim wide), MLP ``mlp`` with ``mlp.down_proj``.
_LLAMA = decoder_preset("model.layers", "self_attn.o_proj", "mlp", "mlp.down_proj")
# Gemma 2 and 3 put a norm on each sublayer's output before the residual add: ``attn`` and
# ``mlp`` hook post_attention_layernorm / post_feedforward_layernorm, the modules whose outputs
# are added to the residual stream (the MLP's own output is one norm earlier).
_GEMMA = decoder_preset("model.layers", "self_attn.o_proj", "mlp", "mlp.down_proj",
                        attn_residual="post_attention_layernorm",
                        mlp_residual="post_feedforward_layernorm")

# model_type (from the HF config) -> patterns of the built-in site kinds.
PRESETS: dict[str, dict[str, SitePattern]] = {
    "gpt_neox": decoder_preset("gpt_neox.layers", "attention.dense", "mlp", "mlp.dense_4h_to_h"),
    "gpt2": decoder_preset("transformer.h", "attn.c_proj", "mlp", "mlp.c_proj"),
    "gpt_neo": decoder_preset("transformer.h", "attn.attention.out_proj", "mlp", "mlp.c_proj"),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    # Qwen 3: q/k norms inside attention; head_dim is its own setting (num_heads x head_dim can
    # differ from hidden_size), read from the config for the attn_heads width.
    "qwen3": _LLAMA,
    # Phi-3: fused qkv_proj and mlp.gate_up_proj; o_proj and mlp.down_proj as in Llama. The
    # residual dropouts after attention and MLP are not sites (identity at eval; resid_pdrop 0).
    "phi3": _LLAMA,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,  # Gemma 3's text model (Gemma3ForCausalLM, e.g. gemma-3-1b)
    # Gemma 3 with its vision tower (Gemma3ForConditionalGeneration, e.g. gemma-3-4b): sites in
    # the language model only; widths from the config's text_config.
    "gemma3": decoder_preset("model.language_model.layers", "self_attn.o_proj", "mlp",
                             "mlp.down_proj", attn_residual="post_attention_layernorm",
                             mlp_residual="post_feedforward_layernorm"),
}
FAMILIES = PRESETS  # the older name

_PATTERN_EXAMPLE = (
    "site_patterns={'attn_heads': {'module': 'model.layers.*.self_attn.o_proj', 'hook': 'pre', "
    "'width': 'heads', 'per_head': True}, 'mlp': {'module': 'model.layers.*.mlp', "
    "'hook': 'post', 'width': 'hidden'}}")


@dataclass(frozen=True)
class Site:
    """One codebook site in one layer."""

    kind: str
    layer: int
    module_path: str
    hook: HookKind
    dim: int
    groups: int
    pattern: str = ""  # the module pattern the path came from (``*`` for the layer)
    per_head: bool = False

    @property
    def name(self) -> str:
        """Stable identifier, e.g. ``attn_heads_3`` (also the key of its codebook)."""
        return f"{self.kind}_{self.layer}"


@dataclass
class SiteInfo:
    """A trained model's site as a code store records it (``resolve.site_infos`` reads it from
    the model's configs): ``groups x k`` code ids per token, ids < ``num_codes``, inputs of
    width ``dim``."""

    groups: int
    k: int
    num_codes: int
    dim: int

    @property
    def width(self) -> int:
        return self.groups * self.k


def site_patterns(model_config: Any, config: CodebookConfig) -> dict[str, SitePattern]:
    """The pattern of every kind in ``config.sites``: ``config.site_patterns`` first, then the
    preset of the config's model_type; a ConfigError names the presets and the way out."""
    model_type = getattr(model_config, "model_type", None)
    patterns = {**PRESETS.get(model_type, {}), **config.site_patterns}
    missing = [k for k in config.sites if k not in patterns]
    if missing:
        raise ConfigError(
            "model.model_type",
            f"unsupported model family {model_type!r}: no site preset, and "
            f"codebook.site_patterns does not give {missing}",
            f"use a model whose model_type has a preset ({sorted(PRESETS)}), or give each site "
            f"by module-name pattern ('*' = layer index), e.g. CodebookConfig(sites="
            f"['attn_heads', 'mlp'], {_PATTERN_EXAMPLE}); list the names with "
            "codebook.sites.module_names(model, '*.0.*')")
    return {k: patterns[k] for k in config.sites}


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


def _head_dim(cfg: Any) -> int:
    n_heads, hidden = _num_heads(cfg), int(cfg.hidden_size)
    if getattr(cfg, "head_dim", None):
        return int(cfg.head_dim)
    if hidden % n_heads:
        raise ConfigError(
            "model.num_attention_heads",
            f"{n_heads} heads do not divide hidden_size={hidden}",
            "use a model whose head count divides its width",
        )
    return hidden // n_heads


def _width(cfg: Any, kind: str, width: int | str) -> int:
    """A pattern's width in this model config."""
    if isinstance(width, int):
        return width
    if width == "hidden":
        return int(cfg.hidden_size)
    if width == "heads":
        return _num_heads(cfg) * _head_dim(cfg)
    if width == "intermediate":
        return _intermediate_size(cfg)
    value = getattr(cfg, width, None)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(
            f"codebook.site_patterns.{kind}.width",
            f"the model config's {width!r} is {value!r}, not a positive integer",
            "use 'hidden', 'heads', 'intermediate', an integer or an integer config attribute")
    return value


def resolve_sites(model_config: Any, config: CodebookConfig) -> list[Site]:
    """Turn codebook settings into concrete sites for a model config (no weights touched),
    in the order the forward pass reaches them.

    Raises ConfigError for a model_type without a preset (unless ``site_patterns`` gives every
    site), a layer index out of range, a group count that does not divide a site's dimension,
    or heads that do not divide the attention width.
    """
    patterns = site_patterns(model_config, config)
    if hasattr(model_config, "get_text_config"):  # multimodal: the language model's settings
        model_config = model_config.get_text_config()
    n_layers = _num_layers(model_config)
    layers = list(range(n_layers)) if config.layers == "all" else list(config.layers)
    for i in layers:
        if not 0 <= i < n_layers:
            raise ConfigError(
                "codebook.layers",
                f"layer {i} does not exist (the model has {n_layers} layers)",
                f"use indices in 0..{n_layers - 1} or 'all'",
            )

    def order(kind: str) -> float:
        given = patterns[kind].order
        return given if given is not None else KIND_FORWARD_ORDER.get(kind, OTHER_ORDER)

    kinds = sorted(patterns, key=order)  # stable: ties keep the order of config.sites
    shapes = {}
    for kind in kinds:
        p = patterns[kind]
        dim = _width(model_config, kind, p.width)
        groups = _num_heads(model_config) if p.per_head else config.groups
        if dim % groups:
            field = "model.num_attention_heads" if p.per_head else "codebook.groups"
            raise ConfigError(
                field,
                f"{groups} {'heads' if p.per_head else 'groups'} do not divide the {kind} "
                f"dimension {dim}",
                f"choose a divisor of {dim}",
            )
        shapes[kind] = (dim, groups)
    sites: list[Site] = []
    for layer in sorted(set(layers)):  # forward order: layer by layer, then kind by kind
        for kind in kinds:
            p = patterns[kind]
            sites.append(Site(kind, layer, p.module.replace("*", str(layer)), p.hook,
                              *shapes[kind], pattern=p.module, per_head=p.per_head))
    return sites


def module_names(model: nn.Module, pattern: str = "*") -> list[str]:
    """Names from ``model.named_modules()`` that match a shell-style ``pattern`` (fnmatch), to
    find the names to give in ``site_patterns``; e.g. ``module_names(model, "*.0.*")``."""
    return [name for name, _ in model.named_modules() if name and fnmatch(name, pattern)]


def site_module(model: nn.Module, site: Site) -> nn.Module:
    """The module a site hooks, or a ConfigError naming this model's similar module names."""
    try:
        return model.get_submodule(site.module_path)
    except AttributeError:
        last = site.module_path.rsplit(".", 1)[-1]
        near = module_names(model, f"*{last}*") or module_names(model, f"*.{site.layer}.*")
        raise ConfigError(
            f"codebook.sites[{site.kind}]",
            f"{type(model).__name__} has no module {site.module_path!r} "
            f"(pattern {site.pattern!r})",
            f"give codebook.site_patterns.{site.kind} a module name of this model, e.g. one "
            f"of {near[:8]} with the layer index as '*'",
        ) from None


def module_width(module: nn.Module, hook: HookKind) -> int | None:
    """The width a module takes (``pre``) or gives (``post``) when its type tells it: linear
    layers, GPT-2's Conv1D, and norms with a 1-D weight; None for containers."""
    if hook == "pre":
        width = getattr(module, "in_features", None) or getattr(module, "nx", None)
    else:
        width = getattr(module, "out_features", None) or getattr(module, "nf", None)
    if width is None:
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            shape = getattr(weight, "ds_shape", None) or weight.shape  # ZeRO-3: full shape
            if len(shape) == 1:
                width = shape[0]
    return int(width) if width is not None else None
