"""Code search on a 1M-token store: DuckDB (today) against the per-shard Python loops of
before (``codebook/analysis/search.py`` at commit f383f61, read from git), and the time a code
page takes to load through the browser's HTTP API.

    python benchmarks/store_query.py [--tokens 1000000] [--out /tmp/bench-store]

The store is written in the real format (``CodeStore.write_shard``) from a tiny random model's
site layout, with Zipf-distributed code ids and float16 scores, so every query reads real Parquet
shards; the model serves the logit lens and similar codes. Both implementations run in the same
process on the same files. Prints one line per measurement and a JSON summary last.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from codebook.store import CodeStore, StoreMeta, token_table  # noqa: E402
from codebook.store.search import CodeRef, StoreSearch  # noqa: E402

BEFORE = "f383f61"  # the last commit with the per-shard loops


def old_search_module():
    """``codebook/analysis/search.py`` as it was at ``BEFORE``, imported under another name."""
    src = subprocess.run(["git", "show", f"{BEFORE}:codebook/analysis/search.py"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "search_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("search_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["search_before"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def build(root: Path, tokens: int, doc_len: int = 256, docs_per_shard: int = 64) -> CodeStore:
    """A model folder and a store of ``tokens`` tokens over its sites."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from codebook import CodebookConfig, CodebookModel
    from codebook.resolve import site_infos

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt_neox", vocab_size=512, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=128,
                               max_position_embeddings=512)
    model = CodebookModel(AutoModelForCausalLM.from_config(cfg),
                          CodebookConfig(sites=["attn_heads", "mlp"], num_codes=1000, k=2))
    model.save_pretrained(root / "model")
    infos = site_infos(str(root / "model"))
    n_docs = tokens // doc_len
    shards = (n_docs + docs_per_shard - 1) // docs_per_shard
    meta = StoreMeta(model=str(root / "model"), tokenizer=None,
                     source={"kind": "fsm", "num_documents": n_docs}, sites=infos,
                     score_sites=list(infos), block_size=doc_len, num_shards=shards,
                     num_documents=n_docs)
    store = CodeStore.create(root / "store", meta)
    rng = np.random.default_rng(0)
    for s in range(shards):
        docs = np.arange(s * docs_per_shard, min(n_docs, (s + 1) * docs_per_shard))
        t = len(docs) * doc_len
        codes, scores = {}, {}
        for site, info in infos.items():
            z = rng.zipf(1.3, size=(t, info.groups, info.k)) - 1
            codes[site] = np.minimum(z, info.num_codes - 1)
            scores[site] = rng.random((t, info.groups, info.k)).astype(np.float16)
        table = token_table(np.repeat(docs, doc_len), np.tile(np.arange(doc_len), len(docs)),
                            rng.integers(0, 512, t), codes, meta, scores=scores)
        store.write_shard(s, table)
    store.finalize_stats()
    return store


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    """Best of ``repeat`` wall times (s) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--out", help="folder for the model and store (default: a temp folder)")
    args = p.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="bench-store-"))
    t0 = time.perf_counter()
    store = CodeStore(root / "store") if (root / "store" / "code_stats.parquet").is_file() \
        else build(root, args.tokens)
    print(f"store: {store.root} ({time.perf_counter() - t0:.1f} s to open or build)", flush=True)
    new, old = StoreSearch(store), old_search_module().StoreSearch(store)
    site = "attn_heads_1"
    usage = new.usage(site)
    frequent = CodeRef(site, 0, int(np.argmax(usage[0])))
    counts = usage[0].astype(float)
    counts[counts == 0] = np.inf
    rare = CodeRef(site, 0, int(np.argmin(np.abs(counts - 50))))  # fires ~50 times
    results: dict[str, dict[str, float]] = {}
    cases = [("codes_for_token", lambda s: s.codes_for_token(7)),
             ("contexts_frequent", lambda s: s.contexts(frequent, n=20)),
             ("contexts_rare", lambda s: s.contexts(rare, n=20))]
    for name, fn in cases:
        t_old, r_old = timed(lambda fn=fn: fn(old))
        t_new, r_new = timed(lambda fn=fn: fn(new))
        same = r_old == r_new
        results[name] = {"before_s": round(t_old, 4), "duckdb_s": round(t_new, 4),
                         "speedup": round(t_old / t_new, 2), "same_result": same}
        print(f"{name:18s} before {t_old:7.3f} s  duckdb {t_new:7.3f} s  "
              f"x{t_old / t_new:6.1f}  same result: {same}", flush=True)
    results["page_http"] = page_load(store, [frequent, rare, CodeRef("mlp_0", 0, 3)])
    summary = {"tokens": new.query.num_tokens(), "shards": store.meta.num_shards,
               "frequent_code": frequent.name, "frequent_count": int(usage[0, frequent.code]),
               "rare_code": rare.name, "rare_count": int(usage[0, rare.code]), **results}
    print(json.dumps(summary), flush=True)


def page_load(store: CodeStore, refs: list[CodeRef]) -> dict[str, float]:
    """GET /api/page/<code> from the browser app on a real uvicorn server (127.0.0.1): the
    first request (opens DuckDB, loads the model) and the best of three after it, per code."""
    from codebook.browser import create_app
    from codebook.browser.serve import serving

    app = create_app(store.root)
    t0 = time.perf_counter()
    app.state.warm()  # as pipelines/browse.py does before it serves
    warm_s = time.perf_counter() - t0
    with serving(app) as url:
        return {"warm_up_s": round(warm_s, 3), **_page_times(url, refs)}


def _page_times(url: str, refs: list[CodeRef]) -> dict[str, float]:
    import urllib.request

    def get(ref: CodeRef) -> dict:
        with urllib.request.urlopen(f"{url}/api/page/{ref.name}") as res:
            return json.loads(res.read())

    out: dict[str, float] = {}
    t0 = time.perf_counter()
    get(refs[0])
    out["first_request_s"] = round(time.perf_counter() - t0, 3)
    for ref in refs:
        best, page = timed(lambda ref=ref: get(ref))
        out[f"{ref.name}_s"] = round(best, 3)
        print(f"page {ref.name:22s} {best:6.3f} s ({page['count']} firings)", flush=True)
    out["max_s"] = max(v for k, v in out.items() if k != "first_request_s")
    print(f"code page: at most {out['max_s']:.3f} s warm, first request "
          f"{out['first_request_s']:.3f} s (target < 1 s)", flush=True)
    return out


if __name__ == "__main__":
    main()
