"""The code browser in a real headless Chromium (Selenium + the Debian chromium/chromedriver)."""

from __future__ import annotations

import shutil
import socket
import threading
import time

import pytest
from corpus_helpers import build_store, make_corpus, save_bpe_tokenizer, save_tiny_codebook_model

from codebook.analysis.search import CodeRef, StoreSearch
from codebook.browser import create_app
from codebook.data.text import load_tokenizer
from codebook.extraction import load_extraction_model
from codebook.steering import generate

MONTHS = r"\b(January|February|March|April|May|June|July)\b"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import uvicorn

    root = tmp_path_factory.mktemp("browser")
    texts = make_corpus(root / "corpus", n_docs=12)
    tok = save_bpe_tokenizer(texts, root / "tok")
    save_tiny_codebook_model(root / "model", len(tok))
    tok.save_pretrained(str(root / "model"))
    store = build_store(root / "model", root / "corpus", root / "store")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(store.root), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield {"url": f"http://127.0.0.1:{port}", "store": store, "root": root}
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "install Debian chromium and chromium-driver (scripts/setup.sh)"
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    opts.binary_location = chromium
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver))
    drv.implicitly_wait(0)
    yield drv
    drv.quit()


def wait_for(fn, timeout: float = 20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting for the page")


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
    assert first_row[1].text == f"{expected[0]['precision']:.3f}"

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
    model = load_extraction_model(str(served["root"] / "model"))
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
