"""Where a checkpoint keeps what, and checks that a model or checkpoint folder is intact.

This module owns the layout's file names: ``model.py``, ``hub.py`` and the training loop
import them from here. A training checkpoint is a folder with ``trainer_state.json``, the model
in HF format under ``hf/`` (a saved codebook model: HF files, ``codebooks.safetensors``,
``codebook_config.json``) and the engine's state: ``deepspeed/`` (DeepSpeed) or
``engine_model.safetensors`` + ``engine_optim.pt`` (plain PyTorch). A run folder holds one
checkpoint per save. A crash mid-write or a truncated copy leaves files that fail deep inside a
load with a raw traceback; these checks read only headers and zip directories (cheap) and name
the file instead.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path

from codebook.config import CodebookConfig
from codebook.errors import ConfigError

# A saved codebook model folder: the HF files plus these two (codebook/model.py writes them).
CODEBOOK_CONFIG_FILE = "codebook_config.json"
CODEBOOK_WEIGHTS_FILE = "codebooks.safetensors"
K_IN_FORCE = "k"  # metadata key of the codebooks file: the k in force when it was saved
STATE_FILE = "trainer_state.json"
HF_DIR = "hf"
# The engines' files (codebook/training/engine.py writes them).
DEEPSPEED_DIR = "deepspeed"
ENGINE_MODEL_FILE = "engine_model.safetensors"
ENGINE_OPTIM_FILE = "engine_optim.pt"
# Files that hold an HF model's weights (one of them must be there).
WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.h5", "*.msgpack",
                "*.ckpt.index")
MODEL_KINDS = ("a saved codebook model folder, a training checkpoint (or its hf/ folder), or "
               "an MLflow URI such as runs:/<run_id>/model")


def looks_local(name: str | Path) -> bool:
    """A name that can only be a local path, never a Hub id (owner/name or a bare name)."""
    text = str(name)
    return (text.startswith((".", "/", "~")) or text.count("/") > 1
            or (os.sep != "/" and os.sep in text))


# ---------------------------------------------------------------------- single files
def safetensors_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file (truncated, bad header), or None."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            raw = fh.read(n) if n is not None and 8 + n <= size else b""
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if n is None:
        return f"is truncated ({size} bytes, shorter than the 8-byte header length)"
    if 8 + n > size:
        return f"is truncated ({size} bytes, its header alone needs {8 + n})"
    try:
        header = json.loads(raw)
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"),
                  default=0)
    except (ValueError, TypeError, KeyError, IndexError) as err:
        return f"has an unreadable header ({err})"
    if 8 + n + end > size:
        return f"is truncated ({size} bytes, its header says {8 + n + end})"
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as fh:
            fh.metadata()
    except Exception as err:  # noqa: BLE001 - SafetensorError and friends: any means damaged
        return f"cannot be read ({err})"
    return None


def zip_problem(file: Path) -> str | None:
    """What is wrong with a torch zip file (``torch.save``), or None. Only the directory at the
    end of the file is read: a truncated file has lost it."""
    try:
        if file.stat().st_size == 0:
            return "is empty"
        with zipfile.ZipFile(file) as zf:
            zf.infolist()
    except zipfile.BadZipFile as err:
        return f"is truncated or damaged (not a complete zip archive: {err})"
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    return None


def json_problem(file: Path) -> str | None:
    """What is wrong with a JSON file (cut short, not JSON, unreadable), or None."""
    try:
        json.loads(file.read_bytes())
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    except ValueError as err:
        return f"is cut short or not JSON ({err})"
    return None


def _torch_file_problem(file: Path) -> str | None:
    try:
        with open(file, "rb") as fh:
            zipped = fh.read(2) == b"PK"
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    return zip_problem(file) if zipped or file.stat().st_size == 0 else None  # else legacy


# ---------------------------------------------------------------------- model folders
def model_folder_problem(folder: Path, codebooks: bool = True,
                         gguf_file: str | None = None) -> tuple[Path, str] | None:
    """The first damaged or missing file of an HF model folder and what is wrong, or None.

    ``codebooks``: the codebook files must be there (otherwise they are checked only if
    present). With ``gguf_file`` the weights and config come from that file.
    """
    if gguf_file:
        if not (folder / gguf_file).is_file():
            return folder / gguf_file, "is missing"
    elif not (folder / "config.json").is_file():
        return folder / "config.json", "is missing"
    for file in sorted(folder.glob("*.json")):
        why = json_problem(file)
        if why:
            return file, why
    cb_config = folder / CODEBOOK_CONFIG_FILE
    if cb_config.is_file():
        try:
            CodebookConfig.load(cb_config)
        except (ValueError, TypeError) as err:  # ConfigError is a ValueError
            return cb_config, f"is not a valid codebook config ({err})"
        if not (folder / CODEBOOK_WEIGHTS_FILE).is_file():
            return folder / CODEBOOK_WEIGHTS_FILE, "is missing"
    elif codebooks:
        return cb_config, "is missing"
    weights = [f for g in WEIGHT_GLOBS for f in folder.glob(g) if f.name != CODEBOOK_WEIGHTS_FILE]
    if not weights and not gguf_file:
        return folder / "model.safetensors", "is missing (the folder holds no model weights)"
    for file in sorted(folder.glob("*.safetensors")):
        why = safetensors_problem(file)
        if why:
            return file, why
    for index in sorted(folder.glob("*.index.json")):
        weight_map = json.loads(index.read_text())
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        for shard in sorted(set((weight_map or {}).values())):
            if not (folder / shard).is_file():
                return folder / shard, f"is missing (listed in {index.name})"
    for file in sorted([*folder.glob("*.bin"), *folder.glob("*.pt")]):
        why = _torch_file_problem(file)
        if why:
            return file, why
    return None


def check_model_folder(folder: str | Path, field: str, codebooks: bool = False,
                       gguf_file: str | None = None, fix: str | None = None) -> Path:
    """``folder`` as a model folder, or a ConfigError naming the missing or damaged file."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise ConfigError(field, f"{folder} does not exist", fix or f"check the path: give "
                          f"{MODEL_KINDS}")
    if not folder.is_dir():
        raise ConfigError(field, f"{folder} is a file, not a model folder",
                          fix or f"give {MODEL_KINDS}")
    found = model_folder_problem(folder, codebooks, gguf_file)
    if found is None:
        return folder
    file, why = found
    if file.name == "config.json" and why == "is missing" and (folder / HF_DIR).is_dir():
        fix = f"this is a training checkpoint: load its model folder {folder / HF_DIR}"
    raise ConfigError(field, f"{file} {why}", fix or _model_fix(folder))


