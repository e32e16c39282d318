"""Automatic code labels (codebook.store.label_counts, codebook.store.autolabel): sparse
per-shard counts against brute force, labels of planted codes on a synthetic store (token,
bigram, regex) with their test-half figures computed by hand, and the Ray Data driver against
the local one."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from codebook.store import CodeStore, SiteInfo, StoreMeta, token_table
from codebook.store.autolabel import (
    LABEL_SCHEMA,
    LABELS_FILE,
    ShardCounter,
    build_labels,
    choose_labels,
    prepare_labels,
    read_labels,
)
from codebook.store.heldout import DocumentSplit
from codebook.store.label_counts import COUNT_SCHEMA, merge_counts, shard_label_counts

SITE = "mlp_0"
TOKEN_CODE, BIGRAM_CODE, ONCE_CODE = 3, 5, 15
NUM_CODES = 16


def fsm_meta(num_documents: int, num_shards: int, groups: int = 1, k: int = 1,
             num_codes: int = NUM_CODES) -> StoreMeta:
    return StoreMeta(model="m", tokenizer=None, source={"kind": "fsm"},
                     sites={SITE: SiteInfo(groups=groups, k=k, num_codes=num_codes, dim=8)},
                     block_size=64, num_shards=num_shards, num_documents=num_documents)


def doc_rows(lengths: np.ndarray, first_doc: int = 0) -> tuple[np.ndarray, np.ndarray]:
    docs = np.repeat(np.arange(first_doc, first_doc + len(lengths)), lengths)
    pos = np.concatenate([np.arange(n) for n in lengths])
    return docs, pos


def previous_token(docs: np.ndarray, pos: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """(T,) the token before each one in its document, -1 at a document's start."""
    prev = np.full(len(tokens), -1)
    same = (docs[1:] == docs[:-1]) & (pos[1:] == pos[:-1] + 1)
    prev[1:][same] = tokens[:-1][same]
    return prev


# ---------------------------------------------------------------------- the counts
def brute_counts(table: pa.Table, meta: StoreMeta, split: DocumentSplit) -> Counter:
    """Every count row, token by token in Python."""
    info = meta.sites[SITE]
    rows = table.to_pylist()
    by_pos = {(r["doc_id"], r["position"]): r["token_id"] for r in rows}
    out: Counter = Counter()
    for r in rows:
        half = "test" if split.is_test[r["doc_id"]] else "sel"
        tok = r["token_id"]
        prev = by_pos.get((r["doc_id"], r["position"] - 1))
        out[("", -1, -1, "token", tok, -1, half)] += 1
        if prev is not None:
            out[("", -1, -1, "bigram", prev, tok, half)] += 1
        codes = np.asarray(r[f"codes.{SITE}"]).reshape(info.groups, info.k)
        for g in range(info.groups):
            for c in sorted(set(codes[g].tolist())):
                out[(SITE, g, c, "code", -1, -1, half)] += 1
                out[(SITE, g, c, "token", tok, -1, half)] += 1
                if prev is not None:
                    out[(SITE, g, c, "bigram", prev, tok, half)] += 1
    return out


def as_counter(table: pa.Table) -> Counter:
    assert table.schema.equals(COUNT_SCHEMA)
    keys = ["site", "group", "code", "kind", "a", "b", "half"]
    return Counter({tuple(r[k] for k in keys): r["count"] for r in table.to_pylist()})


def test_shard_counts_match_brute_force_and_merge():
    rng = np.random.default_rng(0)
    meta = fsm_meta(num_documents=30, num_shards=2, groups=2, k=2, num_codes=6)
    split = DocumentSplit(30, seed=1)
    tables = []
    for first, n_docs in ((0, 14), (14, 16)):
        docs, pos = doc_rows(rng.integers(1, 9, n_docs), first)
        tokens = rng.integers(0, 5, len(docs))
        codes = rng.integers(0, 6, (len(docs), 2, 2))  # repeats within a group's slots too
        tables.append(token_table(docs, pos, tokens, {SITE: codes}, meta))
    parts = [shard_label_counts(t, meta, split) for t in tables]
    for table, part in zip(tables, parts, strict=True):
        assert as_counter(part) == brute_counts(table, meta, split)
    both = pa.concat_tables(tables)
    merged = merge_counts(parts)
    assert as_counter(merged) == brute_counts(both, meta, split)
    assert as_counter(merged) == as_counter(shard_label_counts(both, meta, split))
    # a bigram never crosses a document boundary: only positions >= 1 start one
    bigram_total = sum(v for k, v in as_counter(merged).items()
                       if k[0] == "" and k[3] == "bigram")
    assert bigram_total == int((both.column("position").to_numpy() > 0).sum())
    # rows in another order count the same
    shuffled = both.take(pa.array(rng.permutation(both.num_rows)))
    assert as_counter(shard_label_counts(shuffled, meta, split)) == as_counter(merged)
    assert merge_counts([]).num_rows == 0


