"""Topic steering, like for like: every method gets the same number of features from the same
candidate pool, the same interventions at the same strengths, and its rate is reported with a
bootstrap interval beside what it costs the text (perplexity under one judge model).

Per topic and method:
- **pool**: the ``pool`` features most enriched on the topic's texts against the background
  (``codebook.steering.find_topic_codes``, no cap per codebook group);
- **choice**: each forced alone (``set`` at its mean value) on a probe text; the ``features``
  that raise the probability of the topic's words most (at most k per group, where ``set``
  overwrites the group's weakest slots);
- **interventions**: ``set`` (forced active at every position, at multiples of its mean active
  value, and at its largest; a code's value is its weight in the sum, 1, so a multiple scales
  its vector) and ``add`` (its unit vector added to the site's output at norms that are
  multiples of the site's mean activation norm on the base model); the **dense** baseline adds
  the unit mean difference of the base model's activations on topic and background texts at
  the same norms;
- **held out**: every intervention is sampled with selection seeds; the best one whose samples'
  perplexity stays under the ceiling is then sampled again with test seeds, and those samples
  give the headline rate, its 95% bootstrap interval and cost. In a comparison the ceiling is
  one number for every method (``ppl_ceiling`` x the unsteered base model's samples'
  perplexity): a method's own unsteered samples, with its dictionary spliced in, would give
  each method a different ceiling.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from codebook.model import CodebookModel

TEST_SEED_OFFSET = 10_000  # test samples' seeds: never the selection samples'


@dataclass(frozen=True)
class Intervention:
    kind: str  # "set" or "add"
    strength: float  # set: multiple of the reference value; add: multiple of the site's norm
    reference: str = "mean"  # set: "mean" or "max" active value

    @property
    def label(self) -> str:
        if self.kind == "add":
            return f"add {self.strength:g}x norm"
        return f"set {self.strength:g}x {self.reference}"


def intervention_grid(opts: Any, dense: bool = False) -> list[Intervention]:
    """The interventions of ``opts`` (``SteeringOptions``); the dense baseline only adds."""
    grid = [] if dense else [Intervention("set", m) for m in opts.set_multiples]
    if opts.set_max and not dense:
        grid.append(Intervention("set", 1.0, "max"))
    return grid + [Intervention("add", n) for n in opts.add_norms]


def feature_vector(model: CodebookModel, feature: dict[str, Any]) -> tuple[torch.Tensor,
                                                                          float, dict[str, float]]:
    """A feature's contribution to its site's output per unit value (site width), the value a
    forced feature takes, and its reference values {"mean", "max"}: a code's vector (its
    group's slice; a code's value is its weight, 1), or an SAE latent's decoder row."""
    layer = model.codebooks[feature["site"]]
    code = int(feature["code"])
    if hasattr(layer, "mean_act"):  # an SAE latent (codebook.compare.sparse_coder)
        vec = layer.codes[0, code].detach().float()
        mean, top = float(layer.mean_act[code]), float(layer.max_act[code])
        return vec, mean, {"mean": mean, "max": top}
    g = int(feature["group"])
    vec = torch.zeros(layer.dim)
    lo = g * layer.group_dim
    vec[lo: lo + layer.group_dim] = layer.codes[g, code].detach().float()
    if layer.combine == "mean":
        vec = vec / layer.k
    return vec, 1.0, {"mean": 1.0, "max": 1.0}


@contextmanager
def added(model: CodebookModel, site: str, vector: torch.Tensor) -> Iterator[None]:
    """``vector`` added to ``site``'s output at every position (a forward hook on its layer)."""
    layer = model.codebooks[site]
    handle = layer.register_forward_hook(
        lambda module, args, out: out + vector.to(out.device, out.dtype))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def intervene(model: CodebookModel, features: Sequence[dict[str, Any]], iv: Intervention,
              site_norms: dict[str, float]) -> Iterator[None]:
    """``features`` steered by ``iv`` at every position (generated tokens included)."""
    from codebook.steering import steered

    with ExitStack() as stack:
        if iv.kind == "set":
            stack.enter_context(steered(model, features, mode="overwrite"))
        for f in features:
            vec, natural, ref = feature_vector(model, f)
            if iv.kind == "set":
                extra = iv.strength * ref[iv.reference] - natural
                if extra:
                    stack.enter_context(added(model, f["site"], extra * vec))
            else:
                unit = vec / vec.norm().clamp_min(1e-12)
                stack.enter_context(added(model, f["site"],
                                          iv.strength * site_norms[f["site"]] * unit))
        yield


