"""The code browser: in a real headless Chromium (Selenium + the Debian chromium/chromedriver),
and its safe defaults over HTTP against a real uvicorn server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest
from corpus_helpers import text_model_store, wait_for
from train_helpers import REPO

from codebook.browser import create_app
from codebook.browser.serve import serving
from codebook.data.text import load_tokenizer
from codebook.resolve import load_trained_model
from codebook.steering import generate
from codebook.store.search import CodeRef, StoreSearch

MONTHS = r"\b(January|February|March|April|May|June|July)\b"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    store = text_model_store(root)
    with serving(create_app(store.root)) as url:
        yield {"url": url, "store": store, "root": root}


def test_regex_search_then_code_contexts_and_steering(served, browser):
    from selenium.webdriver.common.by import By

    search = StoreSearch(served["store"])
    browser.get(served["url"])
    wait_for(lambda: "documents" in browser.find_element(By.ID, "meta").text)
    sites = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#site option")]
    assert sites == ["all sites", *served["store"].meta.sites]

    # type a regex and search: the table shows the library's ranking
    browser.find_element(By.ID, "query").send_keys(MONTHS)
    browser.find_element(By.ID, "search").click()
    links = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#results a.code"))
    expected = search.codes_for_regex(MONTHS, top=20)
    assert [a.text for a in links] == [r["code"] for r in expected]
    first_row = browser.find_elements(By.CSS_SELECTOR, "#results tbody tr td")
    assert first_row[2].text == f"{expected[0]['precision']:.3f}"  # after code, label

    # open the top code: contexts with the firing token highlighted, its regex precision
    links[0].click()
    marks = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#contexts mark"))
    contexts = search.contexts(CodeRef.parse(expected[0]["code"]), n=20)
    assert len(marks) == len(contexts)
    fired = [c["tokens"][c["highlight"]].strip() for c in contexts]
    assert [m.text.strip() for m in marks] == fired
    assert f"precision {expected[0]['precision']:.3f}" in browser.find_element(
        By.ID, "code-stats").text

    # steering panel: the chosen code is pre-filled; baseline vs steered greedy text
    browser.find_element(By.ID, "prompt").send_keys("the king went")
    browser.find_element(By.ID, "steer").click()
    wait_for(lambda: browser.find_element(By.ID, "steered").text not in ("", "..."))
    model = load_trained_model(str(served["root"] / "model"))
    tok = load_tokenizer(str(served["root"] / "model"))
    ref = CodeRef.parse(expected[0]["code"])
    kwargs = {"max_new_tokens": 20, "do_sample": False}
    want = generate(model, tok, ["the king went"], codes=[
        {"site": ref.site, "group": ref.group, "code": ref.code}], **kwargs)[0]["text"]
    assert browser.find_element(By.ID, "steered").text == want.strip()
    base = generate(model, tok, ["the king went"], **kwargs)[0]["text"]
    assert browser.find_element(By.ID, "baseline").text == base.strip()


def test_token_search_usage_and_errors_are_shown(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(served["url"])
    wait_for(lambda: "documents" in browser.find_element(By.ID, "meta").text)
    Select(browser.find_element(By.ID, "mode")).select_by_value("token")
    Select(browser.find_element(By.ID, "site")).select_by_value("mlp_1")
    browser.find_element(By.ID, "query").send_keys(" May")
    browser.find_element(By.ID, "search").click()
    links = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#results a.code"))
    expected = StoreSearch(served["store"]).codes_for_token(" May", ["mlp_1"])
    assert [a.text for a in links] == [r["code"] for r in expected]
    usage = wait_for(lambda: browser.find_element(By.ID, "usage").text)
    assert "codes used" in usage and "never fired" in usage
    # a broken regex: the API's message is shown, nothing crashes
    Select(browser.find_element(By.ID, "mode")).select_by_value("regex")
    box = browser.find_element(By.ID, "query")
    box.clear()
    box.send_keys("(unclosed")
    browser.find_element(By.ID, "search").click()
    err = wait_for(lambda: browser.find_element(By.ID, "search-error").text)
    assert "invalid regex" in err
    # steering with a code id out of range
    codes = browser.find_element(By.ID, "steer-codes")
    codes.clear()
    codes.send_keys("mlp_1.0.99999")
    browser.find_element(By.ID, "steer").click()
    err = wait_for(lambda: browser.find_element(By.ID, "steer-error").text)
    assert "out of range" in err


# ---------------------------------------------------------------------- safe by default
def call(url: str, path: str, body: Any = None, host: str | None = None,
         raw: bytes | None = None) -> tuple[int, Any]:
    """(status, JSON or text) of a GET, or of a POST when ``body``/``raw`` is given."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if host is not None:
        headers["Host"] = host
    req = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=300) as res:
            status, payload = res.status, res.read()
    except urllib.error.HTTPError as err:
        status, payload = err.code, err.read()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode()


