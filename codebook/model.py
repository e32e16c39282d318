"""A Hugging Face causal LM with codebooks attached at named sites by hooks.

``CodebookModel`` owns the HF model and one ``CodebookLayer`` per site. Hooks route each site's
activation through its codebook; the HF forward pass itself is untouched, so ``generate`` and
new ``transformers`` releases work as they are. Saved as a normal HF model folder plus
``codebooks.safetensors`` and ``codebook_config.json``; loaded from a folder or a Hub repo id,
pushed to the Hub with a model card (codebook/hub.py, imported inside the methods that use it:
the dependency runs model -> hub only). The folder's file names belong to codebook/checkpoint.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from codebook.checkpoint import (
    CODEBOOK_CONFIG_FILE,
    CODEBOOK_WEIGHTS_FILE,
    K_IN_FORCE,
    check_model_folder,
    looks_local,
)
from codebook.config import CodebookConfig
from codebook.errors import ConfigError
from codebook.io import atomic_dir
from codebook.layer import CodebookLayer
from codebook.sites import Site, module_width, resolve_sites, site_module


@dataclass
class CodebookOutput:
    """Model outputs plus the codebook loss terms, all logged separately by the training loop."""

    logits: torch.Tensor
    loss: torch.Tensor | None
    lm_loss: torch.Tensor | None
    recon_loss: torch.Tensor
    commit_loss: torch.Tensor


class CodebookModel(nn.Module):
    """A causal LM whose activations at ``config.sites`` are replaced by codebook codes."""

    def __init__(self, model: nn.Module, config: CodebookConfig):
        super().__init__()
        self.sites: dict[str, Site] = {s.name: s for s in resolve_sites(model.config, config)}
        self.model = model
        self.codebook_config = config
        # The base model's Hub id for model cards (set by from_pretrained; None: unknown).
        self.base_model_name: str | None = None
        self.codebooks = nn.ModuleDict()
        recent = 1024 if config.dead_code_steps else 0
        for name, site in self.sites.items():
            _check_site_width(model, site)
            self.codebooks[name] = CodebookLayer(
                site.dim, config.num_codes, config.k, site.groups, config.score,
                config.combine, config.layer_norm, config.score_chunk_tokens, config.init_std,
                recent_inputs=recent,
            )
        self._positions: torch.Tensor | None = None
        self._hooks = [model.register_forward_pre_hook(self._track_positions, with_kwargs=True)]
        for name, site in self.sites.items():
            module = site_module(model, site)
            if site.hook == "pre":
                hook = module.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True)
            else:
                hook = module.register_forward_hook(self._post_hook(name))
            self._hooks.append(hook)

    # ------------------------------------------------------------------ hooks
    def _track_positions(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Record absolute positions of this call's tokens (KV-cache aware, for interventions)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            self._positions = None
            return
        t = ids.shape[1]
        cache_position = kwargs.get("cache_position")
        if cache_position is not None:
            self._positions = cache_position.to(ids.device)
            return
        past = kwargs.get("past_key_values")
        if past is None:
            past = kwargs.get("cache")  # transformers >= 5.24 passes the KV cache as ``cache``
        has_length = past is not None and hasattr(past, "get_seq_length")
        offset = past.get_seq_length() if has_length else 0
        self._positions = torch.arange(offset, offset + t, device=ids.device)

    def _pre_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if args:
                return (self.codebooks[name](args[0], self._positions), *args[1:]), kwargs
            key = next(iter(kwargs))
            kwargs = dict(kwargs)
            kwargs[key] = self.codebooks[name](kwargs[key], self._positions)
            return args, kwargs
        return hook

    def _post_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any):
            if isinstance(output, tuple):
                return (self.codebooks[name](output[0], self._positions), *output[1:])
            return self.codebooks[name](output, self._positions)
        return hook

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs: Any) -> CodebookOutput:
        """Run the LM; ``loss`` = lm_loss + recon_weight * recon + commit_weight * commit."""
        for layer in self.codebooks.values():
            layer.last_losses = None
            layer.commit_grad = bool(self.codebook_config.commit_weight)  # 0: no graph for it
        out = self.model(input_ids=input_ids, labels=labels, **kwargs)
        terms = [layer.last_losses for layer in self.codebooks.values()
                 if layer.last_losses is not None]
        zero = out.logits.new_zeros(())
        recon = torch.stack([t.recon for t in terms]).sum() if terms else zero
        commit = torch.stack([t.commit for t in terms]).sum() if terms else zero
        loss = None
        if out.loss is not None:
            cfg = self.codebook_config
            loss = out.loss + cfg.recon_weight * recon
            if cfg.commit_weight:
                loss = loss + cfg.commit_weight * commit
        return CodebookOutput(out.logits, loss, out.loss, recon, commit)

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``transformers`` generation with the codebooks (and any interventions) in effect."""
        return self.model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ controls
    @contextmanager
    def codebooks_disabled(self) -> Iterator[None]:
        """Run the plain model: every codebook passes its input through unchanged."""
        before = {n: layer.enabled for n, layer in self.codebooks.items()}
        for layer in self.codebooks.values():
            layer.enabled = False
        try:
            yield
        finally:
            for n, layer in self.codebooks.items():
                layer.enabled = before[n]

    def set_step(self, step: int) -> None:
        """Apply the k schedule for optimizer step ``step`` (host-side; no device sync)."""
        k = self.codebook_config.k_at(step)
        for layer in self.codebooks.values():
            layer.k = k

    @property
    def k_in_force(self) -> int:
        """The k the codebooks select now (the k schedule's current value)."""
        return next(iter(self.codebooks.values())).k if self.codebooks else self.codebook_config.k

    def codebook_parameters(self) -> list[nn.Parameter]:
        return list(self.codebooks.parameters())

    def base_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def site(self, name: str) -> Site:
        """The site called ``name``, or a ConfigError listing the valid names."""
        if name not in self.sites:
            raise ConfigError("site", f"unknown site {name!r}", f"use one of {list(self.sites)}")
        return self.sites[name]

    def metrics(self, reset: bool = True) -> dict[str, float]:
        """Per-site metrics ``<site>/<metric>`` plus their means ``codebook/<metric>``."""
        result: dict[str, float] = {}
        sums: dict[str, float] = {}
        for name, layer in self.codebooks.items():
            for key, value in layer.metrics(reset).items():
                result[f"{name}/{key}"] = value
                sums[key] = sums.get(key, 0.0) + value
        for key, value in sums.items():
            result[f"codebook/{key}"] = value / max(len(self.codebooks), 1)
        return result

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                        tokenizer: Any = None) -> Path:
        """Write an HF model folder plus codebooks, atomically (temp folder, then rename).

        With ``tokenizer`` its files go in the same folder, so the model is never read with
        another tokenizer than the one it was trained with."""
        path = Path(path)
        with atomic_dir(path) as tmp:
            base_sd = None
            if state_dict is not None:
                base_sd = {k[len("model."):]: v for k, v in state_dict.items()
                           if k.startswith("model.")}
            self.model.save_pretrained(tmp, state_dict=base_sd)
            cb_sd = state_dict or self.state_dict()
            codebooks = {k: v.detach().cpu().contiguous() for k, v in cb_sd.items()
                         if k.startswith("codebooks.")}
            save_file(codebooks, str(tmp / CODEBOOK_WEIGHTS_FILE),
                      metadata={K_IN_FORCE: str(self.k_in_force)})
            self.codebook_config.save(tmp / CODEBOOK_CONFIG_FILE)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        return path

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path,
                        codebook_config: CodebookConfig | None = None,
                        **hf_kwargs: Any) -> CodebookModel:
        """Load a saved codebook model, or a base HF model plus new codebooks.

        ``name_or_path`` is a local folder or a Hub repo id (``owner/name``; its files come
        through ``huggingface_hub``'s cache, so ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` apply). If
        it holds ``codebook_config.json``, the saved codebooks are loaded (``codebook_config``
        must then be None or equal), unless it lists no sites (a plain model the loop trained:
        a base model like any other). Otherwise ``codebook_config`` is required and fresh
        codebooks are attached.
        """
        from transformers import AutoModelForCausalLM

        folder = Path(name_or_path)
        if folder.exists() or looks_local(name_or_path):  # local: a ConfigError names a bad file
            check_model_folder(folder, "name_or_path", gguf_file=hf_kwargs.get("gguf_file"))
        elif not hf_kwargs.get("gguf_file"):  # a Hub id: the codebook files from its snapshot
            from codebook.hub import hub_codebook_files

            found = hub_codebook_files(str(name_or_path), required=codebook_config is None,
                                       **hf_kwargs)
            if found is not None:
                folder, commit = found
                if commit:  # the base model from the same commit as the codebooks
                    hf_kwargs = {**hf_kwargs, "revision": commit}
        saved = folder / CODEBOOK_CONFIG_FILE
        stored = CodebookConfig.load(saved) if saved.is_file() else None
        if stored is not None and not stored.sites and codebook_config is not None:
            stored = None  # a plain model the loop saved (no sites): a base model like any other
        if stored is not None:
            if codebook_config is not None and codebook_config != stored:
                raise ConfigError(
                    "codebook_config",
                    f"differs from the one saved in {saved}",
                    "pass codebook_config=None to use the saved codebooks",
                )
            codebook_config = stored
        elif codebook_config is None:
            raise ConfigError(
                "codebook_config",
                f"{name_or_path} has no {CODEBOOK_CONFIG_FILE}",
                "pass codebook_config= to attach new codebooks to a base model",
            )
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(name_or_path, **_config_kwargs(hf_kwargs))
        resolve_sites(hf_config, codebook_config)  # fail before any weights are read
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **hf_kwargs)
        if hf_kwargs.get("gguf_file"):  # weights are dequantised on load: save them as such
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        cb_model = cls(model, codebook_config)
        if stored is not None:
            from codebook.hub import card_base_model

            cb_model.load_codebooks(folder / CODEBOOK_WEIGHTS_FILE)
            cb_model.base_model_name = card_base_model(folder) or ""
        elif not (Path(name_or_path).exists() or looks_local(name_or_path)):
            cb_model.base_model_name = str(name_or_path)  # new codebooks on a Hub model
        return cb_model

    def push_to_hub(self, repo_id: str, base_model: str | None = None, tokenizer: Any = None,
                    **kwargs: Any) -> str:
        """Upload this model, its codebooks and a model card (base model, sites, k, codebook
        size) to Hub repo ``repo_id``; returns the commit URL. ``kwargs``: ``private``,
        ``token``, ``revision``, ``commit_message``, ``create_pr`` (see codebook.hub)."""
        from codebook.hub import push_to_hub

        return push_to_hub(self, repo_id, base_model, tokenizer, **kwargs)

    def load_codebooks(self, file: str | Path) -> None:
        """Load codebook weights, with a clear error when they do not fit this model."""
        tensors = load_file(str(file))
        with safe_open(str(file), framework="pt") as fh:
            saved_k = (fh.metadata() or {}).get(K_IN_FORCE)
        own = {k: v for k, v in self.state_dict().items() if k.startswith("codebooks.")}
        missing = sorted(set(own) - set(tensors))
        extra = sorted(set(tensors) - set(own))
        if missing or extra:
            raise ConfigError(
                str(file),
                f"codebooks do not match this model "
                f"(missing {missing[:3]}, unexpected {extra[:3]})",
                "load it with the codebook config and base model it was trained with",
            )
        for k, v in tensors.items():
            if v.shape != own[k].shape:
                raise ConfigError(
                    str(file),
                    f"{k} has shape {tuple(v.shape)}, this model expects {tuple(own[k].shape)}",
                    "load it with the codebook config and base model it was trained with",
                )
        self.load_state_dict(tensors, strict=False)
        if saved_k is not None:  # the k schedule's value when saved (older files: config's k)
            for layer in self.codebooks.values():
                layer.k = int(saved_k)


def _config_kwargs(hf_kwargs: dict[str, Any]) -> dict[str, Any]:
    keep = ("revision", "trust_remote_code", "cache_dir", "local_files_only", "token", "gguf_file")
    return {k: v for k, v in hf_kwargs.items() if k in keep}


def _check_site_width(model: nn.Module, site: Site) -> None:
    """The hooked module's real width must match the config's (catches head-count mismatches)."""
    width = module_width(site_module(model, site), site.hook)
    if width is not None and width != site.dim:
        raise ConfigError(
            f"codebook.sites[{site.kind}]",
            f"{site.module_path} has width {width} but the model config implies {site.dim}"
            + (" (head count x head size mismatch)" if site.per_head else ""),
            "check num_attention_heads / head_dim in the model config"
            + (", or the site's width in codebook.site_patterns" if not site.per_head else ""),
        )
