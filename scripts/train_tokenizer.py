"""Train a small byte-level BPE tokenizer on local text (no hub), for small from-scratch models.

    python scripts/train_tokenizer.py --vocab-size 8192 --out data/tokenizers/corpus-bpe-8k \\
        data/text/shakespeare data/text/enwiki

A small model's cost is mostly its vocabulary: a 1-layer d_model-256 model trains ~5x faster with
8,192 tokens than with GPT-2's 50,257 (measured on 2 cores: 6,200 vs 1,170 tokens/s). The
tokenizer (``codebook.data.text.train_bpe_tokenizer``) uses GPT-2's byte-level pre-tokenisation,
so any text round-trips, and ``<|endoftext|>`` is id 0 (eos and bos). Training is deterministic
for the same files in the same order. The result is checked, then saved atomically with
``save_pretrained``, so ``AutoTokenizer.from_pretrained(out)`` (and ``model.tokenizer``) load it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codebook.data.text import tokenizer_problems  # noqa: E402

EOS = "<|endoftext|>"
ROUND_TRIP = "To be, or not to be: that is the question.\n  Whether 'tis nobler, 1599 — café!"


def check(tok: object, vocab_size: int) -> None:
    """Raise SystemExit unless ``tok`` has the size, eos id and lossless round trip expected."""
    problems = tokenizer_problems(tok, vocab_size, 0, ROUND_TRIP)
    if len(tok) < vocab_size:
        problems.append("too little text for that many merges? lower --vocab-size")
    if problems:
        sys.exit("tokenizer check failed:\n  " + "\n  ".join(problems))


def main(argv: list[str] | None = None) -> None:
    from codebook.data.text import expand_paths, save_tokenizer, train_bpe_tokenizer
    from codebook.errors import ConfigError

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="text files or folders (*.txt, searched recursively)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.vocab_size < 257:
        sys.exit(f"--vocab-size must be > 256 (the byte alphabet), got {args.vocab_size}")
    try:
        files = expand_paths(args.paths, (".txt",))
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    tok = train_bpe_tokenizer((Path(f).read_text(errors="replace") for f in files),
                              args.vocab_size, EOS)
    check(tok, args.vocab_size)
    out = save_tokenizer(tok, args.out, lambda t: check(t, args.vocab_size))
    print(f"BPE tokenizer ({len(tok)} tokens, eos {tok.eos_token_id}) from {len(files)} files "
          f"-> {out}")


if __name__ == "__main__":
    main()