STEER_REQUESTS = [
    ("the king went", ["mlp_1.0.42"]),
    ("in May the", ["attn_heads_0.1.7", "mlp_0.0.3"]),
    ("square feet of", ["mlp_0.0.100"]),
    ("the king went", ["attn_heads_1.2.250"]),
    ("\"quoted\" words", ["mlp_1.0.5", "mlp_1.0.6", "attn_heads_1.0.9"]),
    ("1999 and 2004", ["attn_heads_0.3.9"]),
]


def test_concurrent_steering_requests_answer_as_if_made_alone(served):
    def steer(prompt: str, codes: list[str]) -> dict:
        status, body = call(served["url"], "/api/steer",
                            {"prompt": prompt, "codes": codes, "max_new_tokens": 40})
        assert status == 200, body
        return body

    alone = [steer(*r) for r in STEER_REQUESTS]
    # the codes change the text, so a request steered by another's codes would show
    assert sum(a["steered"] != a["baseline"] for a in alone) >= len(alone) // 2, alone
    assert len({a["baseline"] for a in alone}) > 1  # different prompts, different baselines

    def run(i: int, start: threading.Barrier, got: list[Any]) -> None:
        start.wait()  # all requests at once
        got[i] = steer(*STEER_REQUESTS[i])

    for _ in range(3):
        got: list[Any] = [None] * len(STEER_REQUESTS)
        start = threading.Barrier(len(STEER_REQUESTS))
        threads = [threading.Thread(target=run, args=(i, start, got))
                   for i in range(len(STEER_REQUESTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert got == alone


def test_parameters_over_their_caps_answer_400_naming_the_cap(served):
    from codebook.browser import limits as browser

    url, code = served["url"], "mlp_1.0.42"
    over = [
        (f"/api/search/regex?q=May&top={browser.MAX_TOP + 1}", "top"),
        ("/api/search/regex?q=May&min_recall=1.5", "min_recall"),
        (f"/api/search/regex?q={'a' * (browser.MAX_QUERY_CHARS + 1)}", "regex"),
        (f"/api/search/token?q=%20May&top={browser.MAX_TOP + 1}", "top"),
        (f"/api/search/token?q={'a' * (browser.MAX_QUERY_CHARS + 1)}", "q"),
        (f"/api/code/{code}?n={browser.MAX_CONTEXTS + 1}", "n"),
        (f"/api/usage/mlp_1?bins={browser.MAX_BINS + 1}", "bins"),
        ("/api/usage/mlp_1?bins=0", "bins"),
    ]
    for path, name in over:
        status, body = call(url, path)
        assert status == 400, (path, status, body)
        assert body["detail"].startswith(f"{name}: ") and "Fix:" in body["detail"], body
    steer = {"prompt": "the king", "codes": [code], "max_new_tokens": 20}
    for change, name in [({"prompt": "x" * (browser.MAX_PROMPT_CHARS + 1)}, "prompt"),
                         ({"max_new_tokens": browser.MAX_NEW_TOKENS + 1}, "max_new_tokens"),
                         ({"max_new_tokens": 0}, "max_new_tokens"),
                         ({"codes": [code] * (browser.MAX_STEER_CODES + 1)}, "codes")]:
        status, body = call(url, "/api/steer", {**steer, **change})
        assert status == 400 and body["detail"].startswith(f"{name}: "), (change, body)
    status, body = call(url, "/api/steer", raw=b" " * (browser.MAX_BODY_BYTES + 1))
    assert status == 413 and "cap" in body["detail"], body
    # at the caps themselves the requests are served
    assert call(url, f"/api/search/token?q=%20May&top={browser.MAX_TOP}")[0] == 200
    assert call(url, f"/api/usage/mlp_1?bins={browser.MAX_BINS}")[0] == 200
    status, body = call(url, "/api/steer", {**steer, "max_new_tokens": 1})
    assert status == 200 and body["codes"] == [code]


def test_a_foreign_host_header_is_refused(served):
    url = served["url"]
    port = url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", "10.1.2.3"):
        status, body = call(url, "/api/meta", host=host)
        assert status == 400 and "Invalid host header" in body, (host, status, body)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
        assert call(url, "/api/meta", host=host)[0] == 200, host
    # more names on request (pipelines/browse.py --allowed-hosts)
    app = create_app(served["store"].root, allowed_hosts=["browser.example.org"])
    with serving(app) as other:
        assert call(other, "/api/meta", host="browser.example.org")[0] == 200
        assert call(other, "/api/meta", host=f"127.0.0.1:{other.rsplit(':', 1)[1]}")[0] == 200
        assert call(other, "/api/meta", host="evil.example")[0] == 400


def test_browse_cli_allowed_hosts_flag(served):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(REPO / "pipelines" / "browse.py"), "--store",
                             str(served["store"].root), "--port", str(port), "--allowed-hosts",
                             "browser.example.org"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                status, _ = call(url, "/api/meta")
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
                time.sleep(0.3)
        assert status == 200
        assert call(url, "/api/meta", host="browser.example.org")[0] == 200
        assert call(url, "/api/meta", host="evil.example")[0] == 400
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_exponential_regexes_are_refused_quickly(served):
    from codebook.analysis.features import DEFAULT_FEATURES
    from codebook.browser.limits import check_regex

    for pattern in (r"(a+)+$", r"(\w+\s?)*x", r"(a|aa)*b", r"(.*)*y", r"(?:x|xy)+y"):
        began = time.time()
        status, body = call(served["url"], "/api/search/regex?" + urllib.parse.urlencode(
            {"q": pattern}))
        assert status == 400 and "exponential" in body["detail"], (pattern, body)
        assert time.time() - began < 5
        status, body = call(served["url"], "/api/code/mlp_1.0.42?" + urllib.parse.urlencode(
            {"regex": pattern}))
        assert status == 400 and "exponential" in body["detail"], (pattern, body)
    # the project's own features and the usual safe forms stay allowed
    for pattern in [f.regex for f in DEFAULT_FEATURES] + [MONTHS, r"(\d++\.)+", r"(?:ab|cd)+"]:
        check_regex(pattern)


def test_regex_scans_stop_at_their_budget_and_say_the_result_is_partial(served):
    from codebook.browser.bounded_search import BoundedStoreSearch
    from codebook.browser.limits import Limits

    store = served["store"]
    full = StoreSearch(store).codes_for_regex(MONTHS, top=50)
    search = BoundedStoreSearch(store)
    with search.budget(Limits()) as scan:  # within budget: the same answer as unbounded
        assert search.codes_for_regex(MONTHS, top=50) == full
    assert not scan.partial and scan.documents == store.meta.num_documents

    with search.budget(Limits(regex_max_chars=1500)) as scan:  # text budget: a few documents
        some = search.codes_for_regex(MONTHS, top=50)
    report = scan.report(store.meta.num_documents)
    assert report["partial"] and 0 < report["scanned_documents"] < store.meta.num_documents
    assert "text budget" in report["note"] and "partial result" in report["note"]
    assert some != full and sum(r["positives"] for r in some[:1]) < full[0]["positives"]

    with search.budget(Limits(regex_max_doc_chars=1)) as scan:  # every document too long
        assert search.codes_for_regex(MONTHS) == []
    assert scan.documents == 0 and "skipped documents over 1 characters" in scan.notes

    # over HTTP, with a time budget already spent: stops before the first document
    with serving(create_app(store.root, limits=Limits(regex_seconds=0.0))) as url:
        began = time.time()
        status, body = call(url, "/api/search/regex?" + urllib.parse.urlencode({"q": MONTHS}))
        assert status == 200 and time.time() - began < 30
        assert body["partial"] and body["scanned_documents"] == 0 and body["results"] == []
        assert "time budget" in body["note"]
        status, body = call(url, "/api/code/mlp_1.0.42?" + urllib.parse.urlencode(
            {"regex": MONTHS}))
        assert status == 200 and body["partial"] and "time budget" in body["note"]


def test_token_search_on_a_store_without_tokenizer_answers_400_saying_what_to_do(tmp_path):
    """An FSM store has token ids and no tokenizer: a text query is a 400 naming the fix (as
    the regex search's), not a TypeError's 500; an id query still answers."""
    import numpy as np

    from codebook.errors import ConfigError
    from codebook.store import CodeStore, SiteInfo, StoreMeta, token_table

    meta = StoreMeta(model=str(tmp_path / "no-model"), tokenizer=None,
                     source={"kind": "fsm", "num_documents": 4},
                     sites={"mlp_0": SiteInfo(groups=1, k=1, num_codes=8, dim=4)},
                     block_size=16, num_shards=1, num_documents=4)
    store = CodeStore.create(tmp_path / "store", meta)
    docs, pos = np.repeat(np.arange(4), 5), np.tile(np.arange(5), 4)
    tokens = np.tile([3, 4, 3, 5, 6], 4)
    codes = (tokens == 3).astype(np.int64)[:, None, None] * 7  # code 7 fires on token 3 only
    store.write_shard(0, token_table(docs, pos, tokens, {"mlp_0": codes}, meta))
    store.finalize_stats()

    with pytest.raises(ConfigError, match="no tokenizer"):
        StoreSearch(store).codes_for_token("zzzzzz")
    with serving(create_app(store.root)) as url:
        status, body = call(url, "/api/search/token?q=zzzzzz")
        assert status == 400, (status, body)
        assert body["detail"].startswith("token: ") and "no tokenizer" in body["detail"]
        assert "Fix: search FSM stores by token id" in body["detail"], body
        status, regex = call(url, "/api/search/regex?q=zz")  # the regex search's answer
        assert status == 400 and "no tokenizer" in regex["detail"], regex
        status, body = call(url, "/api/search/token?q=3")
        assert status == 200, body
        assert body["results"][0] == {"code": "mlp_0.0.7", "count": 8, "recall": 1.0,
                                      "precision": 1.0, "label": None}