# ---------------------------------------------------------------------- planted FSM store
def planted_store(root: Path, seed: int = 0) -> tuple[CodeStore, dict[str, np.ndarray]]:
    """200 documents in 2 shards: code 3 fires on token 7 (plus 10% noise elsewhere), code 5
    on token 2 after token 9, code 15 once, every other token a random other code."""
    rng = np.random.default_rng(seed)
    n_docs = 200
    meta = fsm_meta(n_docs, num_shards=2)
    lengths = rng.integers(10, 40, n_docs)
    docs, pos = doc_rows(lengths)
    tokens = rng.integers(0, 20, len(docs))
    prev = previous_token(docs, pos, tokens)
    bigram = (prev == 9) & (tokens == 2)
    others = np.setdiff1d(np.arange(NUM_CODES), [TOKEN_CODE, BIGRAM_CODE, ONCE_CODE])
    codes = rng.choice(others, len(docs))
    free = (tokens != 7) & ~bigram
    codes[free & (rng.random(len(docs)) < 0.1)] = TOKEN_CODE
    codes[tokens == 7] = TOKEN_CODE
    codes[bigram] = BIGRAM_CODE
    codes[np.flatnonzero(free & (codes != TOKEN_CODE))[0]] = ONCE_CODE
    store = CodeStore.create(root, meta)
    for shard, (lo, hi) in enumerate(((0, 100), (100, 200))):
        rows = (docs >= lo) & (docs < hi)
        store.write_shard(shard, token_table(docs[rows], pos[rows], tokens[rows],
                                             {SITE: codes[rows][:, None, None]}, meta))
    return store, {"docs": docs, "tokens": tokens, "codes": codes, "bigram": bigram}


