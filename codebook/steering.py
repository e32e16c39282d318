"""Topic codes and steered generation.

``find_topic_codes`` runs the model over topic and background texts and ranks the codes that
fire more on the topic (log rate ratio with add-one smoothing, plus precision and recall per
code); ``rank_codes_by_effect`` reorders candidates by how much each, forced alone, raises the
probability of the topic's words (``topic_mass``); ``generate`` samples with a set of codes
forced on at every position (generated tokens included), and ``perplexity`` scores texts under
a model, for a fluency check.
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from codebook.errors import ConfigError
from codebook.interventions import ForceMode, force_codes_at_sites
from codebook.model import CodebookModel


def rank_topic_codes(topic_counts: np.ndarray, background_counts: np.ndarray,
                     topic_tokens: int, background_tokens: int, min_count: int = 2,
                     top: int = 10) -> list[dict[str, float]]:
    """Codes enriched on the topic, best first.

    ``*_counts``: per code, how many topic / background tokens it fired on. Score: the smoothed
    log rate ratio ``log((t+1)/(T+1)) - log((b+1)/(B+1))``, how many times more often (in log)
    the code fires on the topic. (A log-odds ratio, ``t/(T-t)``, blows up for codes that fire on
    nearly every token, as some of a head's k codes do, and ranked those first.) Precision =
    share of the code's firings (rate-normalised) that are on the topic, recall = share of topic
    tokens it fires on. Codes with fewer than ``min_count`` topic firings are skipped.
    """
    t = np.asarray(topic_counts, dtype=np.float64)
    b = np.asarray(background_counts, dtype=np.float64)
    if t.shape != b.shape:
        raise ValueError(f"count shapes differ: {t.shape} vs {b.shape}")
    if topic_tokens <= 0 or background_tokens <= 0:
        raise ValueError("topic_tokens and background_tokens must be positive")
    score = np.log((t + 1) / (topic_tokens + 1)) - np.log((b + 1) / (background_tokens + 1))
    rate_t, rate_b = t / topic_tokens, b / background_tokens
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(rate_t + rate_b > 0, rate_t / (rate_t + rate_b), 0.0)
    eligible = np.flatnonzero((t >= min_count) & (score > 0))
    order = eligible[np.argsort(-score[eligible], kind="stable")][:top]
    return [{"index": int(i), "score": float(score[i]), "precision": float(precision[i]),
             "recall": float(rate_t[i]), "topic_count": int(t[i]),
             "background_count": int(b[i])} for i in order]


def count_codes(model: CodebookModel, tokenizer: Any, texts: Sequence[str], sites: list[str],
                block_size: int = 256) -> tuple[dict[str, np.ndarray], int]:
    """Per site, (groups * num_codes,) firing counts over ``texts``; and the token count."""
    from codebook.extraction import extract_windows, tokenise_documents

    windows = tokenise_documents(list(texts), 0, tokenizer, block_size)
    if len(windows["doc_id"]) == 0:
        raise ConfigError("texts", "the texts hold no tokens", "give non-empty texts")
    device = next(model.parameters()).device
    res = extract_windows(model, windows, sites, [], device=device)
    counts = {}
    for s in sites:
        layer = model.codebooks[s]
        codes = res["codes"][s].astype(np.int64)  # (T, groups, k)
        flat = codes + (np.arange(layer.groups) * layer.num_codes)[None, :, None]
        counts[s] = np.bincount(flat[codes >= 0], minlength=layer.groups * layer.num_codes)
    return counts, len(res["token_id"])


def find_topic_codes(model: CodebookModel, tokenizer: Any, topic_texts: Sequence[str],
                     background: Sequence[str] | tuple[dict[str, np.ndarray], int],
                     sites: list[str] | None = None, top: int = 10, min_count: int = 2,
                     block_size: int = 256, max_per_group: int | None = None
                     ) -> list[dict[str, Any]]:
    """The ``top`` codes most enriched on the topic over all ``sites``: dicts with ``site``,
    ``group``, ``code``, ``name`` (``site.group.code``) and the scores of ``rank_topic_codes``.

    ``background`` is texts, or ``count_codes``' result for them (count once, reuse per topic).
    ``max_per_group`` caps the codes taken from one codebook group (e.g. k, for forcing with
    ``mode='overwrite'``); lower-ranked codes of other groups fill the list instead.
    """
    if max_per_group is not None and max_per_group < 1:
        raise ConfigError("max_per_group", f"{max_per_group} < 1", "use a positive cap or None")
    if not any(t.strip() for t in topic_texts):
        raise ConfigError("topic_texts", "empty", "give at least one text about the topic")
    sites = list(model.codebooks) if sites is None else list(sites)
    for s in sites:
        model.site(s)  # clear error for unknown sites
    if isinstance(background, tuple):
        counts, n_background = background
        missing = [s for s in sites if s not in counts]
        if missing:
            raise ConfigError("background", f"no background counts for sites {missing}",
                              "count the background at the same sites")
    else:
        if not any(t.strip() for t in background):
            raise ConfigError("background_texts", "empty", "give background text to compare with")
        counts, n_background = count_codes(model, tokenizer, background, sites, block_size)
    topic, n_topic = count_codes(model, tokenizer, topic_texts, sites, block_size)
    found = []
    for s in sites:
        num_codes = model.codebooks[s].num_codes
        per_site = top if max_per_group is None else len(topic[s])  # cap before cutting
        for row in rank_topic_codes(topic[s], counts[s], n_topic, n_background, min_count,
                                    per_site):
            group, code = divmod(row.pop("index"), num_codes)
            found.append({"site": s, "group": group, "code": code,
                          "name": f"{s}.{group}.{code}", **row})
    found.sort(key=lambda r: -r["score"])
    if max_per_group is not None:  # keep each group's best max_per_group codes, in rank order
        taken: Counter[tuple[str, int]] = Counter()
        capped = []
        for r in found:
            taken[r["site"], r["group"]] += 1
            if taken[r["site"], r["group"]] <= max_per_group:
                capped.append(r)
        found = capped
    return found[:top]


def topic_token_ids(tokenizer: Any, pattern: re.Pattern) -> list[int]:
    """Vocabulary entries that are one word (optional leading space) ``pattern`` matches whole."""
    ids = []
    for i in range(len(tokenizer)):
        piece = tokenizer.decode([i])
        if re.fullmatch(r"\s?[A-Za-z]+", piece) and pattern.fullmatch(piece.strip()):
            ids.append(i)
    return ids


@torch.no_grad()
def topic_mass(model: CodebookModel, input_ids: torch.Tensor, token_ids: Sequence[int],
               codes: Sequence[dict[str, Any]] = (), mode: ForceMode = "overwrite") -> float:
    """Mean next-token probability on ``token_ids`` over the positions of ``input_ids`` (1, T),
    with ``codes`` forced."""
    device = next(model.parameters()).device
    with steered(model, codes, mode):
        probs = torch.softmax(model(input_ids=input_ids.to(device)).logits[0].float(), -1)
    return float(probs[:, list(token_ids)].sum(-1).mean())


def rank_codes_by_effect(model: CodebookModel, candidates: Sequence[dict[str, Any]],
                         input_ids: torch.Tensor, token_ids: Sequence[int],
                         mode: ForceMode = "overwrite") -> list[dict[str, Any]]:
    """Per codebook group, the candidate that alone raises ``topic_mass`` most; best first.

    One forward pass per candidate. Each returned code gets ``gain``: its mass over the
    unsteered mass. Candidates that lower the mass are dropped.
    """
    if not token_ids:
        raise ConfigError("regex", "matches no single-word token of the vocabulary",
                          "rank codes by enrichment instead, or use a regex over whole words")
    base = topic_mass(model, input_ids, token_ids)
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for c in candidates:
        gain = topic_mass(model, input_ids, token_ids, [c], mode) / max(base, 1e-30)
        key = (c["site"], int(c["group"]))
        if gain > max(1.0, best.get(key, {}).get("gain", 0.0)):
            best[key] = {**c, "gain": gain}
    return sorted(best.values(), key=lambda c: -c["gain"])


def find_codes_by_effect(model: CodebookModel, tokenizer: Any, topic_texts: Sequence[str],
                         background: Sequence[str] | tuple[dict[str, np.ndarray], int],
                         sites: list[str], input_ids: torch.Tensor, token_ids: Sequence[int],
                         candidates: int = 20, min_count: int = 2,
                         mode: ForceMode = "overwrite") -> list[dict[str, Any]]:
    """``rank_codes_by_effect`` over each group's ``candidates`` codes most enriched on the
    topic (``find_topic_codes``): one code per group, the best gain first."""
    groups = sum(model.codebooks[s].groups for s in sites)
    ranked = find_topic_codes(model, tokenizer, topic_texts, background, sites,
                              top=groups * candidates, min_count=min_count,
                              max_per_group=candidates)
    return rank_codes_by_effect(model, ranked, input_ids, token_ids, mode)


def codes_by_site(codes: Sequence[dict[str, Any]]) -> dict[str, dict[int, list[int]]]:
    """``[{site, group, code}, ...]`` -> ``{site: {group: [code, ...]}}`` for ``force_codes``."""
    out: dict[str, dict[int, list[int]]] = {}
    for c in codes:
        out.setdefault(c["site"], {}).setdefault(int(c["group"]), []).append(int(c["code"]))
    return out


@contextmanager
def steered(model: CodebookModel, codes: Sequence[dict[str, Any]],
            mode: ForceMode = "add") -> Iterator[None]:
    """Force ``codes`` (dicts with site, group, code) on at every position: added to the
    chosen codes (``add``), as the only codes of their groups (``replace``), or in place of
    their groups' lowest-ranked codes (``overwrite``, at most k per group)."""
    with force_codes_at_sites(model, codes_by_site(codes), mode=mode):
        yield


@torch.no_grad()
def generate(model: CodebookModel, tokenizer: Any, prompts: Sequence[str], samples: int = 1,
             max_new_tokens: int = 40, codes: Sequence[dict[str, Any]] = (),
             do_sample: bool = True, temperature: float = 1.0, top_k: int | None = 50,
             seed: int = 0, mode: ForceMode = "add") -> list[dict[str, Any]]:
    """``samples`` continuations per prompt, with ``codes`` forced on (none: baseline).

    A prompt's samples are drawn as one batch seeded per prompt, so baseline and steered
    samples share their random draws. Returns dicts with ``prompt``, ``sample``, ``text`` (the
    continuation only).
    """
    if not prompts:
        raise ConfigError("prompts", "empty", "give at least one prompt")
    device = next(model.parameters()).device
    out = []
    with steered(model, codes, mode):
        for p_i, prompt in enumerate(prompts):
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            if ids.shape[1] == 0:
                bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else \
                    tokenizer.eos_token_id
                ids = torch.tensor([[bos]])
            ids = ids.repeat(samples, 1).to(device)
            torch.manual_seed(seed * 1_000_003 + p_i * 1009)
            kwargs = {"do_sample": do_sample, "max_new_tokens": max_new_tokens,
                      "pad_token_id": tokenizer.eos_token_id}
            if do_sample:
                kwargs.update(temperature=temperature, top_k=top_k)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            for s_i, row in enumerate(gen[:, ids.shape[1]:]):
                text = tokenizer.decode(row, skip_special_tokens=True)
                out.append({"prompt": prompt, "sample": s_i, "text": text})
    return out


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, texts: Sequence[str]) -> float | None:
    """Token-weighted perplexity of ``texts`` under ``model`` (a CodebookModel runs with its
    codebooks on unless the caller wraps this in ``codebooks_disabled``)."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        if ids.shape[1] < 2:
            continue
        ids = ids.to(device)
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:],
                                                 reduction="sum")
        total += float(loss)
        count += ids.shape[1] - 1
    return math.exp(total / count) if count else None


def steering_table(model: CodebookModel, tokenizer: Any, spec: dict[str, Any], *,
                   sites: Sequence[str] | None = None, codes: int = 10, select: str = "ranked",
                   candidates: int = 20, min_count: int = 2, mode: ForceMode = "overwrite",
                   samples: int = 10, max_new_tokens: int = 200, temperature: float = 1.0,
                   seed: int = 0) -> dict[str, Any]:
    """``pipelines/steer.py``'s experiment on a loaded model and a topics spec
    (``codebook.topics.load_topics``): per topic, ``codes`` codes found (``select``:
    ``ranked`` or ``effect``), ``samples`` baseline and steered samples per prompt (the same
    seeds), the share matching the topic's regex and the perplexity of both with the codebooks
    off. Returns ``rows`` (one per topic) and ``samples``."""
    def rate(batch: list[dict[str, Any]], pattern: re.Pattern) -> float:
        return sum(bool(pattern.search(s["text"])) for s in batch) / len(batch)

    def fluency(batch: list[dict[str, Any]]) -> float | None:
        with model.codebooks_disabled():
            return perplexity(model, tokenizer, [s["prompt"] + s["text"] for s in batch])

    gen = {"samples": samples, "max_new_tokens": max_new_tokens,
           "temperature": temperature, "seed": seed}
    names = list(sites or model.codebooks)
    for s in names:
        model.site(s)  # clear error for an unknown site, before any work
    baseline = generate(model, tokenizer, spec["prompts"], **gen)
    k_min = min(model.codebooks[s].k for s in names)  # overwrite forces at most k per group
    background = count_codes(model, tokenizer, spec["background"], names)  # once for all
    probe = tokenizer(spec["background"][0], return_tensors="pt",
                      add_special_tokens=False)["input_ids"][:, :256]  # for select="effect"
    baseline_ppl = fluency(baseline)
    rows, out = [], [{**s, "topic": None, "condition": "baseline"} for s in baseline]
    for topic in spec["topics"]:
        if select == "effect":
            chosen = find_codes_by_effect(model, tokenizer, topic["topic_texts"], background,
                                          names, probe, topic["token_ids"], candidates,
                                          min_count, mode)[:codes]
        else:
            chosen = find_topic_codes(model, tokenizer, topic["topic_texts"], background, names,
                                      top=codes, min_count=min_count,
                                      max_per_group=k_min if mode == "overwrite" else None)
        if not chosen:
            print(f"topic {topic['name']!r}: no code is enriched on its texts; skipped",
                  file=sys.stderr, flush=True)
        steered = generate(model, tokenizer, spec["prompts"], codes=chosen, mode=mode,
                           **gen) if chosen else []
        out += [{**s, "topic": topic["name"], "condition": "steered"} for s in steered]
        rows.append({
            "topic": topic["name"], "regex": topic["regex"].pattern,
            "baseline_rate": rate(baseline, topic["regex"]),
            "steered_rate": rate(steered, topic["regex"]) if steered else None,
            "codes_used": [c["name"] for c in chosen],
            "baseline_perplexity": baseline_ppl,
            "steered_perplexity": fluency(steered) if steered else None,
        })
    return {"rows": rows, "samples": out}
