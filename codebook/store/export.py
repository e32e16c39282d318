"""Export codes for sharing: Neuronpedia-style feature JSON, one static dashboard, an HF dataset.

- ``neuronpedia_feature``: one code page (``codebook.store.code_page``) as a feature in the
  field names of Neuronpedia's feature records (its database models ``Neuron``, ``Activation``
  and ``Explanation``, and the SAEDashboard upload batches), checked by the JSON Schema
  ``neuronpedia_feature.schema.json`` beside this file. The mapping:

  ========================  =================================================================
  ``modelId``               the ``model_id`` argument
  ``layer``                 the codebook site (``mlp_1``, ``attn_heads_3``): Neuronpedia's
                            source id, here the site, not a layer number
  ``index``                 ``"<group>.<code>"``, a string (Neuronpedia stores indexes as
                            strings; ours needs the group, e.g. the head, beside the code id)
  ``sourceSetName``         the ``source`` argument (the set of codebooks, e.g. ``codebook``)
  ``maxActApprox``          the code's highest similarity score (0 without scores)
  ``activations``           one per example (top examples, then the quantile bands): the
                            context ``tokens``; ``values`` per token, the code's score where
                            it fires and 0 elsewhere (without scores: 1 on the example's
                            firing token); ``maxValue``, ``maxValueTokenIndex``, ``minValue``;
                            ``qualifyingTokenIndex`` the example's firing token; ``dataIndex``
                            the document id; ``binMin``/``binMax``/``binContains`` the
                            quantile band (score range, share of firings), null for the top
                            examples
  ``pos_str``/``pos_values``  the logit lens: tokens the code raises most, with their logits
  ``neg_str``/``neg_values``  ... and lowers most (empty without a model)
  ``frac_nonzero``          firing frequency: tokens the code fired on / tokens in the store
  ``freq_hist_data_bar_*``  the score histogram: ``heights`` the counts, ``values`` the bin
                            centres (empty without scores)
  ``explanations``          the automatic label: ``description`` the label, ``typeName`` and
                            ``explanationModelName`` ``codebook-autolabel``, ``scoreV1`` the
                            held-out precision, ``scores`` held-out precision and recall
  ``codebook``              our own fields: the code's name, site, group and id, count,
                            documents, frequency, ranking, the label's precision/recall and
                            kind, top tokens, co-occurring and similar codes, the histogram
                            edges and the logit lens's method
  ========================  =================================================================

- ``export_codes``: ``features/<code>.json`` for each code and ``dashboard.html``, one
  self-contained page (the browser's ``code_page.js`` and CSS inlined, the pages as JSON) that
  opens from a ``file://`` URL: a list of codes with their labels, ``#code=<name>`` navigation.
- ``publish_dataset``: a ``README.md`` dataset card whose ``configs`` make the store's Parquet
  files loadable with ``datasets.load_dataset(folder, "tokens")`` (also ``code_stats``,
  ``labels``).
"""

from __future__ import annotations

import html
import json
import math
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from codebook.errors import ConfigError
from codebook.io import atomic_write
from codebook.store import (
    CODE_STATS_FILE,
    META_FILE,
    TOKENS_DIR,
    CodeStore,
    acts_column,
    codes_column,
    scores_column,
)
from codebook.store.autolabel import LABELS_FILE, read_labels
from codebook.store.search import CodeRef, StoreSearch

SCHEMA_FILE = Path(__file__).with_name("neuronpedia_feature.schema.json")
STATIC = Path(__file__).resolve().parents[1] / "browser" / "static"
EXPLANATION_TYPE = "codebook-autolabel"
FEATURES_DIR = "features"
DASHBOARD_FILE = "dashboard.html"
FORMAT_VERSION = 1

__all__ = ["SCHEMA_FILE", "dashboard_html", "export_codes", "feature_schema",
           "neuronpedia_feature", "publish_dataset"]


# ---------------------------------------------------------------------- Neuronpedia JSON
def feature_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``neuronpedia_feature``'s output."""
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


