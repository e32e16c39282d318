"""The code browser: a small FastAPI app over a code store (and its model, for steering).

    app = create_app("stores/shakespeare")        # then: uvicorn.run(app, host="127.0.0.1")

JSON API (the page in ``static/index.html`` uses it): ``/api/meta``, ``/api/search/regex``,
``/api/search/token``, ``/api/code/{site.group.code}``, ``/api/usage/{site}``, ``/api/steer``.
Bad input (unknown site, code out of range, a broken regex) answers 400 with the message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from codebook.analysis.search import CodeRef, StoreSearch
from codebook.errors import ConfigError

STATIC = Path(__file__).with_name("static")


class SteerRequest(BaseModel):
    """Body of ``POST /api/steer``: codes named ``site.group.code``."""

    prompt: str
    codes: list[str]
    max_new_tokens: int = 20


def create_app(store: str | Path, model_path: str | None = None) -> Any:
    """The FastAPI app for ``store``; ``model_path`` (default: the store's model) for steering."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import FileResponse

    search = StoreSearch(store)
    state: dict[str, Any] = {}
    app = FastAPI(title="codebook browser")

    def guarded(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            raise HTTPException(status_code=400, detail=str(err)) from err

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/meta")
    def meta() -> dict[str, Any]:
        m = search.meta
        return {"store": str(search.store.root), "model": m.model,
                "documents": m.num_documents, "source": m.source["kind"],
                "sites": {s: {"groups": i.groups, "k": i.k, "num_codes": i.num_codes}
                          for s, i in m.sites.items()},
                "text": m.tokenizer is not None}

    @app.get("/api/search/regex")
    def by_regex(q: str, site: str = "", min_recall: float = 0.0, top: int = 20) -> list:
        return guarded(search.codes_for_regex, q, [site] if site else None, min_recall, top)

    @app.get("/api/search/token")
    def by_token(q: str, site: str = "", top: int = 20) -> list:
        return guarded(search.codes_for_token, q, [site] if site else None, top)

    @app.get("/api/code/{name}")
    def code(name: str, regex: str = "", n: int = 20) -> dict[str, Any]:
        ref = guarded(CodeRef.parse, name)
        out = guarded(search.code_stats, ref, regex or None)
        out["contexts"] = guarded(search.contexts, ref, n)
        try:
            out["similar"] = search.similar_codes(ref, 8)
        except ConfigError:  # the model folder moved: the rest still works
            out["similar"] = []
        return out

    @app.get("/api/usage/{site}")
    def usage(site: str, bins: int = 20) -> dict[str, Any]:
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

        refs = [guarded(search.check, guarded(CodeRef.parse, c)) for c in req.codes]
        if not refs:
            raise HTTPException(400, "codes: none given. Fix: name codes like mlp_1.0.42")
        if "model" not in state:
            from codebook.data.text import load_tokenizer
            from codebook.extraction import load_extraction_model

            state["model"] = load_extraction_model(model_path or search.meta.model)
            state["tokenizer"] = load_tokenizer(search.meta.tokenizer)
        model, tok = state["model"], state["tokenizer"]
        codes = [{"site": r.site, "group": r.group, "code": r.code} for r in refs]
        kwargs = {"max_new_tokens": max(1, min(req.max_new_tokens, 200)), "do_sample": False}
        base = guarded(generate, model, tok, [req.prompt], **kwargs)[0]["text"]
        steered = guarded(generate, model, tok, [req.prompt], codes=codes, **kwargs)[0]["text"]
        return {"baseline": base, "steered": steered, "codes": [r.name for r in refs]}

    return app
