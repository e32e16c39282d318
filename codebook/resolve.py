"""Which model a reference names, and what it holds: resolving ``--model`` for extraction,
steering and the browser.

A reference is an MLflow URI (downloaded once), a training checkpoint (its ``hf/`` folder), a
saved codebook model folder or a hub name; ``codebook.checkpoint`` checks the folders.
``site_infos`` reads a saved model's sites from its configs alone, ``load_trained_model``
loads it at the k its training reached.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from codebook.checkpoint import CODEBOOK_CONFIG_FILE, CODEBOOK_WEIGHTS_FILE, K_IN_FORCE, STATE_FILE
from codebook.errors import ConfigError
from codebook.sites import SiteInfo


def resolve_model(ref: str, download_to: Path, tracking_uri: str | None = None) -> str:
    """A local model folder for ``ref``: an MLflow URI (``runs:/<id>/model``, ``models:/...``,
    downloaded once into ``download_to``), a training checkpoint (its ``hf/`` folder), or a
    saved codebook model folder / hub name as given. A local folder is checked first
    (``verify_model_dir``): a missing, cut-short or truncated file is a ConfigError."""
    from codebook.checkpoint import resolve_local, verify_model_dir

    if ref.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        import mlflow

        if (download_to / "codebook_config.json").is_file():
            return str(verify_model_dir(download_to))
        download_to.mkdir(parents=True, exist_ok=True)
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(download_to),
                                                        tracking_uri=tracking_uri)
        except Exception as err:  # noqa: BLE001 - MLflow raises several types
            raise ConfigError("--model", f"cannot download {ref} ({err})",
                              "check the run id and --tracking-uri") from err
        return str(verify_model_dir(local))
    return resolve_local(ref)  # a hub name as it is: from_pretrained resolves it


def site_infos(model_path: str) -> dict[str, SiteInfo]:
    """Every codebook site of a saved model, from its configs (no weights read)."""
    from transformers import AutoConfig

    from codebook.config import CodebookConfig
    from codebook.sites import resolve_sites

    settings = CodebookConfig.load(Path(model_path) / CODEBOOK_CONFIG_FILE)
    sites = resolve_sites(AutoConfig.from_pretrained(model_path), settings)
    k = saved_k(model_path) or settings.k_at(trained_steps(model_path))
    return {s.name: SiteInfo(groups=s.groups, k=k, num_codes=settings.num_codes, dim=s.dim)
            for s in sites}


def saved_k(model_path: str) -> int | None:
    """The k in force when the model was saved (its codebooks file records it), or None for
    models saved before it was recorded."""
    from safetensors import safe_open

    with safe_open(str(Path(model_path) / CODEBOOK_WEIGHTS_FILE), framework="pt") as fh:
        value = (fh.metadata() or {}).get(K_IN_FORCE)
    return int(value) if value is not None else None


def trained_steps(model_path: str) -> int:
    """The optimizer step a checkpoint's ``hf/`` folder was saved at (its trainer state);
    a model folder without one counts as fully trained (the k schedule's final k)."""
    state = Path(model_path).parent / STATE_FILE
    if state.is_file():
        return int(json.loads(state.read_text()).get("step", 0))
    return 10**12


def check_site_names(requested: list[str] | None, available: dict[str, SiteInfo],
                     flag: str) -> list[str]:
    """``requested`` sites (default: all), each checked against the model's sites."""
    if requested is None:
        return list(available)
    unknown = [s for s in requested if s not in available]
    if unknown:
        raise ConfigError(flag, f"unknown sites {unknown}",
                          f"choose from {list(available)}")
    return list(requested)


def load_trained_model(model_path: str, device: str = "cpu") -> Any:
    """A trained codebook model (extraction, steering, the browser), in eval mode, at the k it
    was saved with (older files: the k schedule's value at the checkpoint's step)."""
    from codebook.model import CodebookModel

    model = CodebookModel.from_pretrained(model_path).to(device).eval()
    if saved_k(model_path) is None:
        model.set_step(trained_steps(model_path))
    return model