def choose_features(model: CodebookModel, tokenizer: Any, topic: dict[str, Any],
                    background: Any, sites: list[str], probe: torch.Tensor,
                    opts: Any) -> list[dict[str, Any]]:
    """The ``opts.features`` features of the ``opts.pool`` most enriched that, forced alone
    (``set`` at the mean), raise the topic words' probability most (where the regex matches no
    single-word token: the most enriched); at most k per group."""
    from codebook.steering import find_topic_codes, topic_mass

    pool = find_topic_codes(model, tokenizer, topic["topic_texts"], background, sites,
                            top=opts.pool)
    if not topic["token_ids"]:  # no single-word token matches the regex: enrichment order
        gains = [-float(i) for i in range(len(pool))]
    else:
        base = max(topic_mass(model, probe, topic["token_ids"]), 1e-30)
        gains = []
        for c in pool:
            with intervene(model, [c], Intervention("set", 1.0), {}):
                gains.append(topic_mass(model, probe, topic["token_ids"]) / base)
    chosen: list[dict[str, Any]] = []
    taken: dict[tuple[str, int], int] = {}
    for i in np.argsort(-np.asarray(gains), kind="stable"):
        c, key = pool[i], (pool[i]["site"], int(pool[i]["group"]))
        if taken.get(key, 0) < model.codebooks[c["site"]].k:
            chosen.append({**c, "gain": float(gains[i]) if topic["token_ids"] else None})
            taken[key] = taken.get(key, 0) + 1
        if len(chosen) == opts.features:
            break
    return chosen


def dense_vector(model: CodebookModel, tokenizer: Any, topic_texts: Sequence[str],
                 background: Sequence[str], site: str, block_size: int = 256) -> torch.Tensor:
    """The mean of ``site``'s activations on the topic texts minus that on the background."""
    def mean_act(texts: Sequence[str]) -> torch.Tensor:
        from codebook.extraction import extract_windows, tokenise_documents

        windows = tokenise_documents(list(texts), 0, tokenizer, block_size)
        res = extract_windows(model, windows, [site], [site], device=torch.device("cpu"))
        return torch.as_tensor(np.asarray(res["acts"][site], dtype=np.float32)).mean(0)

    return mean_act(topic_texts) - mean_act(background)


def rate_interval(hits: np.ndarray, draws: int, seed: int = 0) -> tuple[float, float, float]:
    """The share of ``hits`` and its 95% percentile-bootstrap interval."""
    hits = np.asarray(hits, dtype=float)
    if not hits.size:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    boot = rng.choice(hits, size=(draws, hits.size), replace=True).mean(1)
    return float(hits.mean()), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def sample(model: CodebookModel, tokenizer: Any, prompts: Sequence[str], opts: Any,
           seed: int) -> list[str]:
    """``opts.samples`` continuations per prompt (prompt + continuation), seeded."""
    from codebook.steering import generate

    out = generate(model, tokenizer, prompts, samples=opts.samples,
                   max_new_tokens=opts.max_new_tokens, seed=seed)
    return [s["prompt"] + s["text"] for s in out]


def condition_result(texts: list[str], pattern: re.Pattern, judge: Any, tokenizer: Any,
                     draws: int, seed: int) -> dict[str, Any]:
    """A set of samples' topic rate (with its interval) and perplexity under ``judge``."""
    from codebook.steering import perplexity

    hits = np.asarray([bool(pattern.search(t)) for t in texts])
    rate, lo, hi = rate_interval(hits, draws, seed)
    return {"rate": rate, "rate_lo": lo, "rate_hi": hi, "n": int(hits.size),
            "perplexity": perplexity(judge, tokenizer, texts)}


