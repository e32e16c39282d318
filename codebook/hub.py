"""Codebook models on the Hugging Face Hub: found by repo id through ``huggingface_hub`` (its
cache, ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` and tokens as everywhere else), pushed with a model
card that names the base model, the sites, k and the codebook size.

A codebook model on the Hub is the folder ``CodebookModel.save_pretrained`` writes (an HF model
folder plus ``codebook_config.json`` and ``codebooks.safetensors``) and a ``README.md`` card.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from codebook.checkpoint import CODEBOOK_CONFIG_FILE, CODEBOOK_WEIGHTS_FILE, looks_local
from codebook.errors import ConfigError

if TYPE_CHECKING:  # annotations only: hub never imports model at run time (model imports hub)
    from codebook.model import CodebookModel

CARD_FILE = "README.md"
LIBRARY_NAME = "codebook"
TAGS = ("codebook-features", "interpretability", "text-generation")
HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only")
_COMMIT = re.compile(r"[0-9a-f]{40}")


# ---------------------------------------------------------------------- load by name
def hub_codebook_files(repo_id: str, required: bool = True,
                       **hub_kwargs: Any) -> tuple[Path, str | None] | None:
    """The folder holding a Hub repo's codebook files (a snapshot of the HF cache, downloaded
    when needed and allowed) and its commit hash; None when the repo has no codebook config (a
    base model). ``hub_kwargs``: any of ``HUB_KWARGS``, as for ``hf_hub_download``.

    ``required``: the caller cannot go on without the codebooks, so a config that is neither in
    the cache nor reachable is a ConfigError rather than None."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.utils import (  # also there in older releases
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kwargs = {k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS}
    try:
        config_file = Path(hf_hub_download(repo_id, CODEBOOK_CONFIG_FILE, **kwargs))
    except LocalEntryNotFoundError as err:  # offline, or the Hub cannot be reached
        cached = try_to_load_from_cache(repo_id, CODEBOOK_CONFIG_FILE,
                                        cache_dir=kwargs.get("cache_dir"),
                                        revision=kwargs.get("revision"))
        if not required or (cached is not None and not isinstance(cached, str)):
            return None  # not needed, or the cache knows the repo has no codebook config
        raise ConfigError(
            "name_or_path",
            f"{repo_id!r} is not a local folder, and its {CODEBOOK_CONFIG_FILE} is neither in "
            f"the Hugging Face cache nor reachable ({_offline_reason()})",
            "go online once (unset HF_HUB_OFFLINE) to download it, check the name, or pass "
            "codebook_config= to attach new codebooks to a base model",
        ) from err
    except EntryNotFoundError:  # the repo is there and has no codebook config: a base model
        return None
    except (RepositoryNotFoundError, HFValidationError) as err:
        raise ConfigError(
            "name_or_path",
            f"{repo_id!r} is neither a local folder nor a Hub repository you can read "
            f"({type(err).__name__})",
            "check the name (a local folder must exist; a Hub id is owner/name), or log in "
            "(`hf auth login` or HF_TOKEN) for a private or gated repository",
        ) from err
    except RevisionNotFoundError as err:
        raise ConfigError("revision", f"{kwargs.get('revision')!r} is not a revision of "
                          f"{repo_id!r}", "give a branch, tag or commit of that repo") from err
    folder = config_file.parent
    commit = folder.name if _COMMIT.fullmatch(folder.name) else None
    try:  # from the same commit as the config
        hf_hub_download(repo_id, CODEBOOK_WEIGHTS_FILE,
                        **{**kwargs, "revision": commit or kwargs.get("revision")})
    except EntryNotFoundError as err:  # remote: missing from the repo; local: not cached
        raise ConfigError(
            f"{repo_id}/{CODEBOOK_WEIGHTS_FILE}",
            "is missing" if not isinstance(err, LocalEntryNotFoundError)
            else f"is not in the Hugging Face cache ({_offline_reason()})",
            "push the whole folder save_pretrained wrote (CodebookModel.push_to_hub does), or "
            "go online once to download it",
        ) from err
    with contextlib.suppress(EntryNotFoundError):  # the model card, for its base_model
        hf_hub_download(repo_id, CARD_FILE,
                        **{**kwargs, "revision": commit or kwargs.get("revision")})
    return folder, commit


def _offline_reason() -> str:
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "no connection to the Hub"


# ---------------------------------------------------------------------- model card
def card_base_model(folder: str | Path) -> str | None:
    """The ``base_model`` in the YAML metadata of ``folder``'s model card, if there is one."""
    path = Path(folder) / CARD_FILE
    try:
        text = path.read_text(errors="replace") if path.is_file() else ""
        meta = yaml.safe_load(text.split("---", 2)[1]) if text.startswith("---") else None
    except (OSError, IndexError, yaml.YAMLError):
        return None
    value = meta.get("base_model") if isinstance(meta, dict) else None
    return value if isinstance(value, str) and value else None


