"""A model over a corpus without Ray: cut it into shards and windows, read the codes.

Shard ``i`` holds documents ``[i * docs_per_shard, (i + 1) * docs_per_shard)`` of a corpus
(``codebook.corpus``), so a rerun finds the same shards. Documents are cut into windows, never
packed together, so every stored token keeps its document and position. ``codebook.store.extract``
writes what ``extract_windows`` reads into a code store (``codebook.ray_glue.extract`` does it
in Ray Data tasks and actors); ``token_batches`` gives the same windows as padded batches
(the dictionary metrics).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from codebook.corpus import read_documents
from codebook.errors import ConfigError


def plan_shards(num_documents: int, docs_per_shard: int) -> list[dict[str, int]]:
    """Shard ``i`` = documents ``[start, stop)``; the same inputs always give the same plan."""
    if docs_per_shard < 1:
        raise ConfigError("--docs-per-shard", f"must be >= 1, got {docs_per_shard}", "use e.g. 64")
    if num_documents < 1:
        raise ConfigError("--paths", "the corpus has no documents", "check the corpus options")
    return [{"shard": i, "start": s, "stop": min(s + docs_per_shard, num_documents)}
            for i, s in enumerate(range(0, num_documents, docs_per_shard))]


def tokenise_documents(docs: list[str] | np.ndarray, first_doc_id: int, tokenizer: Any,
                       block_size: int) -> dict[str, np.ndarray]:
    """Cut each document into consecutive windows of at most ``block_size`` tokens.

    Returns ``doc_id``, ``start`` (position of the window's first token in its document),
    ``length`` (real tokens) and ``input_ids`` (windows, block_size) int32, right-padded with 0.
    Documents are never packed together, so every token keeps its document and position.
    """
    if isinstance(docs, np.ndarray):  # pre-tokenised (FSM): one window per sequence
        token_lists = [row.tolist() for row in docs]
    else:
        token_lists = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    doc_ids, starts, lengths, windows = [], [], [], []
    for i, ids in enumerate(token_lists):
        for s in range(0, len(ids), block_size):
            chunk = ids[s : s + block_size]
            doc_ids.append(first_doc_id + i)
            starts.append(s)
            lengths.append(len(chunk))
            windows.append(chunk + [0] * (block_size - len(chunk)))
    return {
        "doc_id": np.asarray(doc_ids, dtype=np.int64),
        "start": np.asarray(starts, dtype=np.int32),
        "length": np.asarray(lengths, dtype=np.int32),
        "input_ids": np.asarray(windows, dtype=np.int32).reshape(-1, block_size),
    }


@torch.no_grad()
def extract_windows(model: Any, windows: dict[str, np.ndarray], sites: list[str],
                    activation_sites: list[str], batch_size: int = 8,
                    device: torch.device | str = "cpu",
                    score_sites: list[str] | None = None) -> dict[str, Any]:
    """Run ``model`` over tokenised windows; per real token: ids, positions and codes.

    Right padding needs no attention mask: a causal model's outputs at real tokens do not
    depend on the pad tokens after them. Returns ``doc_id``, ``position``, ``token_id`` (T,)
    and ``codes`` {site: (T, groups, k)}, ``acts`` {site: (T, dim) float16}, ``scores``
    {site: (T, groups, k) float16} for ``score_sites``.
    """
    from codebook.interventions import read_codes

    n = len(windows["doc_id"])
    order = np.argsort(-windows["length"], kind="stable")  # similar lengths batch together
    parts: dict[str, list] = {"doc_id": [], "position": [], "token_id": []}
    codes: dict[str, list] = {s: [] for s in sites}
    acts: dict[str, list] = {s: [] for s in activation_sites}
    score_sites = list(score_sites or [])
    scores: dict[str, list] = {s: [] for s in score_sites}
    record_sites = list(dict.fromkeys([*sites, *activation_sites]))
    for lo in range(0, n, batch_size):
        idx = order[lo : lo + batch_size]
        length = windows["length"][idx]
        width = int(length.max())
        x = torch.from_numpy(windows["input_ids"][idx, :width].astype(np.int64)).to(device)
        rec = read_codes(model, x, record_sites, activations=bool(activation_sites),
                         scores=bool(score_sites))
        keep = np.arange(width)[None, :] < length[:, None]  # (b, width) real tokens
        parts["doc_id"].append(np.repeat(windows["doc_id"][idx], length))
        parts["position"].append(
            (windows["start"][idx][:, None] + np.arange(width)[None, :])[keep])
        parts["token_id"].append(windows["input_ids"][idx, :width][keep])
        for s in sites:
            codes[s].append(rec.codes[s].cpu().numpy()[keep])
        for s in activation_sites:
            acts[s].append(rec.activations[s].to(torch.float16).cpu().numpy()[keep])
        for s in score_sites:
            scores[s].append(rec.scores[s].to(torch.float16).cpu().numpy()[keep])
    out: dict[str, Any] = {k: np.concatenate(v) if v else np.zeros(0, np.int64)
                           for k, v in parts.items()}
    # Back to document order (a shard's rows sorted by document, then position).
    order_rows = np.lexsort((out["position"], out["doc_id"]))
    for k in parts:
        out[k] = out[k][order_rows]
    out["codes"] = {s: np.concatenate(v)[order_rows] for s, v in codes.items() if v}
    out["acts"] = {s: np.concatenate(v)[order_rows] for s, v in acts.items() if v}
    out["scores"] = {s: np.concatenate(v)[order_rows] for s, v in scores.items() if v}
    return out


def shard_windows(source: dict[str, Any], shard: dict[str, int], tokenizer: Any,
                  block_size: int) -> dict[str, np.ndarray]:
    """Read a shard's documents and cut them into model windows."""
    docs = read_documents(source, shard["start"], shard["stop"])
    return tokenise_documents(docs, shard["start"], tokenizer, block_size)


def token_batches(source: dict[str, Any], tokenizer: Any, block_size: int, batch_size: int,
                  docs_per_read: int = 64) -> Iterator[dict[str, np.ndarray]]:
    """A corpus (``corpus.describe_corpus``) as batches of the windows ``tokenise_documents``
    cuts (extraction's cut), ``batch_size`` windows each, right-padded to the longest one:
    ``input_ids`` (b, width) int64 and ``attention_mask`` (b, width) bool."""
    pending: list[tuple[np.ndarray, int]] = []
    n = source["num_documents"]
    for start in range(0, n, docs_per_read):
        docs = read_documents(source, start, min(start + docs_per_read, n))
        w = tokenise_documents(docs, start, tokenizer, block_size)
        for ids, length in zip(w["input_ids"], w["length"], strict=True):
            pending.append((ids, int(length)))
            if len(pending) == batch_size:
                yield _padded_batch(pending)
                pending = []
    if pending:
        yield _padded_batch(pending)


def _padded_batch(windows: list[tuple[np.ndarray, int]]) -> dict[str, np.ndarray]:
    width = max(length for _, length in windows)
    lengths = np.array([length for _, length in windows])
    return {"input_ids": np.stack([ids[:width] for ids, _ in windows]).astype(np.int64),
            "attention_mask": np.arange(width)[None, :] < lengths[:, None]}