def steer_method(model: CodebookModel, tokenizer: Any, spec: dict[str, Any], judge: Any,
                 site_norms: dict[str, float], opts: Any, seed: int = 0,
                 dense: dict[str, dict[str, torch.Tensor]] | None = None,
                 ceiling: float | None = None) -> dict[str, Any]:
    """One method's steering table (module docstring). ``dense`` ({topic: {site: vector}}):
    steer with those vectors instead of the model's own features (the dense baseline).
    ``ceiling``: the perplexity an admissible intervention stays under (default
    ``opts.ppl_ceiling`` x this model's unsteered samples')."""
    from codebook.steering import count_codes, perplexity

    sites = list(model.codebooks)
    prompts = spec["prompts"]
    grid = intervention_grid(opts, dense=dense is not None)
    plain = sample(model, tokenizer, prompts, opts, seed)  # unsteered: every topic's baseline
    unsteered_ppl = perplexity(judge, tokenizer, plain)
    if ceiling is None:
        ceiling = opts.ppl_ceiling * unsteered_ppl
    background = None if dense is not None else count_codes(model, tokenizer,
                                                             spec["background"], sites)
    probe = tokenizer(spec["background"][0], return_tensors="pt",
                      add_special_tokens=False)["input_ids"][:, :256]
    topics = []
    for t_i, topic in enumerate(spec["topics"]):
        pattern = topic["regex"]
        base_rate = float(np.mean([bool(pattern.search(t)) for t in plain]))
        if dense is not None:
            features = [{"site": s, "vector": v} for s, v in dense[topic["name"]].items()]
        else:
            features = choose_features(model, tokenizer, topic, background, sites, probe, opts)
        grid_results = []
        for iv in grid:
            if not features:
                break
            with _steering(model, features, iv, site_norms):
                texts = sample(model, tokenizer, prompts, opts, seed)
            grid_results.append({"intervention": iv.label, **condition_result(
                texts, pattern, judge, tokenizer, opts.bootstrap, seed)})
        best = max(admissible(grid_results, ceiling),
                   key=lambda r: (r["rate"], -r["perplexity"]), default=None)
        test = None
        if best is not None:
            iv = grid[[r["intervention"] for r in grid_results].index(best["intervention"])]
            with _steering(model, features, iv, site_norms):
                texts = sample(model, tokenizer, prompts, opts, seed + TEST_SEED_OFFSET + t_i)
            test = {"intervention": iv.label, **condition_result(
                texts, pattern, judge, tokenizer, opts.bootstrap, seed + t_i)}
        topics.append({
            "topic": topic["name"], "baseline_rate": base_rate,
            "features": [f.get("name", f"dense:{f['site']}") for f in features],
            "grid": grid_results, "chosen": best and best["intervention"], "test": test,
        })
    return {"unsteered_perplexity": unsteered_ppl, "ppl_ceiling": ceiling,
            "topics": topics, **summarise(topics, opts.bootstrap, seed)}


@contextmanager
def _steering(model: CodebookModel, features: list[dict[str, Any]], iv: Intervention,
              site_norms: dict[str, float]) -> Iterator[None]:
    if features and "vector" in features[0]:  # the dense baseline: add only
        with ExitStack() as stack:
            for f in features:
                unit = f["vector"] / f["vector"].norm().clamp_min(1e-12)
                stack.enter_context(added(model, f["site"],
                                          iv.strength * site_norms[f["site"]] * unit))
            yield
    else:
        with intervene(model, features, iv, site_norms):
            yield


def summarise(topics: list[dict[str, Any]], draws: int, seed: int = 0) -> dict[str, Any]:
    """Over topics: the mean held-out rate (a topic without an admissible intervention counts
    its unsteered rate), its 95% bootstrap interval (each topic's test samples resampled), and
    the topics reaching 0.6."""
    if not topics:
        return {"steering_rate": math.nan, "steering_topics": 0}
    rates = [t["test"]["rate"] if t["test"] else t["baseline_rate"] for t in topics]
    rng = np.random.default_rng(seed)
    boots = np.zeros(draws)
    for t, rate in zip(topics, rates, strict=True):
        n = t["test"]["n"] if t["test"] else 0
        boots += rng.binomial(n, rate, size=draws) / n if n else rate
    boots /= len(topics)
    return {"steering_rate": float(np.mean(rates)),
            "steering_rate_lo": float(np.quantile(boots, 0.025)),
            "steering_rate_hi": float(np.quantile(boots, 0.975)),
            "steering_topics_ge_060": int(sum(r >= 0.6 for r in rates)),
            "steering_topics": len(topics),
            "steering_baseline_rate": float(np.mean([t["baseline_rate"] for t in topics]))}


def best_under_ceiling(topics: list[dict[str, Any]], ceiling: float) -> tuple[float, int]:
    """Over topics, the mean of each topic's best rate among the grid's conditions whose
    perplexity is at most ``ceiling`` (a topic with none counts its unsteered rate), and the
    topics reaching 0.6. Read on the selection samples, so optimistic: the steering curve
    against cost, beside the held-out figure at the configured ceiling."""
    rates = [max((g["rate"] for g in admissible(t["grid"], ceiling)),
                 default=t["baseline_rate"]) for t in topics]
    return float(np.mean(rates)) if rates else math.nan, int(sum(r >= 0.6 for r in rates))


def admissible(grid: list[dict[str, Any]], ceiling: float) -> list[dict[str, Any]]:
    """The grid's conditions whose samples' perplexity is known and at most ``ceiling``."""
    return [g for g in grid if g["perplexity"] is not None and g["perplexity"] <= ceiling]