def held_out(fires: np.ndarray, label: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    """Precision and recall of ``fires`` for ``label`` on the ``test`` tokens."""
    joint = (fires & label & test).sum()
    return joint / (fires & test).sum(), joint / (label & test).sum()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_store(tmp_path_factory.mktemp("planted"))


def test_planted_token_and_bigram_codes(planted):
    store, data = planted
    assert read_labels(store) == {}  # nothing built yet
    table = build_labels(store, progress=False)
    assert table.schema.equals(LABEL_SCHEMA)
    assert (store.root / LABELS_FILE).is_file()
    on_disk = pq.read_table(store.root / LABELS_FILE)
    assert on_disk.equals(table)
    info = json.loads(on_disk.schema.metadata[b"codebook.labels"])
    assert info["features"] == [] and info["top_candidates"] == 5 and info["min_count"] == 2

    labels = read_labels(store)
    test = DocumentSplit(200, seed=0).is_test[data["docs"]]
    codes, tokens = data["codes"], data["tokens"]

    row = labels[f"{SITE}.0.{TOKEN_CODE}"]
    assert row["label"] == "token 7" and row["kind"] == "token"
    p, r = held_out(codes == TOKEN_CODE, tokens == 7, test)
    assert row["precision"] == pytest.approx(p) and row["recall"] == pytest.approx(r)
    assert r == 1.0 and 0.3 < p < 0.6  # the planted noise: ~10% of the other tokens
    assert row["count"] == int((codes == TOKEN_CODE).sum())
    sel = ~test
    p_sel, r_sel = held_out(codes == TOKEN_CODE, tokens == 7, sel)
    assert row["precision_selection"] == pytest.approx(p_sel)
    assert row["recall_selection"] == pytest.approx(r_sel)
    assert row["f1_selection"] == pytest.approx(2 * p_sel * r_sel / (p_sel + r_sel))

    row = labels[f"{SITE}.0.{BIGRAM_CODE}"]
    assert row["label"] == "9 → 2" and row["kind"] == "bigram"
    assert (row["precision"], row["recall"]) == pytest.approx(
        held_out(codes == BIGRAM_CODE, data["bigram"], test)) == (1.0, 1.0)

    assert f"{SITE}.0.{ONCE_CODE}" not in labels  # one firing: below min_count
    for name, row in labels.items():  # the random codes get weak labels
        if name not in (f"{SITE}.0.{TOKEN_CODE}", f"{SITE}.0.{BIGRAM_CODE}"):
            assert row["f1_selection"] < 0.3, (name, row)
    assert set(labels) == {f"{SITE}.0.{c}" for c in range(NUM_CODES) if c != ONCE_CODE}


def test_choose_labels_candidates_and_min_count():
    meta = fsm_meta(4, 1)
    rows = [  # (site, group, code, kind, a, b, half, count)
        ("", -1, -1, "token", 1, -1, "sel", 10), ("", -1, -1, "token", 1, -1, "test", 10),
        ("", -1, -1, "token", 2, -1, "sel", 4), ("", -1, -1, "token", 2, -1, "test", 4),
        (SITE, 0, 0, "code", -1, -1, "sel", 4), (SITE, 0, 0, "code", -1, -1, "test", 5),
        (SITE, 0, 0, "token", 1, -1, "sel", 2), (SITE, 0, 0, "token", 2, -1, "sel", 2),
        (SITE, 0, 0, "token", 2, -1, "test", 3),
        (SITE, 0, 1, "code", -1, -1, "sel", 1), (SITE, 0, 1, "token", 1, -1, "sel", 1),
    ]
    counts = pa.Table.from_pylist([dict(zip(COUNT_SCHEMA.names, r, strict=True)) for r in rows],
                                  schema=COUNT_SCHEMA)
    out = choose_labels(counts, meta, str, [], top_candidates=5, min_count=2).to_pylist()
    assert len(out) == 1  # code 1: one joint firing, below min_count
    (row,) = out
    assert row["label"] == "token 2"  # recall 2/4 beats 2/10 at the same precision
    assert row["precision"] == pytest.approx(3 / 5) and row["recall"] == pytest.approx(3 / 4)
    assert row["count"] == 9
    # top_candidates=1 keeps only the first of the tied tokens (by id): never right on test
    (row,) = choose_labels(counts, meta, str, [], top_candidates=1).to_pylist()
    assert row["label"] == "token 1" and (row["precision"], row["recall"]) == (0.0, 0.0)
    # a code that never fires on the test half, a label that never holds there: nulls
    rows = [r for r in rows if r[6] == "sel"]
    counts = pa.Table.from_pylist([dict(zip(COUNT_SCHEMA.names, r, strict=True)) for r in rows],
                                  schema=COUNT_SCHEMA)
    (row,) = choose_labels(counts, meta, str, []).to_pylist()
    assert row["label"] == "token 2" and row["precision"] is None and row["recall"] is None
    assert choose_labels(counts, meta, str, [], min_count=3).num_rows == 0


# ---------------------------------------------------------------------- a store with text
DIGIT_CODE, WORD_CODE = 1, 2


@pytest.fixture(scope="module")
def text_store(tmp_path_factory):
    """A text store from a real corpus and BPE tokenizer (no model): code 1 fires on every
    token with a digit, code 2 on the most frequent token without one, others random."""
    from corpus_helpers import make_corpus, save_bpe_tokenizer

    from codebook.corpus import Corpus, describe_corpus, read_documents

    root = tmp_path_factory.mktemp("text")
    make_corpus(root / "corpus", n_docs=24, seed=3)
    source = describe_corpus(Corpus("text", paths=[str(root / "corpus")]))
    texts = read_documents(source, 0, source["num_documents"])
    tok = save_bpe_tokenizer(texts, root / "tok", vocab_size=400)
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    meta = StoreMeta(model="m", tokenizer=str(root / "tok"), source=source,
                     sites={SITE: SiteInfo(groups=1, k=1, num_codes=8, dim=8)}, block_size=64,
                     num_shards=2, num_documents=len(texts))
    docs, pos = doc_rows(np.asarray([len(x) for x in ids]))
    tokens = np.concatenate([np.asarray(x) for x in ids])
    pieces = {t: tok.decode([t]) for t in np.unique(tokens).tolist()}
    digit = np.asarray([any(ch.isdigit() for ch in pieces[t]) for t in tokens.tolist()])
    counts = Counter(t for t, d in zip(tokens.tolist(), digit, strict=True) if not d)
    word = counts.most_common(1)[0][0]
    rng = np.random.default_rng(0)
    codes = rng.choice([0, *range(3, 8)], len(tokens))
    codes[digit] = DIGIT_CODE
    codes[tokens == word] = WORD_CODE
    store = CodeStore.create(root / "store", meta)
    for shard, (lo, hi) in enumerate(((0, 12), (12, 24))):
        rows = (docs >= lo) & (docs < hi)
        store.write_shard(shard, token_table(docs[rows], pos[rows], tokens[rows],
                                             {SITE: codes[rows]}, meta))
    return store, {"docs": docs, "tokens": tokens, "codes": codes, "digit": digit,
                   "word": word, "piece": pieces[word]}


def test_text_store_regex_and_quoted_token_labels(text_store):
    store, data = text_store
    build_labels(store, progress=False)
    labels = read_labels(store)
    test = DocumentSplit(24, seed=0).is_test[data["docs"]]
    row = labels[f"{SITE}.0.{DIGIT_CODE}"]
    assert row["label"] == "regex:digits" and row["kind"] == "regex"
    assert (row["precision"], row["recall"]) == pytest.approx(
        held_out(data["codes"] == DIGIT_CODE, data["digit"], test)) == (1.0, 1.0)
    row = labels[f"{SITE}.0.{WORD_CODE}"]
    assert row["label"] == f"token {json.dumps(data['piece'], ensure_ascii=False)}"
    assert row["label"].startswith('token "') and row["kind"] == "token"
    assert (row["precision"], row["recall"]) == (1.0, 1.0)
    # no regexes at all: the digit code falls back to a token or bigram label
    build_labels(store, features=[], progress=False)
    assert read_labels(store)[f"{SITE}.0.{DIGIT_CODE}"]["kind"] in ("token", "bigram")


# ---------------------------------------------------------------------- the Ray driver
@pytest.mark.slow
def test_ray_driver_and_label_pipeline_write_the_same_labels(tmp_path):
    import json
    import subprocess
    import sys

    import ray
    from train_helpers import REPO

    from codebook.ray_glue.labels import count_rows

    store, _ = planted_store(tmp_path / "store", seed=1)
    local = build_labels(store, progress=False, top_candidates=3)
    local_file = pq.read_table(store.root / LABELS_FILE)
    (store.root / LABELS_FILE).unlink()
    job = prepare_labels(store, top_candidates=3)
    counter = ShardCounter(job)
    local_counts = merge_counts([counter(p) for p in store.shard_files()])
    from codebook.ray_glue.session import init_local

    init_local(num_cpus=1, include_dashboard=False)
    try:
        assert as_counter(count_rows(store, job)) == as_counter(local_counts)
    finally:
        ray.shutdown()
    # the command line: its own local Ray, build_labels_ray, the same file as the local driver
    done = subprocess.run([sys.executable, "pipelines/label.py", "--store", str(store.root),
                           "--top-candidates", "3"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["labels"] == local.num_rows == NUM_CODES - 1
    assert pq.read_table(store.root / LABELS_FILE).equals(local_file, check_metadata=True)


def test_label_pipeline_rejects_bad_input_before_ray(tmp_path):
    import subprocess
    import sys

    from train_helpers import REPO

    cmd = [sys.executable, "pipelines/label.py", "--store", str(tmp_path / "nowhere")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "not a code store" in done.stderr
    store, _ = planted_store(tmp_path / "store", seed=3)
    done = subprocess.run([*cmd[:3], str(store.root), "--min-count", "0"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "must be >= 1" in done.stderr
    assert "Started a local Ray" not in done.stdout + done.stderr


def test_local_driver_merges_in_steps_to_the_same_labels(tmp_path, monkeypatch):
    import codebook.store.autolabel as autolabel

    store, _ = planted_store(tmp_path / "store", seed=2)
    once = build_labels(store, progress=False)
    monkeypatch.setattr(autolabel, "MERGE_ROWS", 1)  # merge after every shard
    assert build_labels(store, progress=False).equals(once, check_metadata=True)