def neuronpedia_feature(page: dict[str, Any], model_id: str, source: str) -> dict[str, Any]:
    """One code page as a Neuronpedia-style feature (the mapping is in the module docstring)."""
    page = _finite(page)
    lens = page.get("logit_lens") or {"positive": [], "negative": [], "method": None}
    hist = (page.get("density") or {}).get("histogram")
    label = page.get("label")
    activations = [_activation(ex, None) for ex in page["examples"]]
    for band in page.get("quantiles") or []:
        activations += [_activation(ex, band, page["count"]) for ex in band["examples"]]
    scores = [ex["score"] for ex in page["examples"] if ex["score"] is not None]
    return {
        "modelId": model_id,
        "layer": page["site"],
        "index": f"{page['group']}.{page['index']}",
        "sourceSetName": source,
        "maxActApprox": max(scores) if scores else 0.0,
        "activations": activations,
        "pos_str": [r["token"] for r in lens["positive"]],
        "pos_values": [r["logit"] for r in lens["positive"]],
        "neg_str": [r["token"] for r in lens["negative"]],
        "neg_values": [r["logit"] for r in lens["negative"]],
        "frac_nonzero": page["frequency"],
        "freq_hist_data_bar_heights": [float(h) for h in hist["heights"]] if hist else [],
        "freq_hist_data_bar_values": ([(a + b) / 2 for a, b in zip(hist["edges"][:-1],
                                                                    hist["edges"][1:],
                                                                    strict=True)]
                                      if hist else []),
        "explanations": [_explanation(label)] if label and label.get("label") else [],
        "codebook": {
            "format_version": FORMAT_VERSION,
            "code": page["code"], "site": page["site"], "group": page["group"],
            "code_index": page["index"], "count": page["count"], "tokens": page["tokens"],
            "documents": page["documents"], "frequency": page["frequency"],
            "log10_frequency": (page.get("density") or {}).get("log10_frequency"),
            "has_scores": page["has_scores"], "ranked_by": page["ranked_by"],
            "label": _label_block(label),
            "top_tokens": page.get("top_tokens") or [],
            "cooccurring": page.get("cooccurring") or [],
            "similar": page.get("similar") or [],
            "histogram_edges": hist["edges"] if hist else [],
            "logit_lens_method": lens.get("method"),
        },
    }


def _activation(ex: dict[str, Any], band: dict[str, Any] | None,
                count: int = 0) -> dict[str, Any]:
    hi = int(ex["highlight"])
    values = [0.0 if a is None else float(a) for a in (ex.get("acts") or [None] * len(
        ex["tokens"]))]
    if ex["score"] is None:  # a store without scores: the firing token, as a binary value
        values[hi] = 1.0
    else:
        values[hi] = float(ex["score"])
    top = int(np.argmax(values)) if values else 0
    out = {"tokens": [str(t) for t in ex["tokens"]], "values": values,
           "maxValue": values[top] if values else 0.0, "maxValueTokenIndex": top,
           "minValue": min(values) if values else 0.0, "qualifyingTokenIndex": hi,
           "dataIndex": str(ex["doc_id"]), "binMin": None, "binMax": None, "binContains": None,
           "codebook": {"doc_id": ex["doc_id"], "position": ex["position"], "score": ex["score"],
                        "band": "top" if band is None else band["band"]}}
    if band is not None:
        out.update(binMin=band["low"], binMax=band["high"],
                   binContains=band["firings"] / count if count else 0.0)
    return out


def _explanation(label: dict[str, Any]) -> dict[str, Any]:
    scores = [{"value": label[key], "explanationScoreTypeName": f"heldout-{key}",
               "explanationScoreModelName": EXPLANATION_TYPE}
              for key in ("precision", "recall") if label.get(key) is not None]
    return {"description": str(label["label"]), "typeName": EXPLANATION_TYPE,
            "explanationModelName": EXPLANATION_TYPE,
            "scoreV1": label.get("precision") if label.get("precision") is not None else 0.0,
            "scores": scores}


