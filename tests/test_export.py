"""Exports of a code store: Neuronpedia-style feature JSON (checked by its JSON Schema), the
static dashboard in a real headless Chromium from a file:// URL, the HF dataset card, the CLI."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpus_helpers import text_model_store, wait_for
from train_helpers import REPO

from codebook.resolve import load_trained_model
from codebook.store.code_page import code_page
from codebook.store.export import (
    dashboard_html,
    export_codes,
    feature_schema,
    neuronpedia_feature,
    publish_dataset,
)
from codebook.store.search import CodeRef, StoreSearch

EVIL = "</script><script>window.pwned=1</script><!--"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    store = text_model_store(root, scores=True)
    search = StoreSearch(store)
    model = load_trained_model(str(root / "model"))
    # the two most used codes of mlp_1 and the most used of attn_heads_0
    mlp = np.argsort(-search.usage("mlp_1")[0], kind="stable")[:2]
    heads = search.usage("attn_heads_0")
    g, c = np.unravel_index(np.argmax(heads), heads.shape)
    codes = [f"mlp_1.0.{mlp[0]}", f"mlp_1.0.{mlp[1]}", f"attn_heads_0.{g}.{c}"]
    labels = {codes[0]: {"label": "token ' and'", "kind": "token", "precision": 0.75,
                         "recall": 0.5, "count": 10},
              codes[2]: {"label": "<img src=x onerror=window.pwned=2>", "kind": "regex",
                         "precision": None, "recall": None}}
    out = root / "out"
    summary = export_codes(search, codes, out, model=model, labels=labels,
                           model_id="tiny-neox", source="codebook-test")
    pages = {c: code_page(search, CodeRef.parse(c), None, model, labels) for c in codes}
    yield {"root": root, "store": store, "search": search, "codes": codes, "out": out,
           "summary": summary, "pages": pages, "labels": labels}


def validator():
    from jsonschema import Draft202012Validator

    schema = feature_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


# ---------------------------------------------------------------------- feature JSON
def test_feature_json_validates_and_matches_the_code_page(exported):
    v = validator()
    assert exported["summary"]["codes"] == 3 and exported["summary"]["files"] == 4
    assert exported["summary"]["logit_lens"] is True
    for code in exported["codes"]:
        feat = json.loads((exported["out"] / "features" / f"{code}.json").read_text())
        v.validate(feat)
        page = exported["pages"][code]
        ref = CodeRef.parse(code)
        assert feat == neuronpedia_feature(page, "tiny-neox", "codebook-test")
        assert (feat["modelId"], feat["layer"], feat["index"]) == (
            "tiny-neox", ref.site, f"{ref.group}.{ref.code}")
        assert feat["codebook"]["code"] == code
        assert feat["frac_nonzero"] == pytest.approx(page["count"] / page["tokens"])
        # the top activation: the code's best score, on its firing token
        top, best = feat["activations"][0], page["examples"][0]
        assert top["maxValue"] == best["score"] == feat["maxActApprox"]
        assert best["score"] == max(s for s in exported["search"].query.firings(
            ref.site, ref.group, ref.code)["score"].round(4))
        assert top["tokens"] == best["tokens"] and top["maxValueTokenIndex"] == best["highlight"]
        n_quantile = sum(len(q["examples"]) for q in page["quantiles"])
        assert len(feat["activations"]) == len(page["examples"]) + n_quantile > 0
        for act, ex in zip(feat["activations"], page["examples"], strict=False):
            assert len(act["values"]) == len(act["tokens"])
            assert act["values"][ex["highlight"]] == ex["score"]
            assert act["values"] == [a or 0.0 for a in ex["acts"]]  # 0 where it does not fire
            assert act["maxValue"] == max(act["values"]) and act["dataIndex"] == str(ex["doc_id"])
        banded = feat["activations"][len(page["examples"]):]
        assert banded[0]["binMin"] == page["quantiles"][0]["low"]
        assert banded[0]["binContains"] == pytest.approx(
            page["quantiles"][0]["firings"] / page["count"])
        # the logit lens and the score histogram
        lens = page["logit_lens"]
        assert feat["pos_str"] == [r["token"] for r in lens["positive"]] and feat["pos_str"]
        assert feat["pos_values"] == [r["logit"] for r in lens["positive"]]
        assert feat["neg_str"] == [r["token"] for r in lens["negative"]]
        hist = page["density"]["histogram"]
        assert feat["freq_hist_data_bar_heights"] == hist["heights"]
        assert sum(feat["freq_hist_data_bar_heights"]) == page["count"]
        edges = hist["edges"]
        assert feat["freq_hist_data_bar_values"] == pytest.approx(
            [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)])
        assert feat["codebook"]["cooccurring"] == page["cooccurring"]
        assert feat["codebook"]["top_tokens"] == page["top_tokens"]
    first = json.loads((exported["out"] / "features" / f"{exported['codes'][0]}.json")
                       .read_text())
    (expl,) = first["explanations"]
    assert expl["description"] == "token ' and'" and expl["scoreV1"] == 0.75
    assert expl["typeName"] == expl["explanationModelName"] == "codebook-autolabel"
    assert first["codebook"]["label"] == {"label": "token ' and'", "kind": "token",
                                          "precision": 0.75, "recall": 0.5}
    second = json.loads((exported["out"] / "features" / f"{exported['codes'][1]}.json")
                        .read_text())
    assert second["explanations"] == [] and second["codebook"]["label"] is None


def test_schema_rejects_broken_features(exported):
    from jsonschema import ValidationError

    v = validator()
    good = neuronpedia_feature(exported["pages"][exported["codes"][0]], "m", "s")
    v.validate(good)
    broken = []
    for change in (lambda f: f.pop("activations"),
                   lambda f: f.update(frac_nonzero="0.1"),
                   lambda f: f.update(index=7),
                   lambda f: f["activations"][0]["values"].__setitem__(0, "high"),
                   lambda f: f["activations"][0].pop("maxValueTokenIndex"),
                   lambda f: f["explanations"][0].update(scoreV1=None),
                   lambda f: f.update(unexpected=1),
                   lambda f: f["codebook"].pop("cooccurring")):
        feat = copy.deepcopy(good)
        change(feat)
        broken.append(feat)
    for feat in broken:
        with pytest.raises(ValidationError):
            v.validate(feat)

    # a store without scores: no histogram, binary values on the firing token, still valid
    page = copy.deepcopy(exported["pages"][exported["codes"][1]])
    page.update(has_scores=False, quantiles=[], logit_lens=None)
    page["density"]["histogram"] = None
    for ex in page["examples"]:
        ex["score"], ex["acts"] = None, [None] * len(ex["tokens"])
    feat = neuronpedia_feature(page, "m", "s")
    v.validate(feat)
    act = feat["activations"][0]
    assert act["values"][act["qualifyingTokenIndex"]] == 1.0 == sum(act["values"])
    assert feat["pos_str"] == [] and feat["freq_hist_data_bar_heights"] == []


# ---------------------------------------------------------------------- the dashboard
def test_static_dashboard_opens_from_a_file_url(exported, browser):
    from selenium.webdriver.common.by import By

    codes, pages = exported["codes"], exported["pages"]
    browser.get((exported["out"] / "dashboard.html").as_uri())
    h1 = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#page h1"))
    assert h1[0].text == codes[0]
    page = pages[codes[0]]
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.example")
    assert len(rows) == len(page["examples"]) + sum(len(q["examples"])
                                                    for q in page["quantiles"])
    assert rows[0].find_element(By.TAG_NAME, "mark").text.strip() == \
        page["examples"][0]["tokens"][page["examples"][0]["highlight"]].strip()
    lens = browser.find_elements(By.CSS_SELECTOR, "#logit-lens tbody tr")
    assert len(lens) == len(page["logit_lens"]["positive"])
    assert browser.find_elements(By.CSS_SELECTOR, "svg#histogram rect.bar")
    assert "token ' and'" in browser.find_element(By.ID, "label").text
    # the list: every code with its label (as text), then a click renders another code
    items = browser.find_elements(By.CSS_SELECTOR, "#codes li")
    assert [i.find_element(By.TAG_NAME, "a").text for i in items] == codes
    assert "<img src=x onerror=window.pwned=2>" in items[2].text
    items[1].find_element(By.TAG_NAME, "a").click()
    wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "#page h1").text == codes[1])
    assert browser.execute_script("return location.hash") == f"#code={codes[1]}"
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr.example")) == len(
        pages[codes[1]]["examples"]) + sum(len(q["examples"]) for q in pages[codes[1]][
            "quantiles"])
    # a hash link straight to a code, and one to a code that is not in the export
    browser.get((exported["out"] / "dashboard.html").as_uri() + f"#code={codes[2]}")
    wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "#page h1").text == codes[2])
    browser.execute_script("location.hash = '#code=mlp_0.0.1'")
    wait_for(lambda: "not in this export" in browser.find_element(By.ID, "page").text)
    assert browser.execute_script("return window.pwned === undefined")


class _Scripts(HTMLParser):
    def __init__(self):
        super().__init__()
        self.scripts: list[tuple[dict, str]] = []
        self._open: dict | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self._open = dict(attrs)
            self.scripts.append((self._open, ""))

    def handle_data(self, data):
        if self._open is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)

    def handle_endtag(self, tag):
        if tag == "script":
            self._open = None


def test_script_text_in_tokens_cannot_break_the_page(exported, browser, tmp_path):
    from selenium.webdriver.common.by import By

    page = copy.deepcopy(exported["pages"][exported["codes"][0]])
    ex = page["examples"][0]
    ex["tokens"][ex["highlight"]] = EVIL
    page["top_tokens"][0]["token"] = EVIL
    page["label"] = {"label": EVIL, "kind": "token", "precision": 1.0, "recall": 1.0}
    text = dashboard_html([page], title=f"title {EVIL}")
    parser = _Scripts()
    parser.feed(text)
    assert [a.get("id") for a, _ in parser.scripts] == ["pages", None, None]
    data = json.loads(parser.scripts[0][1])
    assert data["pages"][0]["examples"][0]["tokens"][ex["highlight"]] == EVIL
    assert text.count("</script>") == 3 and "<!--" not in text

    path = tmp_path / "evil.html"
    path.write_text(text, encoding="utf-8")
    browser.get(path.as_uri())
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#page h1"))
    mark = browser.find_element(By.CSS_SELECTOR, "tr.example mark")
    assert mark.get_attribute("textContent") == EVIL
    assert EVIL in browser.find_element(By.ID, "label").get_attribute("textContent")
    assert browser.execute_script("return window.pwned === undefined")
    assert browser.title == f"code {page['code']}"


# ---------------------------------------------------------------------- HF dataset
def test_publish_dataset_loads_with_datasets(exported, tmp_path, monkeypatch):
    import yaml

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    store = exported["store"]
    # a copy of the store with labels, published in place
    root = tmp_path / "store"
    shutil.copytree(store.root, root)
    labels = pa.table({"site": ["mlp_1"], "group": pa.array([0], pa.int32()),
                       "code": pa.array([1], pa.int64()), "label": ["token ' and'"],
                       "kind": ["token"], "precision": [0.5], "recall": [0.25]})
    pq.write_table(labels, root / "labels.parquet")
    assert publish_dataset(root) == root
    card = (root / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert [c["config_name"] for c in front["configs"]] == ["tokens", "code_stats", "labels"]
    assert "codes.mlp_1" in card and "scores.mlp_1" in card

    rows = sum(pq.read_metadata(p).num_rows for p in store.shard_files())
    cache = tmp_path / "hf-cache"
    tokens = datasets.load_dataset(str(root), "tokens", split="train", cache_dir=str(cache))
    assert tokens.num_rows == rows
    assert {"doc_id", "position", "token_id", "codes.mlp_1"} <= set(tokens.column_names)
    first = pq.read_table(store.shard_files()[0]).slice(0, 1).to_pylist()[0]
    assert tokens[0]["doc_id"] == first["doc_id"] and tokens[0]["token_id"] == first["token_id"]
    stats = datasets.load_dataset(str(root), "code_stats", split="train", cache_dir=str(cache))
    assert stats.num_rows == store.code_stats().num_rows
    got = datasets.load_dataset(str(root), "labels", split="train", cache_dir=str(cache))
    assert got[0]["label"] == "token ' and'"

    # or a copy of the Parquet files elsewhere, the store untouched
    out = publish_dataset(store, tmp_path / "dataset")
    assert not (store.root / "README.md").exists() and (out / "store.json").is_file()
    again = datasets.load_dataset(str(out), "tokens", split="train", cache_dir=str(cache))
    assert again.num_rows == rows
    with pytest.raises(ValueError):
        datasets.load_dataset(str(out), "labels", split="train", cache_dir=str(cache))


# ---------------------------------------------------------------------- the CLI
def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "pipelines" / "export.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_exports_codes_and_refuses_unknown_ones(exported, tmp_path):
    store, codes = str(exported["store"].root), exported["codes"][:2]
    proc = run_cli("--store", store, "--codes", *codes, "--out", str(tmp_path / "out"),
                   "--model", str(exported["root"] / "model"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["codes"] == 2 and summary["files"] == 3 and summary["logit_lens"] is True
    assert sorted(p.stem for p in (tmp_path / "out" / "features").glob("*.json")) == sorted(codes)
    assert (tmp_path / "out" / "dashboard.html").is_file()

    proc = run_cli("--store", store, "--codes", codes[0], "mlp_1.0.99999", "--out",
                   str(tmp_path / "bad"))
    assert proc.returncode != 0
    assert "config error: code: code id 99999 out of range for mlp_1" in proc.stderr
    assert not (tmp_path / "bad").exists()  # refused before any work
