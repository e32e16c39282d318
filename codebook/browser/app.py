"""The code browser: a small FastAPI app over a code store (and its model, for steering).

    app = create_app("stores/shakespeare")        # then: uvicorn.run(app, host="127.0.0.1")

JSON API (the page in ``static/index.html`` uses it): ``/api/meta``, ``/api/search/regex``,
``/api/search/token``, ``/api/code/{site.group.code}``, ``/api/usage/{site}``, ``/api/steer``,
and ``/api/page/{site.group.code}`` behind each code's page, ``/code/{site.group.code}``
(``codebook.analysis.code_page``: ranked examples, quantiles, density, logit lens, co-occurring
codes, the automatic label). Search results carry each code's automatic label.
Bad input (unknown site, code out of range, a broken regex, a number over its cap) answers 400
with the message.

Safe by default: requests whose Host header is not an allowed host are refused (DNS
rebinding); the model runs one request at a time (steering attaches its codes to shared
layers); every size a request chooses has a cap (``MAX_*``); a user regex is length-capped,
refused if it can backtrack exponentially (a quantifier over a quantifier or over overlapping
alternatives), and matched over the store under a time and text budget, after which the
result is partial and says so.
"""

from __future__ import annotations

import ipaddress
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from codebook.analysis.search import CodeRef, StoreSearch, rank_codes
from codebook.errors import ConfigError

STATIC = Path(__file__).with_name("static")

# Caps on what one request may ask for (a larger value answers 400 and names the cap).
MAX_TOP = 1000  # rows of a code search
MAX_CONTEXTS = 200  # contexts of one code (n), examples on a code page
MAX_BINS = 200  # usage histogram bins
MAX_QUERY_CHARS = 500  # a token query or a regex pattern, in characters
MAX_PROMPT_CHARS = 4000  # steering prompt, in characters
MAX_NEW_TOKENS = 200  # steering generation length
MAX_STEER_CODES = 32  # codes forced in one steering request
MAX_BODY_BYTES = 64 * 1024  # a request body (the steering JSON)
# Budget of one regex scan over the store; past it the scan stops and the result is partial.
REGEX_SECONDS = 10.0  # wall clock, checked before each document
REGEX_MAX_CHARS = 20_000_000  # document text matched in all
REGEX_MAX_DOC_CHARS = 200_000  # longer documents are skipped (one match call cannot be stopped)
# How long a steering request waits for the model while other requests use it.
MODEL_WAIT_SECONDS = 120.0
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


@dataclass(frozen=True)
class Limits:
    """The caps and budgets of one app; the defaults are the module constants."""

    max_top: int = MAX_TOP
    max_contexts: int = MAX_CONTEXTS
    max_bins: int = MAX_BINS
    max_query_chars: int = MAX_QUERY_CHARS
    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_new_tokens: int = MAX_NEW_TOKENS
    max_steer_codes: int = MAX_STEER_CODES
    max_body_bytes: int = MAX_BODY_BYTES
    regex_seconds: float = REGEX_SECONDS
    regex_max_chars: int = REGEX_MAX_CHARS
    regex_max_doc_chars: int = REGEX_MAX_DOC_CHARS
    model_wait_seconds: float = MODEL_WAIT_SECONDS


class SteerRequest(BaseModel):
    """Body of ``POST /api/steer``: codes named ``site.group.code``."""

    prompt: str
    codes: list[str]
    max_new_tokens: int = 20


# ------------------------------------------------------------------------- user regexes
def check_regex(pattern: str, max_chars: int = MAX_QUERY_CHARS) -> re.Pattern[str]:
    """``pattern`` compiled, if it is short enough and cannot backtrack exponentially."""
    from codebook.analysis.features import RegexFeature

    if len(pattern) > max_chars:
        raise ConfigError("regex", f"the pattern has {len(pattern)} characters, the cap is "
                          f"{max_chars}", "search with a shorter pattern")
    compiled = RegexFeature("query", pattern).compiled()  # "invalid regex ..." if broken
    import re._parser as sre_parse  # the parser re itself uses (Python >= 3.11)

    problem = _backtracking_risk(list(sre_parse.parse(pattern)), in_repeat=False)
    if problem:
        raise ConfigError("regex", f"{pattern!r} has {problem}, which can take exponential "
                          "time on some texts", "drop the inner quantifier, use a character "
                          "class, or make it possessive/atomic (a++, (?>...))")
    return compiled


def _backtracking_risk(items: list, in_repeat: bool) -> str | None:
    """What in a parsed pattern can backtrack exponentially: a variable quantifier or an
    ambiguous alternation inside a backtracking quantifier that repeats (star height > 1)."""
    from re import _constants as c

    for op, av in items:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT):
            low, high, body = av
            if in_repeat and low != high:
                return "a quantifier inside a repeated group"
            found = _backtracking_risk(list(body), in_repeat or high > 1)
        elif op in (c.POSSESSIVE_REPEAT, c.ATOMIC_GROUP):  # never gives back: a fresh start
            found = _backtracking_risk(list(av[2] if op == c.POSSESSIVE_REPEAT else av), False)
        elif op == c.SUBPATTERN:
            found = _backtracking_risk(list(av[3]), in_repeat)
        elif op == c.BRANCH:
            branches = [list(b) for b in av[1]]
            if in_repeat and not _disjoint_starts(branches):
                return "alternatives that can match the same text inside a repeated group"
            found = next((r for b in branches if (r := _backtracking_risk(b, in_repeat))), None)
        elif op in (c.ASSERT, c.ASSERT_NOT):
            found = _backtracking_risk(list(av[1]), in_repeat)
        elif op == c.GROUPREF_EXISTS:
            found = next((r for b in av[1:] if b is not None
                          and (r := _backtracking_risk(list(b), in_repeat))), None)
        else:
            found = None
        if found:
            return found
    return None


