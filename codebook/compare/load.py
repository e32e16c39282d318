"""Loading the comparison's models: the frozen base (a plain HF causal LM) and its sites."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from codebook.errors import ConfigError


def load_base(path: str | Path, gguf_file: str | None = None) -> Any:
    """A plain HF causal LM in eval mode from a folder (or a Hub id), fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    from codebook.checkpoint import check_model_folder, looks_local

    if Path(path).exists() or looks_local(str(path)):
        check_model_folder(Path(path), "base_model", gguf_file=gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs)
    return model.eval()


def check_sites(model_config: Any, config: Any, where: str = "sites") -> dict[str, int]:
    """{site: width} of ``config`` (a CodebookConfig) on a model; a ConfigError if the model
    lacks one (``resolve_sites`` names the valid ones)."""
    from codebook.sites import resolve_sites

    try:
        return {s.name: s.dim for s in resolve_sites(model_config, config)}
    except ConfigError as err:
        raise ConfigError(where, str(err), "name sites and layers the base model has") from err
