"""Documents held out for evaluation: a fixed, seeded choice by content, never trained on.

A document is held out when a keyed hash of its text falls below ``fraction``. The choice needs
no index and no global view of the corpus, so Ray Data filters, in-process readers and the
comparison all agree on it, and identical copies of a document fall on the same side.
"""

from __future__ import annotations

import hashlib

_BUCKETS = 1 << 32


def is_heldout(text: str, fraction: float, seed: int = 0) -> bool:
    """Whether document ``text`` is in the held-out share ``fraction`` (0 <= fraction < 1)
    of the corpus under ``seed``."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=4,
                             key=seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little") < fraction * _BUCKETS


def split_documents(texts: list[str], fraction: float, seed: int = 0
                    ) -> tuple[list[int], list[int]]:
    """Indices of ``texts`` to train on and to hold out (``is_heldout``)."""
    train, held = [], []
    for i, text in enumerate(texts):
        (held if is_heldout(text, fraction, seed) else train).append(i)
    return train, held