def default_base_model(model: CodebookModel) -> str | None:
    """The base model's Hub id: the one ``from_pretrained`` found (a model card's base_model,
    or the Hub id new codebooks were attached to), else the HF config's name if a Hub id."""
    known = getattr(model, "base_model_name", None)
    if known is not None:  # "" = loaded with saved codebooks whose base is not recorded
        return known or None
    name = str(getattr(model.model.config, "_name_or_path", "") or "")
    if not name or looks_local(name) or Path(name).exists():
        return None
    return name


def model_card(model: CodebookModel, base_model: str | None = None,
               repo_id: str | None = None) -> str:
    """A model card (README.md with YAML metadata) naming the base model, sites, k and size.
    ``base_model`` defaults to the name the base model was loaded from, if a Hub id."""
    base_model = base_model or default_base_model(model)
    cfg = model.codebook_config
    model_type = str(getattr(model.model.config, "model_type", "") or "")
    meta: dict[str, Any] = {"library_name": LIBRARY_NAME,
                            "tags": [*TAGS, *([model_type] if model_type else [])],
                            "pipeline_tag": "text-generation"}
    if base_model:
        meta["base_model"] = base_model
    rows = []
    for kind in dict.fromkeys(s.kind for s in model.sites.values()):
        sites = [s for s in model.sites.values() if s.kind == kind]
        s = sites[0]
        per_layer = f"{s.groups} (one per head)" if s.per_head else str(s.groups)
        rows.append(f"| `{kind}` | `{s.pattern or s.module_path}` | "
                    f"{'input' if s.hook == 'pre' else 'output'} | "
                    f"{_ranges([x.layer for x in sites])} | {per_layer} | {s.dim // s.groups} |")
    base_text = f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else (
        "not recorded")
    name = repo_id or "path/to/this/folder"
    n_codebooks = sum(s.groups for s in model.sites.values())
    body = f"""# {repo_id or 'Codebook model'}

A {model_type or 'causal'} language model with **codebook features** (Tamkin, Taufeeque &
Goodman, *Codebook Features: Sparse and Discrete Interpretability for Neural Networks*, ICML 2024)
at the sites below: each site's activation is replaced by the sum of the top-k most similar codes
of a learned codebook, so the model's state there is a small set of discrete codes.

| | |
|---|---|
| base model | {base_text} |
| model type | `{model_type}` |
| k (codes per token and codebook) | {cfg.k} (in force when saved: {model.k_in_force}) |
| codebook size | {cfg.num_codes} codes |
| score / combine | {cfg.score} / {cfg.combine} |
| codebooks | {len(model.codebooks)} sites, {n_codebooks} codebooks |

## Sites

| kind | module (`*` = layer) | replaces its | layers | codebooks per layer | code width |
|---|---|---|---|---|---|
{chr(10).join(rows)}

## Use

```python
from codebook import CodebookModel, read_codes

model = CodebookModel.from_pretrained("{name}")
codes = read_codes(model, input_ids).codes   # {{site: (batch, seq, codebooks, k)}}
```

The folder is also an ordinary Hugging Face model folder; `codebook_config.json` and
`codebooks.safetensors` hold the codebooks (plain `transformers` ignores them).
"""
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + body


def _ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2, 5``."""
    out: list[str] = []
    for i in sorted(set(layers)):
        if out and out[-1].split("-")[-1] == str(i - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ", ".join(out)


def write_model_card(folder: str | Path, model: CodebookModel, base_model: str | None = None,
                     repo_id: str | None = None) -> Path:
    """Write ``README.md`` (see ``model_card``) into ``folder``; returns its path."""
    path = Path(folder) / CARD_FILE
    path.write_text(model_card(model, base_model, repo_id))
    return path


def prepare_upload(model: CodebookModel, folder: str | Path, repo_id: str | None = None,
                   base_model: str | None = None, tokenizer: Any = None) -> Path:
    """Save the model (and tokenizer) into ``folder`` with its model card: what gets pushed."""
    folder = Path(model.save_pretrained(folder, tokenizer=tokenizer))
    write_model_card(folder, model, base_model, repo_id)
    return folder


def push_to_hub(model: CodebookModel, repo_id: str, base_model: str | None = None,
                tokenizer: Any = None, private: bool | None = None, token: str | None = None,
                revision: str | None = None, commit_message: str | None = None,
                create_pr: bool = False) -> str:
    """Upload the model, its codebooks and a model card to Hub repo ``repo_id`` (created if
    needed) as one commit; returns the commit's URL."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise ConfigError("HF_HUB_OFFLINE", "is set, so nothing can be uploaded",
                          "unset HF_HUB_OFFLINE and log in (`hf auth login` or HF_TOKEN)")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = prepare_upload(model, Path(tmp) / "model", repo_id, base_model, tokenizer)
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
            commit_message=commit_message or "Upload codebook model")
    return str(info.commit_url)
