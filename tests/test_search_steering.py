"""Code search over a store, topic codes, steered generation and pipelines/steer.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from corpus_helpers import build_store, make_corpus, save_bpe_tokenizer, save_tiny_codebook_model

from codebook.data.text import load_tokenizer
from codebook.errors import ConfigError
from codebook.resolve import load_trained_model
from codebook.steering import (
    count_codes,
    find_topic_codes,
    generate,
    rank_codes_by_effect,
    rank_topic_codes,
    topic_mass,
    topic_token_ids,
)
from codebook.store import list_to_numpy
from codebook.store.search import CodeRef, StoreSearch
from pipelines import steer as steer_cli

MONTHS = r"\b(January|February|March|April|May|June|July|August|September|October|November|December)\b"  # noqa: E501


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    texts = make_corpus(root / "corpus")
    tok = save_bpe_tokenizer(texts, root / "tok")
    save_tiny_codebook_model(root / "model", len(tok))
    tok.save_pretrained(str(root / "model"))
    store = build_store(root / "model", root / "corpus", root / "store")
    return {"root": root, "store": store, "search": StoreSearch(store)}


def rows(store) -> pa.Table:
    return pa.concat_tables(list(store.iter_shards()))


# ---------------------------------------------------------------------- search
def test_codes_for_token_reports_recall_and_precision_of_each_code(setup):
    search, table = setup["search"], rows(setup["store"])
    tid = search.token_id(" May")
    found = search.codes_for_token(" May", ["mlp_1"], top=5)
    assert found and found == sorted(found, key=lambda r: -r["recall"])
    ref = CodeRef.parse(found[0]["code"])
    codes = list_to_numpy(table.column("codes.mlp_1")).reshape(-1, 1, 2)[:, ref.group]
    fires = (codes == ref.code).any(axis=1)
    on_token = table.column("token_id").to_numpy() == tid
    assert found[0]["recall"] == pytest.approx((fires & on_token).sum() / on_token.sum())
    assert found[0]["precision"] == pytest.approx((fires & on_token).sum() / fires.sum())
    with pytest.raises(ConfigError, match="not one"):
        search.codes_for_token(" January February")


def test_codes_for_regex_ranks_by_precision_at_min_recall(setup):
    found = setup["search"].codes_for_regex(MONTHS, min_recall=0.05, top=10)
    assert found and all(r["recall"] >= 0.05 for r in found)
    keys = [(-r["precision"], -r["recall"]) for r in found]
    assert keys == sorted(keys)
    assert setup["search"].codes_for_regex(r"zzzqqq") == []
    with pytest.raises(ConfigError, match="invalid regex"):
        setup["search"].codes_for_regex("(unclosed")


def test_contexts_highlight_a_token_where_the_code_fires(setup):
    search, table = setup["search"], rows(setup["store"])
    ref = CodeRef.parse(search.codes_for_token(" May", ["attn_heads_1"], top=1)[0]["code"])
    contexts = search.contexts(ref, n=6, window=4)
    assert 1 <= len(contexts) <= 6
    docs, pos = table.column("doc_id").to_numpy(), table.column("position").to_numpy()
    codes = list_to_numpy(table.column("codes.attn_heads_1")).reshape(-1, 4, 2)
    tokens = table.column("token_id").to_numpy()
    for ctx in contexts:
        i = np.flatnonzero((docs == ctx["doc_id"]) & (pos == ctx["position"]))[0]
        assert ref.code in codes[i, ref.group]
        assert ctx["tokens"][ctx["highlight"]] == search.piece(int(tokens[i]))


def test_similar_codes_are_nearest_by_cosine(setup):
    search = setup["search"]
    ref = CodeRef("mlp_0", 0, 5)
    similar = search.similar_codes(ref, top=3)
    vecs = search.codebook("mlp_0")[0]
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    sims = unit @ unit[5]
    sims[5] = -np.inf
    assert [CodeRef.parse(s["code"]).code for s in similar] == list(np.argsort(-sims)[:3])


def test_bad_code_references_get_clear_errors(setup):
    search = setup["search"]
    with pytest.raises(ConfigError, match="site.group.code"):
        CodeRef.parse("mlp_0-5")
    with pytest.raises(ConfigError, match="unknown sites"):
        search.check(CodeRef("mlp_7", 0, 1))
    with pytest.raises(ConfigError, match="out of range"):
        search.check(CodeRef("mlp_0", 0, 300))
    with pytest.raises(ConfigError, match="groups 0..3"):
        search.check(CodeRef("attn_heads_0", 4, 1))


# ---------------------------------------------------------------------- topics and steering
def test_topic_finder_ranks_a_planted_code_first():
    rng = np.random.default_rng(0)
    background = rng.poisson(20, 500)
    topic = rng.poisson(2, 500)  # same code rates on 10x fewer tokens
    topic[137] = 60  # the planted topic code
    topic[5], background[5] = 1000, 9000  # fires on every topic token and 90% of the others
    ranked = rank_topic_codes(topic, background, topic_tokens=1000, background_tokens=10_000)
    assert ranked[0]["index"] == 137 and ranked[0]["score"] > ranked[1]["score"]
    assert ranked[0]["recall"] == pytest.approx(0.06)
    # an always-on code is barely enriched (x1.11): a log-odds score ranked it first (4.7 vs 3.4)
    assert ranked[0]["score"] > 3 and 5 not in [r["index"] for r in ranked]


@pytest.fixture(scope="module")
def model_and_tok(setup):
    model_dir = setup["root"] / "model"
    return load_trained_model(str(model_dir)), load_tokenizer(str(model_dir))


def test_forcing_a_code_changes_greedy_generation_deterministically(model_and_tok):
    model, tok = model_and_tok
    norms = model.codebooks["mlp_1"].codes[0].norm(dim=-1)
    code = {"site": "mlp_1", "group": 0, "code": int(norms.argmax())}
    kwargs = {"max_new_tokens": 12, "do_sample": False}
    base = generate(model, tok, ["the king went"], **kwargs)[0]["text"]
    steered = generate(model, tok, ["the king went"], codes=[code], **kwargs)[0]["text"]
    again = generate(model, tok, ["the king went"], codes=[code], **kwargs)[0]["text"]
    assert steered == again and steered != base
    replaced = generate(model, tok, ["the king went"], codes=[code], mode="replace", **kwargs)
    assert replaced == generate(model, tok, ["the king went"], codes=[code], mode="replace",
                                **kwargs) and replaced[0]["text"] != base
    assert generate(model, tok, ["the king went"], **kwargs)[0]["text"] == base  # removed


def test_topic_codes_and_steering_reject_bad_input(model_and_tok):
    model, tok = model_and_tok
    with pytest.raises(ConfigError, match="topic_texts"):
        find_topic_codes(model, tok, ["  "], ["the king"])
    with pytest.raises(ConfigError, match="unknown site"):
        find_topic_codes(model, tok, ["dragon"], ["the king"], sites=["mlp_9"])
    with pytest.raises(ConfigError, match="out of range"):
        generate(model, tok, ["the"], codes=[{"site": "mlp_1", "group": 0, "code": 10**6}])
    found = find_topic_codes(model, tok, ["dragon fire dragon castle dragon"] * 3,
                             ["the king went to Boston with Bob"] * 3, top=4, min_count=1)
    assert 1 <= len(found) <= 4 and all(f["score"] > 0 for f in found)
    counted = count_codes(model, tok, ["the king went to Boston with Bob"] * 3,
                          list(model.codebooks))  # background counted once, reused per topic
    assert find_topic_codes(model, tok, ["dragon fire dragon castle dragon"] * 3, counted,
                            top=4, min_count=1) == found
    full = find_topic_codes(model, tok, ["dragon fire dragon castle dragon"] * 3, counted,
                            top=10**6, min_count=1)
    capped = find_topic_codes(model, tok, ["dragon fire dragon castle dragon"] * 3, counted,
                              top=4, min_count=1, max_per_group=1)
    seen: set[tuple[str, int]] = set()
    first_of_each_group = []  # the best code of every group, in ranking order
    for f in full:
        if (f["site"], f["group"]) not in seen:
            seen.add((f["site"], f["group"]))
            first_of_each_group.append(f)
    assert capped == first_of_each_group[:4]
    assert len({(f["site"], f["group"]) for f in capped}) == len(capped)
    with pytest.raises(ConfigError, match="max_per_group"):
        find_topic_codes(model, tok, ["dragon"], counted, max_per_group=0)
    assert torch.is_grad_enabled()


def test_steer_pipeline_reports_rates_and_logs_samples(setup, tmp_path):
    topics = tmp_path / "topics.yaml"
    topics.write_text(
        "prompts: ['the king', 'in May']\n"
        f"background_files: ['{setup['root'] / 'corpus'}']\n"
        "topics:\n"
        "  - {name: dragon, regex: '\\bdragons?\\b', topic_texts: ['the dragon and the dragon "
        "fire dragon river']}\n")
    summary = steer_cli.main(["--model", str(setup["root"] / "model"), "--topics", str(topics),
                              "--samples", "2", "--max-new-tokens", "8", "--codes", "3",
                              "--out", str(tmp_path / "out")])
    (row,) = summary["topics"]
    assert row["topic"] == "dragon" and 1 <= len(row["codes_used"]) <= 3
    k = min(layer.k for layer in load_trained_model(str(setup["root"] / "model")
                                                       ).codebooks.values())
    groups = [name.rsplit(".", 1)[0] for name in row["codes_used"]]
    assert max(groups.count(g) for g in groups) <= k  # default overwrite mode: <= k per group
    assert 0 <= row["baseline_rate"] <= 1 and 0 <= row["steered_rate"] <= 1
    assert row["steered_perplexity"] > 1 and row["baseline_perplexity"] > 1
    samples = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().split("\n")
               if x]
    assert len(samples) == 2 * 2 * 2  # prompts x samples x (baseline, steered)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    names = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "samples")}
    assert "samples/samples.jsonl" in names
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompts: [a]\nbackground_texts: [b]\ntopics:\n  - {name: x, regex: 'x', "
                   "topic_texts: ['']}\n")
    with pytest.raises(SystemExit, match=r"topics\[0\].topic_texts"):
        steer_cli.main(["--model", str(setup["root"] / "model"), "--topics", str(bad)])


def months_topics(setup) -> str:
    """A topics file (YAML text) with one topic, months, over the test corpus as background."""
    return ("prompts: ['the king']\n"
            f"background_files: ['{setup['root'] / 'corpus'}']\n"
            "topics:\n"
            f"  - {{name: months, regex: '{MONTHS}', topic_texts: ['in May and June, then July "
            "and August, May again']}\n")


def test_steering_probe_benchmark_prints_mass_ratios_per_topic(setup, tmp_path):
    """benchmarks/steering_topic_mass.py: forced topic codes vs the same text unsteered, the
    effect codes chosen on the selection half of the background documents and the headline
    ratios measured on the test half."""
    import importlib.util

    from codebook.topics import load_topics

    topics = tmp_path / "topics.yaml"
    topics.write_text(months_topics(setup) + "  - {name: none, regex: 'zzzz', "
                                             "topic_texts: ['May']}\n")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "steering_topic_mass.py"
    done = subprocess.run([sys.executable, str(script), "--model", str(setup["root"] / "model"),
                           "--topics", str(topics), "--codes", "1", "3", "--candidates", "4",
                           "--tokens", "32"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    months, none = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert months["topic_tokens"] > 0 and 0 < months["base_mass"] < 1
    # unsteered mass on the topic's own text: the library's topic_mass, computed here apart
    model = load_trained_model(str(setup["root"] / "model"))
    tok = load_tokenizer(str(setup["root"] / "model"))
    words = topic_token_ids(tok, re.compile(MONTHS, re.IGNORECASE))
    text = "in May and June, then July and August, May again"
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :32]
    want = topic_mass(model, ids, words)
    assert 0 < months["topic_text_mass"] == pytest.approx(want, rel=1e-5)
    for key in ("ranked_ratio", "effect_ratio", "ranked_kl", "ranked_ratio_selection",
                "effect_ratio_selection"):
        assert set(months[key]) == {"1", "3"} and all(v >= 0 for v in months[key].values())
    # the halves: the 24 background documents split by seed 0, test documents out of the
    # background; the same seed gives the same halves, another seed others
    spec = importlib.util.spec_from_file_location("steering_topic_mass", script)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    background = load_topics(topics, None)["background"]
    sel_ids, test_ids, info, test_docs = probe.measurement_halves(tok, background, 32, 0, 0.5, 32)
    assert months["split"] == {**info, "background_texts": 24 - len(test_docs)}
    assert info["unit"] == "document" and info["units_selection"] + info["units_test"] == 24
    assert len(test_docs) == info["units_test"] == 12
    again = probe.measurement_halves(tok, background, 32, 0, 0.5, 32)
    assert torch.equal(again[1], test_ids) and again[3] == test_docs
    assert probe.measurement_halves(tok, background, 32, 1, 0.5, 32)[3] != test_docs
    one = probe.measurement_halves(tok, [background[0]], 16, 0, 0.5, 8)  # one text: chunks
    assert one[2]["unit"] == "chunk" and one[3] == set() and one[2]["units_test"] >= 1
    # the effect codes are each group's best on the selection half (at least as good as the
    # top ranked code there) and the headline is those codes forced on the test half
    assert months["effect_ratio_selection"]["1"] >= months["ranked_ratio_selection"]["1"] - 1e-9
    assert months["effect_candidates"] >= len(months["effect_codes"]) >= 1
    site, group, code = months["effect_codes"][0].rsplit(".", 2)
    first = [{"site": site, "group": int(group), "code": int(code)}]
    base = topic_mass(model, test_ids, words)
    assert months["base_mass"] == pytest.approx(base, rel=1e-5)
    assert months["effect_ratio"]["1"] == pytest.approx(
        topic_mass(model, test_ids, words, first) / base, rel=1e-5)
    assert months["effect_ratio_selection"]["1"] == pytest.approx(
        topic_mass(model, sel_ids, words, first) / topic_mass(model, sel_ids, words), rel=1e-5)
    assert none["error"].startswith("no vocabulary entry")


def test_effect_ranking_keeps_each_groups_best_code_by_measured_gain(model_and_tok):
    model, tok = model_and_tok
    pattern = re.compile(MONTHS, re.IGNORECASE)
    words = topic_token_ids(tok, pattern)
    assert words and all(pattern.fullmatch(tok.decode([i]).strip()) for i in words)
    ids = tok("the king went to the river in the morning and the", return_tensors="pt",
              add_special_tokens=False)["input_ids"]
    candidates = [{"site": s, "group": g, "code": c} for s in ("attn_heads_1", "mlp_1")
                  for g in range(model.codebooks[s].groups) for c in range(0, 300, 30)]
    ranked = rank_codes_by_effect(model, candidates, ids, words)
    base = topic_mass(model, ids, words)
    assert ranked and len({(c["site"], c["group"]) for c in ranked}) == len(ranked)
    assert [c["gain"] for c in ranked] == sorted((c["gain"] for c in ranked), reverse=True)
    for c in ranked[:3]:  # the gain is what forcing the code alone measures, and the group's best
        assert c["gain"] == pytest.approx(topic_mass(model, ids, words, [c]) / base)
        same = [d for d in candidates if (d["site"], d["group"]) == (c["site"], c["group"])]
        assert c["gain"] >= max(topic_mass(model, ids, words, [d]) for d in same) / base - 1e-9
    with pytest.raises(ConfigError, match="no single-word token"):
        rank_codes_by_effect(model, candidates, ids, [])


def test_steer_pipeline_effect_selection_and_its_early_error(setup, tmp_path):
    topics = tmp_path / "topics.yaml"
    topics.write_text(months_topics(setup))
    args = ["--model", str(setup["root"] / "model"), "--samples", "1", "--max-new-tokens", "4",
            "--codes", "2", "--select", "effect", "--candidates", "3"]
    summary = steer_cli.main([*args, "--topics", str(topics), "--out", str(tmp_path / "out")])
    (row,) = summary["topics"]
    groups = [name.rsplit(".", 1)[0] for name in row["codes_used"]]
    assert len(groups) <= 2 and len(set(groups)) == len(groups)  # one code per group
    from mlflow.tracking import MlflowClient

    params = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}").get_run(
        summary["mlflow_run_id"]).data.params
    assert params["select"] == "effect" and params["candidates"] == "3"
    bad = tmp_path / "bad.yaml"
    bad.write_text(topics.read_text().replace(MONTHS, "zzqq"))
    with pytest.raises(SystemExit, match=r"topics\[0\].regex.*no single-word token"):
        steer_cli.main([*args, "--topics", str(bad), "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()  # stopped before any work
