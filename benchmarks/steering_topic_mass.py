"""How far forcing a topic's codes moves the model towards the topic's words (a steering probe).

Sampled match rates are coarse: 0/80 says nothing about how close a model came. This measures,
per topic, the probability mass the next-token distribution puts on the topic's word tokens
(vocabulary entries the topic regex matches whole), averaged over the positions of a text with
no topic (``--text``, default the topics file's first background file), with the topic's codes
forced (``mode='overwrite'``), divided by the same mass unsteered (a ratio measured in the same
run). Two code choices, n codes each (at most k per codebook group):

* ``ranked``: ``find_topic_codes`` (enriched on the topic texts vs the background), as
  ``pipelines/steer.py`` uses;
* ``effect``: of each group's top ``--candidates`` ranked codes, the one that alone raises the
  mass most (``rank_codes_by_effect``, one forward pass per candidate; ``pipelines/steer.py
  --select effect``), groups by that gain.

Prints one JSON line per topic: ``base_mass``, ``ranked_ratio`` and ``effect_ratio`` (per n),
the mean KL (nats) from the unsteered distribution with n codes forced, and ``topic_text_mass``:
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codebook.data.text import load_tokenizer  # noqa: E402
from codebook.resolve import load_trained_model, resolve_model  # noqa: E402
from codebook.steering import (  # noqa: E402
    count_codes,
    find_codes_by_effect,
    find_topic_codes,
    steered,
    topic_mass,
    topic_token_ids,
)
from codebook.topics import load_topics  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", help="default: the model folder")
    p.add_argument("--topics", required=True, help="a pipelines/steer.py topics file")
    p.add_argument("--text", help="text to measure on (default: the first background file)")
    p.add_argument("--tokens", type=int, default=256, help="positions measured")
    p.add_argument("--codes", type=int, nargs="+", default=[4, 10, 16])
    p.add_argument("--candidates", type=int, default=40, help="ranked codes tried per group")
    args = p.parse_args(argv)
    spec = load_topics(args.topics, None)
    path = resolve_model(args.model, Path("steering-probe") / "model", None)
    tokenizer = load_tokenizer(args.tokenizer or path)
    model = load_trained_model(path)
    sites = list(model.codebooks)
    k = min(model.codebooks[s].k for s in sites)
    text = Path(args.text).read_text() if args.text else spec["background"][0]
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = ids[:, : args.tokens]
    background = count_codes(model, tokenizer, spec["background"], sites)
    with torch.no_grad():
        p0 = torch.softmax(model(input_ids=ids).logits[0].float(), -1)
    for topic in spec["topics"]:
        tt = topic_token_ids(tokenizer, topic["regex"])
        row = {"topic": topic["name"], "topic_tokens": len(tt)}
        if not tt:
            print(json.dumps({**row, "error": "no vocabulary entry matches the regex"}),
                  flush=True)
            continue
        base = topic_mass(model, ids, tt)
        own = [tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"]
               for t in topic["topic_texts"]]
        own_mass = [topic_mass(model, t[:, : args.tokens], tt) for t in own if t.shape[1] > 1]
        ranked = find_topic_codes(model, tokenizer, topic["topic_texts"], background, sites,
                                  top=max(args.codes), max_per_group=k)
        effect = find_codes_by_effect(model, tokenizer, topic["topic_texts"], background,
                                      sites, ids, tt, args.candidates)
        row.update(base_mass=base, topic_text_mass=sum(own_mass) / max(len(own_mass), 1),
                   ranked_ratio={}, effect_ratio={}, ranked_kl={})
        for n in args.codes:
            row["ranked_ratio"][n] = topic_mass(model, ids, tt, ranked[:n]) / base
            row["effect_ratio"][n] = topic_mass(model, ids, tt, effect[:n]) / base
            with torch.no_grad(), steered(model, ranked[:n], "overwrite"):
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            kl = (p0 * (p0.clamp_min(1e-12).log() - logp)).sum(-1).mean()
            row["ranked_kl"][n] = float(kl)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