def _label_block(label: dict[str, Any] | None) -> dict[str, Any] | None:
    if not label:
        return None
    return {"label": label.get("label"), "kind": label.get("kind"),
            "precision": label.get("precision"), "recall": label.get("recall")}


def _finite(value: Any) -> Any:
    """``value`` with NaN/inf floats as None and numpy scalars as Python ones (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(value, allow_nan=False, ensure_ascii=False, **kwargs)


# ---------------------------------------------------------------------- the dashboard
_DASHBOARD_CSS = """
.layout { display: flex; gap: 1.5rem; align-items: flex-start; }
#code-list { flex: 0 0 260px; position: sticky; top: 0; max-height: 100vh; overflow-y: auto;
  font-size: .85rem; }
#code-list ul { list-style: none; padding: 0; margin: 0; }
#code-list li { padding: .15rem .3rem; border-bottom: 1px solid #eee; }
#code-list li.active { background: #fff3d6; }
#code-list .code-label { display: block; color: #555; font-size: .8rem; }
#page { flex: 1; min-width: 0; }
"""

_DASHBOARD_JS = """
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("pages").textContent);
  const pages = new Map(data.pages.map((p) => [p.code, p]));
  const link = (c) => "#code=" + encodeURIComponent(c);
  const list = document.getElementById("codes");
  for (const p of data.pages) {
    const li = document.createElement("li");
    li.dataset.code = p.code;
    const a = cbEl("a", p.code, "code");
    a.href = link(p.code);
    li.append(a);
    const text = p.label && p.label.label ? p.label.label : "no label";
    li.append(cbEl("span", `${text} (${p.count} firings)`, "code-label"));
    list.append(li);
  }
  function wanted() {
    const m = location.hash.match(/^#code=(.*)$/);
    if (!m) return data.pages.length ? data.pages[0].code : null;
    try { return decodeURIComponent(m[1]); } catch (e) { return m[1]; }
  }
  function show() {
    const name = wanted();
    const root = document.getElementById("page");
    for (const li of list.children) li.classList.toggle("active", li.dataset.code === name);
    const page = pages.get(name);
    if (!page) {
      root.replaceChildren();
      root.className = "error";
      root.textContent = name === null ? "no codes in this export"
        : `${name} is not in this export (export it with pipelines/export.py --codes ${name})`;
      return;
    }
    root.className = "";
    renderCodePage(page, root, link);
    document.title = `code ${name}`;
    window.scrollTo(0, 0);
  }
  window.addEventListener("hashchange", show);
  show();
})();
"""


def _script_json(value: Any) -> str:
    """JSON safe inside a ``<script>`` element: ``<``, ``>`` and ``&`` as ``\\u`` escapes, so
    no token text can close the element (``</script>``) or open a comment (``<!--``)."""
    text = _dumps(value)
    for ch in "<>&\u2028\u2029":
        text = text.replace(ch, f"\\u{ord(ch):04x}")
    return text


def _inline_js(text: str) -> str:
    return text.replace("</", "<\\/")  # a literal "</script" in the code would end the element


def dashboard_html(pages: list[dict[str, Any]], title: str = "codebook codes") -> str:
    """One self-contained HTML page showing ``pages`` (code page dicts): a list of the codes
    and the chosen one (``#code=<name>``) rendered by the browser's ``renderCodePage``."""
    css = (STATIC / "code_page.css").read_text(encoding="utf-8")
    js = (STATIC / "code_page.js").read_text(encoding="utf-8")
    data = {"title": title, "pages": _finite(pages)}
    return (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>\n{css}{_DASHBOARD_CSS}</style>\n"
        "</head>\n<body>\n<div class=\"layout\">\n<nav id=\"code-list\">\n"
        f"<h2>{html.escape(title)}</h2>\n<ul id=\"codes\"></ul>\n</nav>\n"
        "<main id=\"page\">loading...</main>\n</div>\n"
        f"<script type=\"application/json\" id=\"pages\">{_script_json(data)}</script>\n"
        f"<script>\n{_inline_js(js)}\n</script>\n<script>{_inline_js(_DASHBOARD_JS)}</script>\n"
        "</body>\n</html>\n")


# ---------------------------------------------------------------------- export
def resolve_codes(search: StoreSearch, codes: Iterable[str] | None,
                  min_count: int = 1) -> list[CodeRef]:
    """``codes`` parsed and checked against the store (ConfigError before any work), or every
    code with at least ``min_count`` firings (site order, then group, then id)."""
    if codes is not None:
        refs = [search.check(CodeRef.parse(c)) for c in codes]
        if not refs:
            raise ConfigError("codes", "no codes given", "name codes like mlp_1.0.42, or --all")
        return list(dict.fromkeys(refs))
    if min_count < 1:
        raise ConfigError("min_count", f"got {min_count}", "use an integer >= 1")
    refs = []
    for site in search.meta.sites:
        usage = search.usage(site)
        refs += [CodeRef(site, int(g), int(c)) for g, c in zip(*np.nonzero(usage >= min_count),
                                                               strict=True)]
    return refs


def export_codes(search: StoreSearch, codes: list[str] | None, out: Path, model: Any = None,
                 labels: dict[str, dict] | None = None, options: Any = None,
                 min_count: int = 1, *, model_id: str | None = None,
                 source: str = "codebook", html_page: bool = True) -> dict[str, Any]:
    """Write ``out/features/<code>.json`` (Neuronpedia format) for each code and, with
    ``html_page``, ``out/dashboard.html``. ``codes`` None: every code with >= ``min_count``
    firings. ``model``: the loaded codebook model for the logit lens (None: no lens);
    ``labels``: ``read_labels`` (None: read from the store); ``options``: ``PageOptions``;
    ``model_id``: Neuronpedia's modelId (default: the model folder's name). Returns
    ``{codes, files, seconds, out, dashboard, logit_lens}``."""
    from codebook.store.code_page import code_page

    began = time.perf_counter()
    refs = resolve_codes(search, codes, min_count)  # all checked before any page is made
    if labels is None:
        labels = read_labels(search.store)
    model_id = model_id or _model_id(search.meta.model)
    out = Path(out)
    (out / FEATURES_DIR).mkdir(parents=True, exist_ok=True)
    pages, files = [], 0
    for ref in refs:
        page = _finite(code_page(search, ref, options, model, labels))
        with atomic_write(out / FEATURES_DIR / f"{ref.name}.json") as fh:
            fh.write(_dumps(neuronpedia_feature(page, model_id, source)))
        files += 1
        if html_page:
            pages.append(page)
    dashboard = None
    if html_page:
        dashboard = out / DASHBOARD_FILE
        title = f"codebook codes: {Path(search.store.root).name}"
        with atomic_write(dashboard) as fh:
            fh.write(dashboard_html(pages, title))
        files += 1
    return {"codes": len(refs), "files": files, "seconds": round(time.perf_counter() - began, 3),
            "out": str(out), "dashboard": str(dashboard) if dashboard else None,
            "logit_lens": model is not None}


def _model_id(model: str) -> str:
    name = Path(str(model).rstrip("/")).name or str(model)
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name.lower())


