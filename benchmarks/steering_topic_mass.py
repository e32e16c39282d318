"""How far forcing a topic's codes moves the model towards the topic's words (a steering probe).

Sampled match rates are coarse: 0/80 says nothing about how close a model came. This measures,
per topic, the probability mass the next-token distribution puts on the topic's word tokens
(vocabulary entries the topic regex matches whole), averaged over the positions of text with
no topic, with the topic's codes forced (``mode='overwrite'``), divided by the same mass
unsteered (a ratio measured in the same run). Two code choices, n codes each (at most k per
codebook group):

* ``ranked``: ``find_topic_codes`` (enriched on the topic texts vs the background), as
  ``pipelines/steer.py`` uses;
* ``effect``: of each group's top ``--candidates`` ranked codes, the one that alone raises the
  mass most (``rank_codes_by_effect``, one forward pass per candidate; ``pipelines/steer.py
  --select effect``), groups by that gain.

Held out: the measurement text (``--text`` files, default the topics file's background
texts) is split, seeded (``--seed``, ``--test-fraction``), into a selection half and a test
half of documents (of ``--unit-tokens`` token chunks when there is one document). The effect
codes are chosen on the selection half's first ``--tokens`` tokens; the test half's first
``--tokens`` tokens give the headline ratios (``ranked_ratio``, ``effect_ratio``, ``ranked_kl``,
``base_mass``), with the selection half's beside them (``*_selection``). Test documents are
left out of the background the codes are ranked against.

Prints one JSON line per topic: ``base_mass``, ``ranked_ratio`` and ``effect_ratio`` (per n),
the mean KL (nats) from the unsteered distribution with n codes forced, ``effect_candidates``
(codes tried), ``effect_codes`` (chosen, best first), ``split``, and ``topic_text_mass``:
the same mass, unsteered, on the topic's own texts (their first ``--tokens`` tokens), which is
what the model does when the topic is really in its context. Steering that reaches it writes
like a topic text; sampled text then matches the regex at about ``1 - (1 - mass) ** tokens``.

    python benchmarks/steering_topic_mass.py --model CKPT --tokenizer TOK \\
        --topics configs/steering/text_steer_topics.yaml [--codes 4 10 16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codebook.analysis.heldout import split_halves  # noqa: E402
from codebook.data.text import load_tokenizer  # noqa: E402
from codebook.resolve import load_trained_model, resolve_model  # noqa: E402
from codebook.steering import (  # noqa: E402
    count_codes,
    find_topic_codes,
    rank_codes_by_effect,
    steered,
    topic_mass,
    topic_token_ids,
)
from codebook.topics import load_topics  # noqa: E402


def measurement_halves(tokenizer: Any, texts: list[str], tokens: int, seed: int,
                       test_fraction: float, unit_tokens: int
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], set[int]]:
    """``(selection ids, test ids, split info, test document indices)``: the texts split by
    document (by chunks of ``unit_tokens`` tokens when only one has tokens), each half's
    tokens concatenated in order and cut to ``tokens``, as (1, T) tensors."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    docs = [i for i, x in enumerate(ids) if x]
    if len(docs) >= 2:
        unit, units = "document", [ids[i] for i in docs]
    else:
        one = ids[docs[0]] if docs else []
        unit, units = "chunk", [one[i: i + unit_tokens] for i in range(0, len(one), unit_tokens)]
        docs = []
    if len(units) < 2:
        raise SystemExit(f"the measurement text has {len(units)} {unit}(s): a held-out split "
                         "needs at least 2 (give more text or a smaller --unit-tokens)")
    sel, test = split_halves(len(units), seed, test_fraction)
    halves = []
    for idx in (sel, test):
        flat = [t for i in idx for t in units[i]][:tokens]
        if len(flat) < 2:
            raise SystemExit(f"a half of the measurement text has {len(flat)} token(s)")
        halves.append(torch.tensor([flat], dtype=torch.long))
    info = {"unit": unit, "seed": seed, "test_fraction": test_fraction,
            "units_selection": len(sel), "units_test": len(test),
            "tokens_selection": halves[0].shape[1], "tokens_test": halves[1].shape[1]}
    return halves[0], halves[1], info, {docs[i] for i in test} if docs else set()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", help="default: the model folder")
    p.add_argument("--topics", required=True, help="a pipelines/steer.py topics file")
    p.add_argument("--text", nargs="+",
                   help="text files to measure on (default: the background texts)")
    p.add_argument("--tokens", type=int, default=256, help="positions measured per half")
    p.add_argument("--codes", type=int, nargs="+", default=[4, 10, 16])
    p.add_argument("--candidates", type=int, default=40, help="ranked codes tried per group")
    p.add_argument("--seed", type=int, default=0, help="seed of the selection/test split")
    p.add_argument("--test-fraction", type=float, default=0.5)
    p.add_argument("--unit-tokens", type=int, default=32,
                   help="chunk length the split uses when the text is one document")
    args = p.parse_args(argv)
    spec = load_topics(args.topics, None)
    path = resolve_model(args.model, Path("steering-probe") / "model", None)
    tokenizer = load_tokenizer(args.tokenizer or path)
    model = load_trained_model(path)
    sites = list(model.codebooks)
    k = min(model.codebooks[s].k for s in sites)
    texts = [Path(t).read_text() for t in args.text] if args.text else list(spec["background"])
    sel_ids, ids, split, test_docs = measurement_halves(
        tokenizer, texts, args.tokens, args.seed, args.test_fraction, args.unit_tokens)
    held_out = {texts[i] for i in test_docs}
    kept = [t for t in spec["background"] if t not in held_out]
    split["background_texts"] = len(kept)
    background = count_codes(model, tokenizer, kept or spec["background"], sites)
    groups = sum(model.codebooks[s].groups for s in sites)
    with torch.no_grad():
        p0 = torch.softmax(model(input_ids=ids).logits[0].float(), -1)
    for topic in spec["topics"]:
        tt = topic_token_ids(tokenizer, topic["regex"])
        row = {"topic": topic["name"], "topic_tokens": len(tt)}
        if not tt:
            print(json.dumps({**row, "error": "no vocabulary entry matches the regex"}),
                  flush=True)
            continue
        base, base_sel = topic_mass(model, ids, tt), topic_mass(model, sel_ids, tt)
        own = [tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"]
               for t in topic["topic_texts"]]
        own_mass = [topic_mass(model, t[:, : args.tokens], tt) for t in own if t.shape[1] > 1]
        ranked = find_topic_codes(model, tokenizer, topic["topic_texts"], background, sites,
                                  top=max(args.codes), max_per_group=k)
        # find_codes_by_effect's steps, the effect chosen on the selection half only
        pool = find_topic_codes(model, tokenizer, topic["topic_texts"], background, sites,
                                top=groups * args.candidates, max_per_group=args.candidates)
        effect = rank_codes_by_effect(model, pool, sel_ids, tt)
        row.update(base_mass=base, base_mass_selection=base_sel,
                   topic_text_mass=sum(own_mass) / max(len(own_mass), 1),
                   effect_candidates=len(pool),
                   effect_codes=[c["name"] for c in effect[: max(args.codes)]], split=split,
                   ranked_ratio={}, ranked_ratio_selection={}, effect_ratio={},
                   effect_ratio_selection={}, ranked_kl={})
        for n in args.codes:
            for name, codes in (("ranked", ranked[:n]), ("effect", effect[:n])):
                row[f"{name}_ratio"][n] = topic_mass(model, ids, tt, codes) / base
                row[f"{name}_ratio_selection"][n] = topic_mass(model, sel_ids, tt,
                                                               codes) / base_sel
            with torch.no_grad(), steered(model, ranked[:n], "overwrite"):
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            kl = (p0 * (p0.clamp_min(1e-12).log() - logp)).sum(-1).mean()
            row["ranked_kl"][n] = float(kl)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
