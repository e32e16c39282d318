"""A code's page: what a researcher reads to judge a code, as one JSON-ready dict.

- ``examples``: the top firings by similarity score (store order when the store has no scores),
  each with its context, the firing token marked and the code's score on every context token
  where it also fires;
- ``quantiles``: a few firings from each score quantile (the range, not only the top);
- ``density``: firing frequency and documents, and a histogram of the scores;
- ``logit_lens``: the tokens the code's vector raises and lowers through the rest of the
  network's linear path (``codebook.analysis.logit_lens``; needs the model);
- ``cooccurring``: codes of any site that fire on the same tokens, ranked by lift;
- ``label``: the automatic label (``codebook.store.autolabel``), when the store has them;
- ``similar``: the nearest codes of the same codebook by cosine.

``code_page`` reads the store through DuckDB (``StoreSearch.query``) and holds only the code's
own firings in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from codebook.store.search import CodeRef, StoreSearch


@dataclass(frozen=True)
class PageOptions:
    """How much one page shows."""

    examples: int = 20
    quantiles: int = 5
    per_quantile: int = 3
    window: int = 10  # context tokens on each side
    bins: int = 30  # score histogram
    cooccurring: int = 10
    min_joint: int = 3  # co-occurring codes must share at least this many tokens
    lens_top: int = 10
    similar: int = 8
    seed: int = 0


def code_page(search: StoreSearch, ref: CodeRef, options: PageOptions | None = None,
              model: Any = None, labels: dict[str, dict] | None = None) -> dict[str, Any]:
    """Everything the code page shows for ``ref`` (see the module docstring). ``model``: the
    loaded codebook model for the logit lens (None: no lens); ``labels``: ``read_labels``."""
    o = options or PageOptions()
    ref = search.check(ref)
    q = search.query
    fired = q.firings(ref.site, ref.group, ref.code)
    n = len(fired["doc_id"])
    total = q.num_tokens()
    has_scores = q.has_scores(ref.site)
    score = fired["score"]
    page: dict[str, Any] = {
        "code": ref.name, "site": ref.site, "group": ref.group, "index": ref.code,
        "count": n, "tokens": total, "frequency": n / total if total else 0.0,
        "documents": int(np.unique(fired["doc_id"]).size), "has_scores": has_scores,
        "ranked_by": "score" if has_scores else "store order (extracted without --scores)",
    }
    # best first, ties in store order; without scores, store order
    order = np.lexsort((np.arange(n), -score)) if has_scores else np.arange(n)
    bands = _quantile_bands(fired["score"], o) if has_scores and n else []
    rows = np.concatenate([order[: o.examples], *(b.pop("rows") for b in bands)])
    examples = _examples(search, ref, fired, rows, o.window)  # one context query for all
    page["examples"] = examples[: min(o.examples, n)]
    at = len(page["examples"])
    for band in bands:
        band["examples"], at = examples[at : at + band["picked"]], at + band.pop("picked")
    page["quantiles"] = bands
    page["density"] = _density(score if has_scores else None, o.bins, page["frequency"],
                               search.usage(ref.site))
    page["top_tokens"] = _top_tokens(search, fired["token_id"], n)
    page["cooccurring"] = _cooccurring(search, ref, n, total, o) if n else []
    page["label"] = (labels or {}).get(ref.name)
    page["logit_lens"] = _lens(search, model, ref, o.lens_top) if model is not None else None
    try:
        page["similar"] = search.similar_codes(ref, o.similar)
    except Exception:  # the model folder moved: the rest of the page still works
        page["similar"] = []
    return page


def _examples(search: StoreSearch, ref: CodeRef, fired: dict[str, np.ndarray],
              rows: np.ndarray, window: int) -> list[dict[str, Any]]:
    docs, pos = fired["doc_id"][rows], fired["position"][rows]
    windows = search.query.windows(docs, pos, window, ref.site, ref.group, ref.code)
    out = []
    for r, d, p, w in zip(rows, docs, pos, windows, strict=True):
        s = fired["score"][r]
        out.append({"doc_id": int(d), "position": int(p),
                    "score": None if np.isnan(s) else round(float(s), 4),
                    **search.context(w, int(p)),
                    "acts": [None if not f else (None if np.isnan(a) else round(float(a), 4))
                             for a, f in zip(w["act"], w["fired"], strict=True)]})
    return out


def _quantile_bands(score: np.ndarray, o: PageOptions) -> list[dict[str, Any]]:
    """``o.quantiles`` score bands from the top down, each with ``o.per_quantile`` random
    firings (``rows``, into the firings; ``picked``: how many)."""
    edges = np.quantile(score, np.linspace(0, 1, o.quantiles + 1))
    band = np.clip(np.searchsorted(edges, score, side="right") - 1, 0, o.quantiles - 1)
    rng = np.random.default_rng(o.seed)
    out = []
    for b in range(o.quantiles - 1, -1, -1):
        members = np.flatnonzero(band == b)
        if not members.size:
            continue
        pick = np.sort(rng.choice(members, min(o.per_quantile, members.size), replace=False))
        out.append({"band": f"{100 * b // o.quantiles}-{100 * (b + 1) // o.quantiles}%",
                    "low": float(edges[b]), "high": float(edges[b + 1]),
                    "firings": int(members.size), "rows": pick, "picked": len(pick)})
    return out


def _density(score: np.ndarray | None, bins: int, frequency: float,
             usage: np.ndarray) -> dict[str, Any]:
    """The score histogram, and where this code's frequency sits among its site's codes."""
    used = usage[usage > 0]
    out: dict[str, Any] = {"frequency": frequency,
                           "log10_frequency": float(np.log10(frequency)) if frequency else None,
                           "site_codes_used": int(used.size), "histogram": None}
    if score is not None and score.size:
        heights, edges = np.histogram(score, bins=bins)
        out["histogram"] = {"edges": [round(float(e), 5) for e in edges],
                            "heights": [int(h) for h in heights]}
    return out


def _top_tokens(search: StoreSearch, token_ids: np.ndarray, n: int, top: int = 10
                ) -> list[dict[str, Any]]:
    if not n:
        return []
    ids, counts = np.unique(token_ids, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:top]
    return [{"token_id": int(ids[i]), "token": search.piece(int(ids[i])),
             "count": int(counts[i]), "share": float(counts[i] / n)} for i in order]


def _cooccurring(search: StoreSearch, ref: CodeRef, n: int, total: int,
                 o: PageOptions) -> list[dict[str, Any]]:
    """Codes firing on this code's tokens, by lift = P(other | this) / P(other)."""
    q = search.query
    where = q.fires(ref.site, ref.group, ref.code)
    rows = []
    sites = list(search.meta.sites)
    counts, _ = q.code_counts_on_sites(sites, where)
    for site in sites:
        joint, usage = counts[site], search.usage(site)
        if site == ref.site:
            joint[ref.group, ref.code] = 0
        for g, c in zip(*np.nonzero(joint >= o.min_joint), strict=True):
            j = int(joint[g, c])
            lift = (j / n) / (usage[g, c] / total)
            rows.append({"code": CodeRef(site, int(g), int(c)).name, "joint": j,
                         "lift": float(lift), "p_other_given_this": j / n})
    rows.sort(key=lambda r: (-r["lift"], -r["joint"], r["code"]))
    return rows[: o.cooccurring]


def _lens(search: StoreSearch, model: Any, ref: CodeRef, top: int) -> dict[str, Any]:
    from codebook.analysis.logit_lens import logit_lens

    vocab = model.model.get_output_embeddings().weight.shape[0]
    lens = logit_lens(model, ref.site, ref.group, ref.code, min(top, vocab // 2))  # no overlap
    for side in ("positive", "negative"):
        for row in lens[side]:
            row["token"] = search.piece(int(row["token_id"]))
    return lens