# ---------------------------------------------------------------------- HF dataset
def publish_dataset(store: CodeStore | str | Path, out: Path | None = None) -> Path:
    """Make the store loadable with ``datasets.load_dataset(folder, "tokens")``: a README.md
    dataset card with ``configs`` (``tokens``, ``code_stats``, ``labels`` when present) in the
    store folder, or, with ``out``, in ``out`` beside a copy of the store's Parquet files and
    ``store.json``. Returns the dataset folder."""
    store = store if isinstance(store, CodeStore) else CodeStore(store)
    shards = store.shard_files()
    if not shards:
        raise ConfigError("store", f"{store.root} has no token shards",
                          "run pipelines/extract.py to the end first")
    stats = store.root / CODE_STATS_FILE
    if not stats.is_file():
        store.finalize_stats()
    has_labels = (store.root / LABELS_FILE).is_file()
    folder = store.root
    if out is not None:
        folder = Path(out).expanduser().resolve()
        if folder == store.root:
            out = None
        else:
            (folder / TOKENS_DIR).mkdir(parents=True, exist_ok=True)
            for stale in set((folder / TOKENS_DIR).glob("shard-*.parquet")) - {
                    folder / TOKENS_DIR / p.name for p in shards}:
                stale.unlink()  # left by an earlier copy of a different store
            for path in shards:
                shutil.copy2(path, folder / TOKENS_DIR / path.name)
            for name in [META_FILE, CODE_STATS_FILE] + ([LABELS_FILE] if has_labels else []):
                shutil.copy2(store.root / name, folder / name)
    with atomic_write(folder / "README.md") as fh:
        fh.write(dataset_card(store, has_labels))
    return folder


