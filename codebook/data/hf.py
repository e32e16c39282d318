"""Hugging Face ``datasets`` corpora: the one reader training and extraction share (no Ray).

``load_hf_split`` loads one split with ``datasets.load_dataset`` (a hub dataset, a local folder,
or a builder such as ``parquet`` with data files) and checks the split and the text column, so
a corpus that trains also extracts. Every failure is a ConfigError naming the option to fix:
``field`` turns a key (``hf_dataset``) into the caller's name for it (``data.hf_dataset`` in a
training config, ``--hf-dataset`` on the command line).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from codebook.errors import ConfigError

Field = Callable[[str], str]


def config_field(key: str) -> str:
    """A training config's name for ``key``: ``data.<key>``."""
    return f"data.{key}"


def cli_flag(key: str) -> str:
    """A command line's name for ``key``: ``--hf-dataset`` for ``hf_dataset``."""
    return "--" + key.replace("_", "-")


def packaged_builders() -> set[str]:
    """Builder names ``load_dataset`` takes with data files: parquet, text, json, csv, ..."""
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

        return set(_PACKAGED_DATASETS_MODULES)
    except ImportError:  # a private name; these are the documented ones
        return {"csv", "json", "parquet", "text", "arrow", "pandas", "imagefolder"}


def hf_location(name: str, data_files: Sequence[str] | None, field: Field = config_field,
                builders: set[str] | None = None) -> tuple[str, list[str] | None]:
    """Absolute paths for a local dataset folder and local data files (read on the driver).

    Data files given with a builder name (``parquet``) are relative to the cwd; with a local
    folder, relative to that folder (as ``load_dataset`` reads them); with a hub dataset,
    relative to its repository, so those stay as they are.
    """
    builders = packaged_builders() if builders is None else builders
    folder = Path(name).expanduser()
    is_local = name not in builders and folder.exists()
    if is_local:
        name = str(folder.resolve())
    if data_files is None or not (is_local or name in builders):
        return name, None if data_files is None else list(data_files)
    base = Path(name) if is_local else Path.cwd()
    files = [f if "://" in f else str((base / Path(f).expanduser()).absolute())
             for f in data_files]
    for f in files:
        if "://" not in f and not any(c in f for c in "*?[") and not Path(f).exists():
            raise ConfigError(field("hf_data_files"), f"{f} does not exist",
                              f"check the path (relative to {base})")
    return name, files


def load_hf_split(name: str | None, config: str | None, split: str,
                  data_files: Sequence[str] | None, text_column: str,
                  field: Field = config_field) -> Any:
    """One split of a dataset (a ``datasets.Dataset``) that has ``text_column``.

    Errors (no ``datasets`` package, a dataset that is not there or not in the offline cache,
    a wrong split or text column) become ConfigErrors before any worker starts.
    """
    if not name:
        raise ConfigError(field("hf_dataset"), "missing", "name a dataset or a local data folder")
    try:
        import datasets as hf_datasets
    except ImportError as err:
        raise ConfigError(field("source"), "source 'hf' needs the Hugging Face datasets package",
                          f"pip install -e .[hf] (or use {field('source')}=parquet/text with "
                          f"{field('paths')})") from err
    name, files = hf_location(name, data_files, field)
    try:
        hf = hf_datasets.load_dataset(name, config, split=split, data_files=files)
    except Exception as err:  # any failure here is about the data settings
        if isinstance(err, ValueError) and "split" in str(err).lower():
            raise ConfigError(field("hf_split"), f"{split!r} in {name}: "
                              f"{str(err).rstrip('.')}",
                              f"set {field('hf_split')} to one of the dataset's splits") from err
        # Not found locally or on the hub, the hub unreachable, or HF_DATASETS_OFFLINE=1
        # without a copy in the datasets cache.
        raise ConfigError(field("hf_dataset"), f"cannot load {name!r} (config {config}, "
                          f"split {split}, data files {files}): "
                          f"{type(err).__name__}: {str(err).rstrip('.')}",
                          "give a local folder of .parquet/.txt/.json/.csv files, a builder "
                          f"such as parquet with {field('hf_data_files')}, or a hub dataset "
                          "that is reachable or already in the datasets cache (offline: "
                          "HF_DATASETS_OFFLINE=1)") from err
    if isinstance(hf, hf_datasets.DatasetDict | hf_datasets.IterableDatasetDict):
        raise ConfigError(field("hf_split"), f"got {split!r}", "name one split, e.g. train")
    if text_column not in (hf.column_names or []):
        raise ConfigError(field("text_column"), f"{text_column!r} is not a column of {name} "
                          f"(columns: {hf.column_names})",
                          f"set {field('text_column')} to one of them")
    return hf
