"""Regex features: a named regex marks the tokens its matches cover (``RegexLabels``).

A regex feature marks every token whose characters overlap the match's first capture group (the
whole match when the pattern has no group). Token offsets come from re-tokenising the original
document with the store's tokenizer, so they are exact for any tokenizer (byte-level BPE,
SentencePiece); the ids are checked against the stored ones. Other kinds of features (FSM
states, token ids) are in ``codebook.analysis.labels``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from codebook.analysis.labels import TokenRows
from codebook.errors import ConfigError
from codebook.schema import build, read_yaml


@dataclass(frozen=True)
class RegexFeature:
    """A named regex; ``ignore_case`` compiles it with ``re.IGNORECASE``."""

    name: str
    regex: str
    ignore_case: bool = False

    def compiled(self) -> re.Pattern[str]:
        try:
            return re.compile(self.regex, re.IGNORECASE if self.ignore_case else 0)
        except re.error as err:
            raise ConfigError(f"features.{self.name}", f"invalid regex {self.regex!r}: {err}",
                              "fix the pattern (Python re syntax)") from err


MONTHS = ("January|February|March|April|May|June|July|August|September|October|November|"
          "December")
# The paper's kind of features: dates, numbers, names, units and punctuation classes.
DEFAULT_FEATURES: tuple[RegexFeature, ...] = (
    RegexFeature("months", rf"\b({MONTHS})\b"),
    RegexFeature("years_2xxx", r"\b(2\d{3})\b"),
    RegexFeature("years_1900s", r"\b(19\d{2})\b"),
    RegexFeature("digits", r"(\d)"),
    # capitalised words starting with B inside a sentence (after a lowercase word or a comma)
    RegexFeature("names_starting_with_B", r"(?<=[a-z0-9,;:] )(B[a-z]+)\b"),
    RegexFeature("square_units",
                 r"\bsquare\s+(feet|foot|metres?|meters?|miles?|kilometres?|kilometers?|"
                 r"yards?|inch(?:es)?|km|mi|ft|m)\b"),
    RegexFeature("sentence_end_punctuation", r"([.!?])"),
    RegexFeature("clause_punctuation", r"([,;:])"),
    RegexFeature("quotes", r"([\"'\u2018\u2019\u201c\u201d])"),
    RegexFeature("brackets", r"([()\[\]{}])"),
)


def load_features(path: str | Path | None, include_defaults: bool = True
                  ) -> list[RegexFeature]:
    """The default features plus those in a YAML file: a list of ``{name, regex,
    ignore_case}`` mappings (or a mapping ``name: regex``). Every regex is compiled here."""
    features = list(DEFAULT_FEATURES) if include_defaults else []
    if path is not None:
        data = read_yaml(path, "--features", "pass a YAML list of {name, regex} mappings")
        if isinstance(data, dict):
            data = [{"name": k, "regex": v} for k, v in data.items()]
        if not isinstance(data, list):
            raise ConfigError("--features", f"{path} holds {type(data).__name__}",
                              "write a YAML list of {name, regex, ignore_case} mappings")
        features += [build(RegexFeature, item, f"--features[{i}]") for i, item in enumerate(data)]
    names = [f.name for f in features]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError("--features", f"duplicate feature names {dupes}", "rename them")
    for f in features:
        f.compiled()
    return features


def regex_token_labels(text: str, offsets: list[tuple[int, int]],
                       features: list[RegexFeature]) -> np.ndarray:
    """(tokens, features) bool: token ``i`` (chars ``offsets[i]``) overlaps a match's group."""
    labels = np.zeros((len(offsets), len(features)), dtype=bool)
    if not offsets:
        return labels
    starts = np.asarray([a for a, _ in offsets])
    ends = np.asarray([b for _, b in offsets])
    for j, feature in enumerate(features):
        pattern = feature.compiled()
        group = 1 if pattern.groups else 0
        for m in pattern.finditer(text):
            a, b = m.span(group)
            if a < 0 or a == b:
                continue
            labels[(starts < b) & (ends > a), j] = True
    return labels


def document_offsets(tokenizer: Any, texts: list[str]) -> list[tuple[list[int], list]]:
    """Token ids and character offsets of each text (fast tokenizers only)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("tokenizer", "regex features need a fast (Rust) tokenizer for offsets",
                          "save the tokenizer with tokenizer.json")
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(enc["input_ids"], enc["offset_mapping"], strict=True))


def shard_regex_labels(tokenizer: Any, texts: list[str], first_doc_id: int,
                       doc_ids: np.ndarray, positions: np.ndarray, token_ids: np.ndarray,
                       features: list[RegexFeature], where: str = "shard") -> np.ndarray:
    """(tokens, features) labels for a shard's token rows (sorted by document and position)."""
    labels = np.zeros((len(doc_ids), len(features)), dtype=bool)
    per_doc = document_offsets(tokenizer, texts)
    bounds = np.flatnonzero(np.diff(doc_ids)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(doc_ids)], strict=True):
        if lo == hi:
            continue
        doc = int(doc_ids[lo])
        ids, offsets = per_doc[doc - first_doc_id]
        pos = positions[lo:hi]
        if pos.max() >= len(ids) or not np.array_equal(np.asarray(ids)[pos], token_ids[lo:hi]):
            raise ConfigError(where, f"document {doc} re-tokenises differently from the store",
                              "evaluate with the tokenizer and corpus the store was made from")
        doc_labels = regex_token_labels(texts[doc - first_doc_id], offsets, features)
        labels[lo:hi] = doc_labels[pos]
    return labels


@dataclass(frozen=True)
class RegexLabels:
    """A ``Labeller`` of regex features: re-reads each document's text (``documents(start,
    stop)`` gives documents ``[start, stop)``) and re-tokenises it with ``tokenizer``."""

    features: Sequence[RegexFeature]
    tokenizer: Any
    documents: Callable[[int, int], Sequence[str]]
    where: str = "shard"  # named in the error when a document re-tokenises differently
    only_labelled: ClassVar[bool] = False

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def labels(self, rows: TokenRows) -> np.ndarray:
        if len(rows) == 0:
            return np.zeros((0, len(self.features)), dtype=bool)
        first, last = int(rows.doc_id.min()), int(rows.doc_id.max())
        texts = list(self.documents(first, last + 1))
        return shard_regex_labels(self.tokenizer, texts, first, rows.doc_id, rows.position,
                                  rows.token_id, list(self.features), self.where)
