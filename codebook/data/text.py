"""Text corpora: tokenise documents and pack them into fixed-length blocks.

``pack_batch`` is a pure function over a batch of documents, so Ray Data can run it in parallel
(``map_batches``) and tests can call it directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from codebook.errors import ConfigError


def load_tokenizer(name_or_path: str) -> Any:
    """A ``transformers`` tokenizer from a hub name or local folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ConfigError("model.tokenizer", f"cannot load tokenizer {name_or_path!r}: {err}",
                          "point it at a folder with tokenizer.json / vocab files") from err


def pack_batch(texts: list[str], tokenizer: Any, block_size: int) -> np.ndarray:
    """Tokenise ``texts``, join them with EOS, and cut into (n, block_size) int32 blocks.

    The tail shorter than a block is dropped (per batch: a few tokens per batch of documents).
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for row in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend(row)
        if eos is not None:
            ids.append(eos)
    n = len(ids) // block_size
    return np.asarray(ids[: n * block_size], dtype=np.int32).reshape(n, block_size)


def expand_paths(paths: list[str], suffixes: tuple[str, ...]) -> list[str]:
    """Files under ``paths`` (files or folders) with one of ``suffixes``, sorted."""
    files: list[str] = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            files += sorted(str(f) for f in path.rglob("*") if f.suffix in suffixes)
        elif path.is_file():
            files.append(str(path))
        else:
            raise ConfigError("data.paths", f"{p} does not exist", "check the path")
    if not files:
        raise ConfigError("data.paths", f"no {suffixes} files under {paths}", "check the paths")
    return files
