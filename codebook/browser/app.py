"""The code browser: a small FastAPI app over a code store (and its model, for steering).

    app = create_app("stores/shakespeare")        # then: uvicorn.run(app, host="127.0.0.1")

JSON API (the page in ``static/index.html`` uses it): ``/api/meta``, ``/api/search/regex``,
``/api/search/token``, ``/api/code/{site.group.code}``, ``/api/usage/{site}``, ``/api/steer``,
and ``/api/page/{site.group.code}`` behind each code's page, ``/code/{site.group.code}``
(``codebook.store.code_page``: ranked examples, quantiles, density, logit lens, co-occurring
codes, the automatic label). Search results carry each code's automatic label.
Bad input (unknown site, code out of range, a broken regex, a number over its cap) answers 400
with the message.

Safe by default: requests whose Host header is not an allowed host are refused (DNS
rebinding); the model runs one request at a time (steering attaches its codes to shared
layers); every size a request chooses has a cap (``MAX_*`` in ``codebook.browser.limits``); a
user regex is length-capped, refused if it can backtrack exponentially (a quantifier over a
quantifier or over overlapping alternatives; ``limits.check_regex``), and matched over the store
under a time and text budget (``bounded_search``), after which the result is partial and says
so.
"""

from __future__ import annotations

import ipaddress
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from codebook.browser.bounded_search import BoundedStoreSearch
from codebook.browser.limits import Limits, check_regex
from codebook.errors import ConfigError
from codebook.store.search import CodeRef

STATIC = Path(__file__).with_name("static")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


class SteerRequest(BaseModel):
    """Body of ``POST /api/steer``: codes named ``site.group.code``."""

    prompt: str
    codes: list[str]
    max_new_tokens: int = 20


# ------------------------------------------------------------------------- hosts
def default_allowed_hosts(host: str = "127.0.0.1") -> list[str]:
    """Loopback names plus ``host`` (the address the server binds), unless it is a wildcard."""
    hosts = list(LOOPBACK_HOSTS)
    if host and host not in ("0.0.0.0", "::", "*"):
        hosts.append(_host_pattern(host))
    return list(dict.fromkeys(hosts))


def _host_pattern(host: str) -> str:
    """A Host-header pattern for ``host``: lower case, IPv6 literals in brackets, no port."""
    host = host.strip().lower()
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            return f"[{host}]"
    except ValueError:
        pass
    ok = host == "*" or re.fullmatch(r"(\*\.)?[a-z0-9_\-.]+|\[[0-9a-f:.]+\]", host)
    if not ok:
        raise ConfigError("allowed_hosts", f"{host!r} is not a host name, an IP address or "
                          "*.domain", "give host names without scheme or port, e.g. "
                          "browser.example.org, 10.0.0.5 or *.example.org")
    return host