def _disjoint_starts(branches: list[list]) -> bool:
    """Whether every alternative starts with a literal character no other one starts with."""
    from re import _constants as c

    seen: set[str] = set()
    for branch in branches:
        while branch and branch[0][0] == c.SUBPATTERN:
            branch = list(branch[0][1][3])
        if not branch or branch[0][0] != c.LITERAL:
            return False
        first = chr(branch[0][1]).lower()  # case-blind: (?i) may be on
        if first in seen:
            return False
        seen.add(first)
    return True


@dataclass
class ScanBudget:
    """What one regex scan may still read; ``partial`` once it skipped or stopped."""

    seconds: float
    chars_left: int
    max_doc_chars: int
    deadline: float = 0.0
    documents: int = 0
    stopped: bool = False
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.seconds

    @property
    def partial(self) -> bool:
        return bool(self.notes)

    def admit(self, chars: int) -> bool:
        """Whether a document of ``chars`` characters may be matched now (and count it)."""
        if self.stopped:
            return False
        if time.monotonic() >= self.deadline:
            self._stop(f"stopped after the time budget of {self.seconds:g} s")
        elif chars > self.chars_left:
            self._stop("stopped at the text budget")
        elif chars > self.max_doc_chars:
            note = f"skipped documents over {self.max_doc_chars} characters"
            if note not in self.notes:
                self.notes.append(note)
        else:
            self.chars_left -= chars
            self.documents += 1
            return True
        return False

    def _stop(self, note: str) -> None:
        self.stopped = True
        self.notes.append(note)

    def report(self, total_documents: int) -> dict[str, Any]:
        """The fields a search answer carries about its coverage."""
        note = ""
        if self.partial:
            note = (f"partial result: matched {self.documents} of {total_documents} documents ("
                    + "; ".join(self.notes) + "); precision and recall are over those only")
        return {"partial": self.partial, "scanned_documents": self.documents,
                "documents": total_documents, "note": note}


_BUDGET: ContextVar[ScanBudget | None] = ContextVar("codebook_regex_budget", default=None)


class BoundedStoreSearch(StoreSearch):
    """``StoreSearch`` whose regex search, inside ``budget()``, matches document by document
    and leaves out the rows of documents past the budget (``StoreSearch.code_stats`` goes
    through it too)."""

    @contextmanager
    def budget(self, limits: Limits) -> Iterator[ScanBudget]:
        scan = ScanBudget(limits.regex_seconds, limits.regex_max_chars,
                          limits.regex_max_doc_chars)
        token = _BUDGET.set(scan)
        try:
            yield scan
        finally:
            _BUDGET.reset(token)

    def codes_for_regex(self, regex: str, sites: list[str] | None = None,
                        min_recall: float = 0.0, top: int = 20, ignore_case: bool = False
                        ) -> list[dict[str, Any]]:
        """``StoreSearch.codes_for_regex`` over the documents the current budget admits."""
        from codebook.analysis.features import RegexFeature
        from codebook.analysis.search import _counts
        from codebook.analysis.store_eval import merge_partials

        scan = _BUDGET.get()
        if scan is None or self.tokenizer is None:  # no budget, or FSM (the usual error)
            return super().codes_for_regex(regex, sites, min_recall, top, ignore_case)
        feature = RegexFeature("query", regex, ignore_case)
        feature.compiled()
        sites = self._sites(sites)
        merged: dict[str, Any] = {}
        for path in self.store.shard_files():
            if scan.stopped:
                break
            table = self.store.read_shard(path)
            labels, mask = self._scan_shard(table, feature, scan)
            if mask.any():
                merged = merge_partials(merged, _counts(table, self.meta, labels, mask, sites))
        return rank_codes(merged, self.meta, sites, min_recall, top)

    def _scan_shard(self, table, feature, scan: ScanBudget) -> tuple[np.ndarray, np.ndarray]:
        """(labels, mask) of a shard's rows: mask marks the rows of the documents matched."""
        from codebook.analysis.features import shard_regex_labels
        from codebook.corpus import read_documents

        docs = table.column("doc_id").to_numpy()
        labels = np.zeros(len(docs), dtype=bool)
        mask = np.zeros(len(docs), dtype=bool)
        if len(docs) == 0:
            return labels, mask
        positions = table.column("position").to_numpy()
        token_ids = table.column("token_id").to_numpy()
        first = int(docs.min())
        texts = read_documents(self.meta.source, first, int(docs.max()) + 1)
        bounds = np.flatnonzero(np.diff(docs)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(docs)], strict=True):
            doc = int(docs[lo])
            text = texts[doc - first]
            if not scan.admit(len(text)):  # checked before each document
                if scan.stopped:
                    break
                continue
            labels[lo:hi] = shard_regex_labels(
                self.tokenizer, [text], doc, docs[lo:hi], positions[lo:hi], token_ids[lo:hi],
                [feature])[:, 0]
            mask[lo:hi] = True
        return labels, mask


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

    from codebook.analysis.autolabel import read_labels
    from codebook.analysis.code_page import PageOptions, code_page

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
