"""Logit lens of single codes: which output tokens a code pushes up or down, read off the weights.

A code's direct effect on the logits is taken along the linear path from its site to the
unembedding, as SAE dashboards do for decoder directions:

* a site on the input of a linear layer that writes to the residual stream (``attn_heads``: the
  heads' merged outputs entering the attention output projection, one group per head;
  ``mlp_hidden``: the MLP hidden units entering the down projection) goes through the columns
  of that layer's weight its group feeds (GPT-2's ``Conv1D`` stores the weight transposed);
* a site of residual-stream width (``attn``, ``mlp``, ``block``) is the residual-stream vector
  itself, its group's slice of the width, zero elsewhere;
* then the final norm's elementwise weight (``1 + weight`` for Gemma's RMSNorm) and the
  unembedding.

The final norm's division by the activation's norm (and LayerNorm's centering) is ignored, as are
all biases: they are the same for every code, so the comparison between codes and tokens holds.
Nothing is run through the model; only weights are read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from codebook.errors import ConfigError
from codebook.layer import CodebookLayer
from codebook.model import CodebookModel
from codebook.sites import Site, site_module

# Names of the norm between the last layer and the unembedding, on the HF base model
# (GPT-NeoX ``final_layer_norm``, Llama-like ``norm``, GPT-2 / GPT-Neo ``ln_f``, ...).
FINAL_NORM_NAMES = ("final_layer_norm", "norm", "ln_f", "final_layernorm", "final_norm",
                    "norm_f")
_IGNORED = ("ignoring the final norm's division by the activation's norm (one positive factor "
            "per token position) and its centering (for LayerNorm), and every bias (the same for "
            "every code)")


@torch.no_grad()
def direction(model: CodebookModel, site: str, group: int, code: int) -> torch.Tensor:
    """The (d_model,) residual-stream vector a code adds, before the final norm (fp32)."""
    _, layer = _checked(model, site, group, [code])
    return _residual_vectors(model, site, group, layer.codes[group, [code]])[0][0]


@torch.no_grad()
def logit_lens_matrix(model: CodebookModel, site: str, group: int,
                      codes: Sequence[int]) -> torch.Tensor:
    """(len(codes), vocab) direct logit effects of ``codes`` of one group of a site (fp32)."""
    codes = list(codes)
    _, layer = _checked(model, site, group, codes)
    resid, _ = _residual_vectors(model, site, group, layer.codes[group, codes])
    return _unembed(model, resid)[0]


@torch.no_grad()
def logit_lens(model: CodebookModel, site: str, group: int, code: int,
               top: int = 10) -> dict[str, Any]:
    """The ``top`` tokens a code raises most (``positive``, largest first) and lowers most
    (``negative``, most negative first), each ``{"token_id", "token": None, "logit"}`` (the
    caller fills in token strings), plus ``method``: one sentence on the approximation."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ConfigError("top", f"got {top!r}", "use an integer >= 0")
    _, layer = _checked(model, site, group, [code])
    resid, path = _residual_vectors(model, site, group, layer.codes[group, [code]])
    logits, norm = _unembed(model, resid)
    logits = logits[0].cpu()
    n = min(top, logits.numel())
    pos = logits.topk(n)
    neg = (-logits).topk(n)

    def rows(ids: torch.Tensor) -> list[dict[str, Any]]:
        return [{"token_id": int(i), "token": None, "logit": float(logits[i])} for i in ids]

    what = "head" if model.site(site).per_head else "group"
    method = (f"Linear logit lens of code {code} of {site} {what} {group}: {path}, times the "
              f"final norm's elementwise weight ({norm}), times the unembedding, {_IGNORED}"
              f"{_softcap_note(model)}.")
    return {"method": method, "positive": rows(pos.indices), "negative": rows(neg.indices)}


# ---------------------------------------------------------------------------- internals
def _checked(model: CodebookModel, site: str, group: int,
             codes: Sequence[int]) -> tuple[Site, CodebookLayer]:
    """The site and its codebook, after checking that ``group`` and ``codes`` exist."""
    s = model.site(site)  # ConfigError listing the sites for an unknown name
    layer = model.codebooks[site]
    if isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < layer.groups:
        raise ConfigError("group", f"{group!r} is not a group of {site} "
                          f"({layer.groups} groups)", f"use 0..{layer.groups - 1}")
    for code in codes:
        if isinstance(code, bool) or not isinstance(code, int) or not (
                0 <= code < layer.num_codes):
            raise ConfigError("code", f"{code!r} is not a code of {site} "
                              f"({layer.num_codes} codes per group)",
                              f"use 0..{layer.num_codes - 1}")
    return s, layer