# ------------------------------------------------------------------------- the app
def create_app(store: str | Path, model_path: str | None = None, *, host: str = "127.0.0.1",
               allowed_hosts: Sequence[str] = (), limits: Limits | None = None) -> Any:
    """The FastAPI app for ``store``; ``model_path`` (default: the store's model) for steering.

    Requests must name a loopback host, ``host`` (where the server binds) or one of
    ``allowed_hosts`` (``"*"`` allows any) in their Host header; ``limits`` sets the caps.
    """
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    from codebook.store.autolabel import read_labels
    from codebook.store.code_page import PageOptions, code_page

    limits = limits or Limits()
    hosts = list(dict.fromkeys(default_allowed_hosts(host)
                               + [_host_pattern(h) for h in allowed_hosts]))
    search = BoundedStoreSearch(store)
    labels = read_labels(search.store)  # {} until pipelines/label.py has run
    state: dict[str, Any] = {}
    model_lock = threading.Lock()  # the model's codebook layers are shared state
    app = FastAPI(title="codebook browser")
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts, www_redirect=False)
    app.state.allowed_hosts = hosts

    @app.middleware("http")
    async def cap_body(request: Request, call_next):
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > limits.max_body_bytes:
            return JSONResponse(status_code=413, content={
                "detail": f"request body: {size} bytes, the cap is {limits.max_body_bytes}. "
                          "Fix: send a shorter prompt"})
        return await call_next(request)

    def guarded(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            raise HTTPException(status_code=400, detail=str(err)) from err

    def capped(name: str, value: int | float, high: int | float, low: int | float = 0) -> None:
        if not low <= value <= high:
            raise HTTPException(400, f"{name}: {value} is outside {low}..{high}. "
                                f"Fix: ask for {name} between {low} and {high}")

    def text_capped(name: str, value: str, high: int) -> None:
        if len(value) > high:
            raise HTTPException(400, f"{name}: {len(value)} characters, the cap is {high}. "
                                f"Fix: send a shorter {name}")

    def labelled(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for row in rows:
            lab = labels.get(row["code"])
            row["label"] = lab["label"] if lab else None
        return rows

    def load_model() -> tuple[Any, Any]:
        """The model and tokenizer, loaded once (under the model lock)."""
        if not model_lock.acquire(timeout=limits.model_wait_seconds):
            raise HTTPException(503, f"model: busy for {limits.model_wait_seconds:g} s. "
                                "Fix: retry later")
        try:
            if "model" not in state:
                from codebook.data.text import load_tokenizer
                from codebook.resolve import load_trained_model

                state["model"] = load_trained_model(model_path or search.meta.model)
                state["tokenizer"] = (load_tokenizer(search.meta.tokenizer)
                                      if search.meta.tokenizer else None)
            return state["model"], state["tokenizer"]
        finally:
            model_lock.release()

    def warm() -> None:
        """Open what the first page would: DuckDB's view, the code counts, the model (for the
        logit lens and steering; skipped with a note if it cannot load)."""
        search.query.num_tokens()
        for site in search.meta.sites:
            search.usage(site)
        try:
            load_model()
        except (ConfigError, OSError) as err:
            state["model_error"] = str(err)

    app.state.warm = warm
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/code/{name}")
    def code_html(name: str) -> FileResponse:
        return FileResponse(STATIC / "code.html")

    @app.get("/api/page/{name}")
    def page(name: str, examples: int = 20, window: int = 10) -> dict[str, Any]:
        capped("examples", examples, limits.max_contexts, low=1)
        capped("window", window, 64)
        ref = guarded(search.check, guarded(CodeRef.parse, name))
        try:
            model, _ = load_model()
        except (ConfigError, OSError) as err:  # the model moved: the page works without a lens
            model, state["model_error"] = None, str(err)
        out = guarded(code_page, search, ref, PageOptions(examples=examples, window=window),
                      model, labels)
        if model is None:
            out["logit_lens_error"] = state.get("model_error")
        return out

    @app.get("/api/meta")
    def meta() -> dict[str, Any]:
        m = search.meta
        return {"store": str(search.store.root), "model": m.model,
                "documents": m.num_documents, "source": m.source["kind"],
                "sites": {s: {"groups": i.groups, "k": i.k, "num_codes": i.num_codes}
                          for s, i in m.sites.items()},
                "text": m.tokenizer is not None}

    @app.get("/api/search/regex")
    def by_regex(q: str, site: str = "", min_recall: float = 0.0,
                 top: int = 20) -> dict[str, Any]:
        capped("top", top, limits.max_top)
        capped("min_recall", min_recall, 1.0)
        guarded(check_regex, q, limits.max_query_chars)
        with search.budget(limits) as scan:
            rows = guarded(search.codes_for_regex, q, [site] if site else None, min_recall, top)
        return {"results": labelled(rows), **scan.report(search.meta.num_documents)}

    @app.get("/api/search/token")
    def by_token(q: str, site: str = "", top: int = 20) -> dict[str, Any]:
        capped("top", top, limits.max_top)
        text_capped("q", q, limits.max_query_chars)
        rows = guarded(search.codes_for_token, q, [site] if site else None, top)
        return {"results": labelled(rows), "partial": False, "note": ""}

    @app.get("/api/code/{name}")
    def code(name: str, regex: str = "", n: int = 20) -> dict[str, Any]:
        capped("n", n, limits.max_contexts)
        ref = guarded(CodeRef.parse, name)
        if regex:
            guarded(check_regex, regex, limits.max_query_chars)
        with search.budget(limits) as scan:
            out = guarded(search.code_stats, ref, regex or None)
        if regex:
            out.update(scan.report(search.meta.num_documents))
        out["contexts"] = guarded(search.contexts, ref, n)
        try:
            out["similar"] = search.similar_codes(ref, 8)
        except ConfigError:  # the model folder moved: the rest still works
            out["similar"] = []
        return out

    @app.get("/api/usage/{site}")
    def usage(site: str, bins: int = 20) -> dict[str, Any]:
        capped("bins", bins, limits.max_bins, low=1)
        counts = guarded(search.usage, site).ravel()
        used = counts[counts > 0]
        hist, edges = np.histogram(np.log10(used), bins=bins) if used.size else ([], [])
        return {"site": site, "codes": int(counts.size), "used": int(used.size),
                "dead": int(counts.size - used.size),
                "log10_count_edges": [float(e) for e in edges],
                "histogram": [int(h) for h in hist]}

    @app.post("/api/steer")
    def steer(req: SteerRequest) -> dict[str, Any]:
        from codebook.steering import generate

        text_capped("prompt", req.prompt, limits.max_prompt_chars)
        capped("max_new_tokens", req.max_new_tokens, limits.max_new_tokens, low=1)
        capped("codes", len(req.codes), limits.max_steer_codes)
        refs = [guarded(search.check, guarded(CodeRef.parse, c)) for c in req.codes]
        if not refs:
            raise HTTPException(400, "codes: none given. Fix: name codes like mlp_1.0.42")
        codes = [{"site": r.site, "group": r.group, "code": r.code} for r in refs]
        kwargs = {"max_new_tokens": req.max_new_tokens, "do_sample": False}
        # One request at a time: steering attaches its codes to the model's shared layers,
        # and FastAPI runs this endpoint on a thread pool.
        model, tok = load_model()
        if tok is None:
            raise HTTPException(400, "steering: this store has no tokenizer (FSM tokens). "
                                "Fix: steer a text model's store")
        if not model_lock.acquire(timeout=limits.model_wait_seconds):
            raise HTTPException(503, f"model: busy with other steering requests for "
                                f"{limits.model_wait_seconds:g} s. Fix: retry later")
        try:
            base = guarded(generate, model, tok, [req.prompt], **kwargs)[0]["text"]
            steered = guarded(generate, model, tok, [req.prompt], codes=codes,
                              **kwargs)[0]["text"]
        finally:
            model_lock.release()
        return {"baseline": base, "steered": steered, "codes": [r.name for r in refs]}

    return app
