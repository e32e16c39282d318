"""Which model a reference names, and what it holds: resolving ``--model`` for extraction,
steering and the browser.

A reference is an MLflow URI (downloaded once), a training checkpoint (its ``hf/`` folder), a
saved codebook model folder or a hub name; ``codebook.checkpoint`` checks the folders.
``site_infos`` reads a saved model's sites from its configs alone, ``load_extraction_model``
loads it at the k its training reached.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from codebook.errors import ConfigError
from codebook.store import SiteInfo


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

    cb = CodebookConfig.load(Path(model_path) / "codebook_config.json")
    sites = resolve_sites(AutoConfig.from_pretrained(model_path), cb)
    k = cb.k_at(trained_steps(model_path))
    return {s.name: SiteInfo(groups=s.groups, k=k, num_codes=cb.num_codes, dim=s.dim)
            for s in sites}


def trained_steps(model_path: str) -> int:
    """The optimizer step a checkpoint's ``hf/`` folder was saved at (its trainer state);
    a model folder without one counts as fully trained (the k schedule's final k)."""
    state = Path(model_path).parent / "trainer_state.json"
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


def load_extraction_model(model_path: str, device: str = "cpu") -> Any:
    """The codebook model for extraction, in eval mode, at its final k (read from the
    checkpoint's trainer state when there is one)."""
    from codebook.model import CodebookModel

    model = CodebookModel.from_pretrained(model_path).to(device).eval()
    model.set_step(trained_steps(model_path))
    return model
