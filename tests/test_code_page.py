"""Code pages: scores in the store, the page's contents checked against brute force over the
shards, old stores without scores, the HTTP API's caps, and the page in a real headless Chromium."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from corpus_helpers import build_store, text_model_store, wait_for

from codebook.browser import create_app
from codebook.browser.serve import serving
from codebook.resolve import load_trained_model
from codebook.store import codes_column, list_to_numpy, scores_column
from codebook.store.autolabel import build_labels, read_labels
from codebook.store.code_page import PageOptions, code_page
from codebook.store.search import CodeRef, StoreSearch

SITE = "mlp_1"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("codepage")
    store = text_model_store(root, n_docs=16, scores=True)
    build_labels(store)
    search = StoreSearch(store)
    usage = search.usage(SITE)
    ref = CodeRef(SITE, 0, int(np.argsort(-usage[0])[1]))  # a frequent code, not the top one
    return {"root": root, "store": store, "search": search, "ref": ref,
            "model": load_trained_model(str(root / "model"))}


def all_rows(store) -> pa.Table:
    return pa.concat_tables(list(store.iter_shards()))


def test_store_scores_are_each_firings_cosine_similarity(setup):
    from codebook.extraction import tokenise_documents
    from codebook.interventions import recording

    store, model = setup["store"], setup["model"]
    assert sorted(store.meta.score_sites) == sorted(store.meta.sites)
    table = all_rows(store)
    first = table.filter(pc.equal(table.column("doc_id"), 0))
    win = tokenise_documents([(setup["root"] / "corpus" / "doc000.txt").read_text()], 0,
                             StoreSearch(store).tokenizer, store.meta.block_size)
    n = int(win["length"][0])
    with torch.no_grad(), recording(model, [SITE], activations=True) as rec:
        model(input_ids=torch.as_tensor(win["input_ids"][:1, :n]).long())
    x = rec.activations[SITE][0].float()  # (n, dim): the MLP output the codebook quantised
    vectors = model.codebooks[SITE].codes.detach()[0]  # (num_codes, dim)
    codes = list_to_numpy(first.column(codes_column(SITE)))[:n].astype(np.int64)
    stored = list_to_numpy(first.column(scores_column(SITE)))[:n].astype(np.float32)
    expected = torch.nn.functional.cosine_similarity(
        x[:, None, :], vectors[torch.as_tensor(codes)], dim=-1).numpy()
    np.testing.assert_allclose(stored, expected, atol=2e-3)  # float16
    assert (np.diff(stored, axis=1) <= 1e-3).all()  # top-k order: best first


def test_code_page_matches_brute_force_over_the_shards(setup):
    search, ref, store = setup["search"], setup["ref"], setup["store"]
    page = code_page(search, ref, PageOptions(examples=5, quantiles=4, per_quantile=2),
                     setup["model"], read_labels(store))
    t = all_rows(store)
    info = store.meta.sites[SITE]
    codes = list_to_numpy(t.column(codes_column(SITE))).reshape(-1, info.groups, info.k)
    scores = list_to_numpy(t.column(scores_column(SITE))).reshape(-1, info.groups, info.k)
    hit = codes[:, ref.group, :] == ref.code
    fires = hit.any(1)
    score = scores[:, ref.group, :][hit].astype(np.float64)
    assert page["count"] == fires.sum() and page["tokens"] == t.num_rows
    assert page["frequency"] == pytest.approx(fires.sum() / t.num_rows)
    assert page["ranked_by"] == "score"
    got = [e["score"] for e in page["examples"]]
    assert got == sorted(got, reverse=True) and len(got) == 5
    assert got[0] == pytest.approx(score.max(), abs=1e-3)
    token_ids = t.column("token_id").to_numpy()
    for e in page["examples"]:  # the marked token is the firing token, its score beside it
        row = np.flatnonzero((t.column("doc_id").to_numpy() == e["doc_id"])
                             & (t.column("position").to_numpy() == e["position"]))[0]
        assert fires[row]
        assert e["tokens"][e["highlight"]] == search.piece(int(token_ids[row]))
        assert e["acts"][e["highlight"]] == pytest.approx(e["score"], abs=1e-3)
    bands = page["quantiles"]
    assert [b["band"] for b in bands] == ["75-100%", "50-75%", "25-50%", "0-25%"]
    assert sum(b["firings"] for b in bands) == fires.sum()
    for b in bands:
        assert all(b["low"] - 1e-6 <= e["score"] <= b["high"] + 1e-3 for e in b["examples"])
    hist = page["density"]["histogram"]
    assert sum(hist["heights"]) == fires.sum()
    assert hist["edges"][0] == pytest.approx(score.min(), abs=1e-4)
    # co-occurring codes: lift from a count over every row
    top = page["cooccurring"][0]
    other = CodeRef.parse(top["code"])
    oinfo = store.meta.sites[other.site]
    ocodes = list_to_numpy(t.column(codes_column(other.site))).reshape(-1, oinfo.groups,
                                                                       oinfo.k)
    ofires = (ocodes[:, other.group, :] == other.code).any(1)
    assert top["joint"] == (fires & ofires).sum()
    lift = ((fires & ofires).sum() / fires.sum()) / (ofires.sum() / t.num_rows)
    assert top["lift"] == pytest.approx(lift)
    assert all(a["lift"] >= b["lift"] for a, b in zip(page["cooccurring"],
                                                      page["cooccurring"][1:], strict=False))
    assert len(page["logit_lens"]["positive"]) == 10
    assert "unembedding" in page["logit_lens"]["method"]
    label = read_labels(store).get(ref.name)
    assert page["label"] == label and label is not None


def test_a_store_without_scores_still_opens_and_pages_in_store_order(setup, tmp_path):
    old = build_store(setup["root"] / "model", setup["root"] / "corpus", tmp_path / "old")
    meta = json.loads((old.root / "store.json").read_text())
    meta.pop("score_sites")  # as written before scores existed
    (old.root / "store.json").write_text(json.dumps(meta))
    search = StoreSearch(old.root)
    assert search.meta.score_sites == []
    page = code_page(search, setup["ref"], PageOptions(examples=4))
    assert page["has_scores"] is False and page["ranked_by"].startswith("store order")
    assert page["density"]["histogram"] is None and page["quantiles"] == []
    where = [(e["doc_id"], e["position"]) for e in page["examples"]]
    assert where == sorted(where) and all(e["score"] is None for e in page["examples"])
    assert page["count"] == setup["search"].usage(SITE)[0, setup["ref"].code]


@pytest.fixture(scope="module")
def served(setup):
    with serving(create_app(setup["store"].root)) as url:
        yield url


def get(url: str, host: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as err:
        return err.code, {"detail": err.read().decode()}


def test_page_api_caps_bad_codes_and_foreign_hosts(setup, served):
    name = setup["ref"].name
    status, body = get(f"{served}/api/page/{name}?examples=3")
    assert status == 200 and len(body["examples"]) == 3 and body["label"]["label"]
    status, body = get(f"{served}/api/page/{name}?examples=100000")
    assert status == 400 and "examples" in body["detail"]
    status, body = get(f"{served}/api/page/{SITE}.0.99999")
    assert status == 400 and "out of range" in body["detail"]
    status, _ = get(f"{served}/api/page/{name}", host="evil.example.com")
    assert status == 400  # DNS-rebinding guard (TrustedHostMiddleware)
    status, body = get(f"{served}/api/search/token?q=1")
    labels = read_labels(setup["store"])
    assert status == 200 and all(r["label"] == (labels.get(r["code"]) or {}).get("label")
                                 for r in body["results"])


def test_code_page_in_chromium_shows_examples_lens_histogram_and_label(setup, served, browser):
    from selenium.webdriver.common.by import By

    ref = setup["ref"]
    _, page = get(f"{served}/api/page/{ref.name}")
    browser.get(f"{served}/code/{ref.name}")
    rows = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "table.examples tr.example"))
    assert len(rows) == len(page["examples"]) == 20
    score = rows[0].find_element(By.CSS_SELECTOR, "td").text
    assert score == f"{page['examples'][0]['score']:.4f}"
    marked = [r.find_element(By.CSS_SELECTOR, "mark").text.strip() for r in rows]
    assert marked == [e["tokens"][e["highlight"]].strip() for e in page["examples"]]
    lens = browser.find_elements(By.CSS_SELECTOR, "#logit-lens tbody tr")
    assert len(lens) == 10
    first = lens[0].find_elements(By.CSS_SELECTOR, "td")
    assert first[0].text == json.dumps(page["logit_lens"]["positive"][0]["token"])
    bars = browser.find_elements(By.CSS_SELECTOR, "#histogram rect")
    assert len(bars) == len(page["density"]["histogram"]["heights"])
    assert page["label"]["label"] in browser.find_element(By.ID, "label").text
    # a co-occurring code's link opens its own page
    link = browser.find_elements(By.CSS_SELECTOR, "#cooccurring a.code")[0]
    target = link.text
    link.click()
    wait_for(lambda: any(h.text == target for h in browser.find_elements(By.TAG_NAME, "h1")))
    assert browser.current_url.endswith(f"/code/{target}")


def test_concurrent_pages_on_one_search_agree_with_sequential_ones(setup):
    from concurrent.futures import ThreadPoolExecutor

    search = StoreSearch(setup["store"])  # one DuckDB database shared by the threads
    usage = search.usage(SITE)[0]
    refs = [CodeRef(SITE, 0, int(c)) for c in np.argsort(-usage)[:6]]
    options = PageOptions(examples=5)
    expected = [code_page(search, r, options) for r in refs]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda r: code_page(search, r, options), refs * 3))
    assert got == expected * 3