def _unembedding(model: CodebookModel) -> torch.Tensor:
    """The (vocab, d_model) unembedding weight."""
    out = model.model.get_output_embeddings()
    weight = getattr(out, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ValueError(f"{type(model.model).__name__} has no output embedding weight "
                         "(get_output_embeddings()) to read logits from")
    return weight


def _out_in_weight(module: nn.Module) -> torch.Tensor | None:
    """A linear layer's weight as (out, in): nn.Linear as stored, GPT-2's Conv1D transposed;
    None for a module that is not a linear layer."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # y = x @ W + b
        return weight.t()
    if isinstance(module, nn.Linear) or hasattr(module, "in_features"):
        return weight
    return None


def _residual_vectors(model: CodebookModel, site: str, group: int,
                      codes: torch.Tensor) -> tuple[torch.Tensor, str]:
    """(n, d_model) fp32 residual-stream vectors of ``codes`` (n, group_dim) of one group, and a
    phrase saying how they were obtained; ValueError where the site has no linear path."""
    s = model.site(site)
    gd = model.codebooks[site].group_dim
    lo, hi = group * gd, (group + 1) * gd
    d_model = _unembedding(model).shape[1]
    codes = codes.detach().float()
    what = f"head {group}" if s.per_head else f"group {group}"
    if s.hook == "pre":
        module = site_module(model.model, s)
        weight = _out_in_weight(module)
        if weight is not None:
            if weight.shape[0] != d_model:
                raise ValueError(
                    f"site {site} is the input of {s.module_path}, which writes "
                    f"{weight.shape[0]} wide, not the residual stream's {d_model}: no linear "
                    "path to the unembedding")
            cols = weight[:, lo:hi].to(codes.device, torch.float32)  # (d_model, group_dim)
            kind = type(module).__name__
            return codes @ cols.t(), (f"the code times columns {lo}:{hi} (those of {what}) "
                                      f"of the {s.module_path} weight ({kind})")
    if s.dim == d_model:
        out = codes.new_zeros(codes.shape[0], d_model)
        out[:, lo:hi] = codes
        span = "" if (lo, hi) == (0, d_model) else f" at dims {lo}:{hi}"
        return out, f"the code as a residual-stream vector{span}"
    where = "input" if s.hook == "pre" else "output"
    raise ValueError(
        f"site {site} ({s.kind}) is the {where} of {s.module_path}, {s.dim} wide, neither the "
        f"residual stream ({d_model} wide) nor the input of a linear layer that writes to it: "
        "no linear path to the unembedding")


def final_norm(model: CodebookModel) -> tuple[str, nn.Module]:
    """The norm between the last layer and the unembedding: the shallowest module of the base
    model named one of FINAL_NORM_NAMES outside the numbered layers; ValueError if none."""
    base = model.model.base_model
    found = [(name, m) for name, m in base.named_modules()
             if name and name.rsplit(".", 1)[-1] in FINAL_NORM_NAMES
             and not any(part.isdigit() for part in name.split("."))]
    if not found:
        raise ValueError(
            f"no final norm found on {type(base).__name__}: no module named one of "
            f"{FINAL_NORM_NAMES} outside its layers")
    module = min(found, key=lambda nm: nm[0].count("."))[1]
    full = next(n for n, m in model.model.named_modules() if m is module)
    return full, module


def _norm_weight(model: CodebookModel, d_model: int) -> tuple[torch.Tensor | None, str]:
    """The final norm's elementwise scale (None: no scale) and a phrase naming it."""
    name, module = final_norm(model)
    weight = getattr(module, "weight", None)
    kind = type(module).__name__
    if weight is None:
        return None, f"{name}, {kind} without a weight: none"
    if weight.shape != (d_model,):
        raise ValueError(f"the final norm {name} has a weight of shape {tuple(weight.shape)}, "
                         f"not ({d_model},)")
    weight = weight.detach().float()
    if "Gemma" in kind:  # Gemma's RMSNorm scales by (1 + weight)
        return 1.0 + weight, f"{name}, {kind}, as 1 + weight"
    return weight, f"{name}, {kind}"


def _unembed(model: CodebookModel, resid: torch.Tensor) -> tuple[torch.Tensor, str]:
    """(n, vocab) fp32 logit effects of (n, d_model) residual vectors, and the norm's phrase."""
    w_u = _unembedding(model)
    scale, norm = _norm_weight(model, w_u.shape[1])
    resid = resid.to(w_u.device)
    if scale is not None:
        resid = resid * scale.to(w_u.device)
    return resid @ w_u.detach().float().t(), norm


def _softcap_note(model: CodebookModel) -> str:
    cfg = model.model.config
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    cap = getattr(cfg, "final_logit_softcapping", None)
    if not cap:
        return ""
    return (f", before the final logit soft-capping cap * tanh(logit / cap) with cap={cap} "
            "(monotone: the ranking holds)")