def dataset_card(store: CodeStore, has_labels: bool) -> str:
    """The README.md of ``publish_dataset``: YAML ``configs`` front matter, then the columns."""
    import yaml

    configs = [{"config_name": "tokens", "default": True,
                "data_files": [{"split": "train", "path": f"{TOKENS_DIR}/*.parquet"}]},
               {"config_name": "code_stats",
                "data_files": [{"split": "train", "path": CODE_STATS_FILE}]}]
    if has_labels:
        configs.append({"config_name": "labels",
                        "data_files": [{"split": "train", "path": LABELS_FILE}]})
    front = yaml.safe_dump({"configs": configs, "tags": ["codebook-features",
                                                         "interpretability"]},
                           sort_keys=False)
    meta = store.meta
    cols = ["- `doc_id` (int64): the document", "- `position` (int32): the token's position "
            "in its document", "- `token_id` (int32): the token"]
    for site, info in meta.sites.items():
        cols.append(f"- `{codes_column(site)}` (list of {info.width} unsigned ints): the ids of "
                    f"the codes that fired at site `{site}` (groups x k = {info.groups} x "
                    f"{info.k}, group-major), ids < {info.num_codes}; code "
                    f"`{site}.<group>.<id>`")
    for site in meta.score_sites:
        cols.append(f"- `{scores_column(site)}` (list of {meta.sites[site].width} float16): "
                    f"each firing code's similarity score, aligned with `{codes_column(site)}`")
    for site in meta.activation_sites:
        cols.append(f"- `{acts_column(site)}` (list of float16): the raw input of site "
                    f"`{site}`")
    label_text = ("- `labels`: per code its automatic label (`label`, `kind`), with selection "
                  "and held-out `precision`/`recall`\n" if has_labels else "")
    source = meta.source.get("kind", "?") if isinstance(meta.source, dict) else "?"
    return (f"---\n{front}---\n\n# Code store: {store.root.name}\n\n"
            "Which codebook codes fired at every token of a corpus, written by the codebook "
            "project's `pipelines/extract.py` (a codebook model: discrete, sparse hidden states "
            "of a causal language model).\n\n"
            f"- model: `{meta.model}`\n- tokenizer: `{meta.tokenizer}`\n"
            f"- source: {source}, {meta.num_documents} documents\n"
            f"- sites: {', '.join(f'`{s}`' for s in meta.sites)}\n\n"
            "```python\nfrom datasets import load_dataset\n"
            "tokens = load_dataset(\"<this folder or repo>\", \"tokens\", split=\"train\")\n```\n\n"
            "## Configs\n\n"
            "- `tokens`: one row per token (`tokens/*.parquet`)\n"
            "- `code_stats`: per (`site`, `group`, `code`) the tokens (`count`) and "
            "`documents` it fired on\n" + label_text +
            "\n## Columns of `tokens`\n\n" + "\n".join(cols) + "\n\n"
            f"`{META_FILE}` describes the store in full.\n")
