"""A small synthetic English corpus for quick runs and CI: no download, seeded, a few topics.

Each document is a run of template sentences about one topic (its own nouns and verbs) with
names, numbers and months mixed in, so a tiny model has something to learn and a held-out split
by document has documents on both sides.
"""

from __future__ import annotations

import random
from pathlib import Path

TOPICS = {
    "sea": ("ship sailor harbour wave storm island anchor", "sailed drifted anchored rowed"),
    "farm": ("farmer field cow barn harvest wheat orchard", "planted harvested fed ploughed"),
    "city": ("street market tram bridge tower square merchant", "crossed built sold visited"),
    "castle": ("king queen knight castle crown dragon banner", "ruled guarded fought crowned"),
    "school": ("teacher pupil lesson book chalk garden bell", "taught read wrote learned"),
}
NAMES = ["Anna", "Bob", "Clara", "David", "Emma", "Felix", "Grace", "Henry"]
MONTHS = ["January", "March", "May", "July", "September", "November"]
TEMPLATES = (
    "The {noun} {verb} near the {noun2}.",
    "In {month} {year}, {name} {verb} the {noun}.",
    "{name} saw {count} {noun}s by the {noun2}.",
    "Every {noun} {verb} before the {noun2} came.",
    "\"Where is the {noun}?\" asked {name}.",
)


def synthetic_documents(n_docs: int, seed: int = 0, sentences: tuple[int, int] = (30, 80)
                        ) -> list[str]:
    """``n_docs`` documents, each about one topic, ``sentences`` (min, max) sentences long."""
    rng = random.Random(seed)
    topics = list(TOPICS)
    docs = []
    for i in range(n_docs):
        nouns, verbs = (words.split() for words in TOPICS[topics[i % len(topics)]])
        lines = []
        for _ in range(rng.randint(*sentences)):
            lines.append(rng.choice(TEMPLATES).format(
                noun=rng.choice(nouns), noun2=rng.choice(nouns), verb=rng.choice(verbs),
                name=rng.choice(NAMES), month=rng.choice(MONTHS),
                year=rng.randint(1800, 2030), count=rng.randint(2, 99)))
        docs.append(" ".join(lines))
    return docs


def write_synthetic_corpus(folder: str | Path, n_docs: int = 60, seed: int = 0) -> list[Path]:
    """``synthetic_documents`` as ``doc-NNNN.txt`` files in ``folder`` (kept if present)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(synthetic_documents(n_docs, seed)):
        path = folder / f"doc-{i:04d}.txt"
        if not path.is_file():
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
        paths.append(path)
    return paths
