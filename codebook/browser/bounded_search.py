"""Regex search over a store under a budget: ``BoundedStoreSearch`` matches document by
document while a ``ScanBudget`` (time, characters, longest document) lasts, and says how much it
covered when the budget runs out (the answer is then partial).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from codebook.browser.limits import Limits
from codebook.store.search import StoreSearch, rank_codes


@dataclass
class ScanBudget:
    """What one regex scan may still read; ``partial`` once it skipped or stopped."""

    seconds: float
    chars_left: int
    max_doc_chars: int
    deadline: float = 0.0
    documents: int = 0
    stopped: bool = False
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.seconds

    @property
    def partial(self) -> bool:
        return bool(self.notes)

    def admit(self, chars: int) -> bool:
        """Whether a document of ``chars`` characters may be matched now (and count it)."""
        if self.stopped:
            return False
        if time.monotonic() >= self.deadline:
            self._stop(f"stopped after the time budget of {self.seconds:g} s")
        elif chars > self.chars_left:
            self._stop("stopped at the text budget")
        elif chars > self.max_doc_chars:
            note = f"skipped documents over {self.max_doc_chars} characters"
            if note not in self.notes:
                self.notes.append(note)
        else:
            self.chars_left -= chars
            self.documents += 1
            return True
        return False

    def _stop(self, note: str) -> None:
        self.stopped = True
        self.notes.append(note)

    def report(self, total_documents: int) -> dict[str, Any]:
        """The fields a search answer carries about its coverage."""
        note = ""
        if self.partial:
            note = (f"partial result: matched {self.documents} of {total_documents} documents ("
                    + "; ".join(self.notes) + "); precision and recall are over those only")
        return {"partial": self.partial, "scanned_documents": self.documents,
                "documents": total_documents, "note": note}


_BUDGET: ContextVar[ScanBudget | None] = ContextVar("codebook_regex_budget", default=None)


class BoundedStoreSearch(StoreSearch):
    """``StoreSearch`` whose regex search, inside ``budget()``, matches document by document
    and leaves out the rows of documents past the budget (``StoreSearch.code_stats`` goes
    through it too)."""

    @contextmanager
    def budget(self, limits: Limits) -> Iterator[ScanBudget]:
        scan = ScanBudget(limits.regex_seconds, limits.regex_max_chars,
                          limits.regex_max_doc_chars)
        token = _BUDGET.set(scan)
        try:
            yield scan
        finally:
            _BUDGET.reset(token)

    def codes_for_regex(self, regex: str, sites: list[str] | None = None,
                        min_recall: float = 0.0, top: int = 20, ignore_case: bool = False
                        ) -> list[dict[str, Any]]:
        """``StoreSearch.codes_for_regex`` over the documents the current budget admits."""
        from codebook.analysis.features import RegexFeature
        from codebook.store.evaluate import merge_partials
        from codebook.store.search import _counts

        scan = _BUDGET.get()
        if scan is None or self.tokenizer is None:  # no budget, or FSM (the usual error)
            return super().codes_for_regex(regex, sites, min_recall, top, ignore_case)
        feature = RegexFeature("query", regex, ignore_case)
        feature.compiled()
        sites = self._sites(sites)
        merged: dict[str, Any] = {}
        for path in self.store.shard_files():
            if scan.stopped:
                break
            table = self.store.read_shard(path)
            labels, mask = self._scan_shard(table, feature, scan)
            if mask.any():
                merged = merge_partials(merged, _counts(table, self.meta, labels, mask, sites))
        return rank_codes(merged, self.meta, sites, min_recall, top)

    def _scan_shard(self, table, feature, scan: ScanBudget) -> tuple[np.ndarray, np.ndarray]:
        """(labels, mask) of a shard's rows: mask marks the rows of the documents matched."""
        from codebook.analysis.features import shard_regex_labels
        from codebook.corpus import read_documents

        docs = table.column("doc_id").to_numpy()
        labels = np.zeros(len(docs), dtype=bool)
        mask = np.zeros(len(docs), dtype=bool)
        if len(docs) == 0:
            return labels, mask
        positions = table.column("position").to_numpy()
        token_ids = table.column("token_id").to_numpy()
        first = int(docs.min())
        texts = read_documents(self.meta.source, first, int(docs.max()) + 1)
        bounds = np.flatnonzero(np.diff(docs)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(docs)], strict=True):
            doc = int(docs[lo])
            text = texts[doc - first]
            if not scan.admit(len(text)):  # checked before each document
                if scan.stopped:
                    break
                continue
            labels[lo:hi] = shard_regex_labels(
                self.tokenizer, [text], doc, docs[lo:hi], positions[lo:hi], token_ids[lo:hi],
                [feature])[:, 0]
            mask[lo:hi] = True
        return labels, mask