def _model_fix(folder: Path) -> str:
    fix = "re-export or re-download the model, or point at an intact checkpoint"
    ckpt = folder.parent if folder.name == HF_DIR else folder
    if (ckpt / STATE_FILE).exists() and ckpt.parent != ckpt:
        newest, _ = latest_intact_checkpoint(ckpt.parent)
        if newest is not None and newest.resolve() != ckpt.resolve():
            fix += f"; the newest intact checkpoint in this run is {newest}"
    return fix


def verify_model_dir(path: str | Path, field: str = "--model", codebooks: bool = True) -> Path:
    """The model folder to load for ``path``: a saved codebook model folder as it is, a training
    checkpoint's ``hf/`` folder. Raises ConfigError naming the missing or damaged file (for a
    run folder: naming its newest intact checkpoint)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(field, f"{path} does not exist", f"check the path: give {MODEL_KINDS}")
    if (path / HF_DIR).is_dir() or (path / STATE_FILE).exists():  # a training checkpoint
        if not (path / HF_DIR).is_dir():
            raise ConfigError(field, f"{path / HF_DIR} is missing (the checkpoint has no model)",
                              _model_fix(path / HF_DIR))
        why = json_problem(path / STATE_FILE) if (path / STATE_FILE).exists() else None
        if why:  # extraction reads the step (the k schedule's k) from it
            raise ConfigError(field, f"{path / STATE_FILE} {why}", _model_fix(path / HF_DIR))
        path = path / HF_DIR
    elif path.is_dir() and not (path / CODEBOOK_CONFIG_FILE).exists() and codebooks:
        if checkpoint_dirs(path):  # a run folder: say which checkpoint to use
            newest, _ = latest_intact_checkpoint(path)
            fix = (f"this is a run folder: point at one of its checkpoints; the newest intact "
                   f"one is {newest}" if newest else
                   "this is a run folder and none of its checkpoints is intact: retrain")
        else:
            fix = "point at a training checkpoint, its hf/ folder, or an MLflow run"
        raise ConfigError(field, f"{path} holds no {CODEBOOK_CONFIG_FILE}", fix)
    return check_model_folder(path, field, codebooks)


def resolve_local(ref: str, field: str = "--model") -> str:
    """``ref`` as an intact local model folder (``verify_model_dir``, absolute) when it names a
    local path; a Hub id as it is."""
    if Path(ref).expanduser().exists() or looks_local(ref):
        return str(verify_model_dir(ref, field).resolve())
    return ref


# ---------------------------------------------------------------------- checkpoints
def checkpoint_step(directory: Path) -> int | None:
    """The step in a checkpoint's trainer state, or None when it is missing or unreadable."""
    try:
        step = json.loads((directory / STATE_FILE).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def verify_checkpoint(directory: str | Path) -> str | None:
    """Why a training checkpoint cannot be resumed from (missing, truncated or unreadable
    files), or None when it is intact."""
    d = Path(directory)
    if not d.is_dir():
        return "the folder does not exist"
    state = d / STATE_FILE
    if not state.is_file():
        return f"{STATE_FILE} is missing"
    why = json_problem(state)
    if why:
        return f"{STATE_FILE} {why}"
    if checkpoint_step(d) is None:
        return f"{STATE_FILE} has no step"
    if not (d / HF_DIR).is_dir():
        return f"{HF_DIR}/ is missing"
    found = model_folder_problem(d / HF_DIR, codebooks=True)
    if found:
        return f"{found[0].relative_to(d)} {found[1]}"
    return _engine_problem(d)


def _engine_problem(d: Path) -> str | None:
    ds = d / DEEPSPEED_DIR
    if ds.is_dir():
        files = sorted(ds.glob("*.pt"))
        if not any(f.name.endswith("model_states.pt") for f in files):
            return f"{DEEPSPEED_DIR}/ holds no *model_states.pt"
        for kind in ("model_states", "optim_states"):  # every rank's file, 0 .. highest
            ranks = {int(m.group(1)) for f in files
                     if (m := re.search(rf"zero_pp_rank_(\d+)_mp_rank_\d+_{kind}\.pt$", f.name))}
            missing = sorted(set(range(max(ranks, default=-1) + 1)) - ranks)
            if missing:
                return f"{DEEPSPEED_DIR}/ lacks the {kind} of rank {missing[0]}"
        for f in files:
            why = zip_problem(f)
            if why:
                return f"{f.relative_to(d)} {why}"
        return None
    model, optim = d / ENGINE_MODEL_FILE, d / ENGINE_OPTIM_FILE
    if not model.exists() and not optim.exists():
        return (f"no engine state (neither {DEEPSPEED_DIR}/ nor {ENGINE_MODEL_FILE} + "
                f"{ENGINE_OPTIM_FILE})")
    for file, check in ((model, safetensors_problem), (optim, zip_problem)):
        if not file.is_file():
            return f"{file.name} is missing"
        why = check(file)
        if why:
            return f"{file.name} {why}"
    return None


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The checkpoint folders of a run (Ray Train's ``checkpoint_*`` and any folder with a
    trainer state or model), damaged ones included; not hidden temporary ones."""
    if not run_dir.is_dir():
        return []
    return sorted(d for d in run_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
                  and (d.name.startswith("checkpoint_") or (d / STATE_FILE).exists()
                       or (d / HF_DIR).is_dir()))


def choose_resume(candidates: Iterable[str | Path | None]
                  ) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint among ``candidates`` (by step), plus the damaged ones newer
    than it with what is wrong. Folders whose step cannot be read count as newest (a crash
    mid-write), missing ones as oldest."""
    unique: dict[Path, Path] = {}
    for c in candidates:
        if c is not None:
            unique.setdefault(Path(c).absolute(), Path(c))

    def newness(path: Path) -> tuple[int, float, str]:
        if not path.is_dir():
            return (0, 0, path.name)
        step = checkpoint_step(path)
        return (2, float("inf"), path.name) if step is None else (1, step, path.name)

    damaged: list[tuple[Path, str]] = []
    for path in sorted(unique.values(), key=newness, reverse=True):
        why = verify_checkpoint(path)
        if why is None:
            return path, damaged
        damaged.append((path, why))
    return None, damaged


def latest_intact_checkpoint(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint of a run folder that verifies, and the damaged newer ones skipped
    (each with what is wrong)."""
    return choose_resume(checkpoint_dirs(Path(run_dir)))


def skipped_message(damaged: Path, why: str, used: Path | None) -> str:
    """One line for a damaged checkpoint passed over on resume."""
    then = (f"resuming from {used} (step {checkpoint_step(used)}) instead" if used
            else "no intact checkpoint is left to resume from")
    return f"checkpoint {damaged} is damaged ({why}): skipped; {then}"


def verify_train_model(name_or_path: str | None, gguf_file: str | None = None) -> None:
    """A training config's ``model.name_or_path``, when it is a local folder: config and every
    weight file intact (ConfigError naming the file otherwise). Hub ids are left alone."""
    if name_or_path is None:
        return
    path = Path(name_or_path).expanduser()
    if path.exists() or looks_local(name_or_path):
        check_model_folder(path, "model.name_or_path", codebooks=False, gguf_file=gguf_file)
