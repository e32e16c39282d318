// Renders one code's page (the JSON of /api/page/<code>, codebook/store/code_page.py) into
// an element. Used by code.html (served) and by the static export (codebook/store/export.py),
// so both show the same thing. Builds DOM nodes only (token texts never become HTML).
"use strict";

function cbEl(tag, text, cls) {
  const el = document.createElement(tag);
  if (text !== undefined && text !== null) el.textContent = text;
  if (cls) el.className = cls;
  return el;
}

function cbFmt(x, digits = 3) {
  if (x === null || x === undefined) return "";
  return typeof x === "number" ? (Math.abs(x) < 1e-3 && x !== 0 ? x.toExponential(2) : x.toFixed(digits)) : String(x);
}

// A context: tokens in spans, the firing token marked, others shaded by the code's score.
function cbContext(ex, maxScore) {
  const div = cbEl("div", "", "context");
  ex.tokens.forEach((t, i) => {
    const span = cbEl(i === ex.highlight ? "mark" : "span", t);
    const a = ex.acts ? ex.acts[i] : null;
    if (i !== ex.highlight && a !== null && a !== undefined) {
      const strength = maxScore > 0 ? Math.max(0.15, Math.min(1, a / maxScore)) : 0.5;
      span.style.background = `rgba(255, 140, 0, ${strength.toFixed(2)})`;
      span.className = "also";
    }
    if (a !== null && a !== undefined) span.title = `score ${cbFmt(a, 4)}`;
    div.append(span);
  });
  return div;
}

function cbExamples(list, maxScore, cls) {
  const table = cbEl("table", "", cls);
  const head = table.createTHead().insertRow();
  for (const h of ["score", "doc", "context"]) head.append(cbEl("th", h));
  const body = table.createTBody();
  for (const ex of list) {
    const tr = body.insertRow();
    tr.className = "example";
    tr.insertCell().textContent = ex.score === null ? "-" : cbFmt(ex.score, 4);
    tr.insertCell().textContent = `${ex.doc_id}:${ex.position}`;
    tr.insertCell().append(cbContext(ex, maxScore));
  }
  return table;
}

function cbHistogram(hist) {
  // An inline SVG bar chart of the score histogram.
  const ns = "http://www.w3.org/2000/svg";
  const w = 420, h = 120, n = hist.heights.length, top = Math.max(1, ...hist.heights);
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("id", "histogram");
  svg.setAttribute("width", w); svg.setAttribute("height", h + 18);
  hist.heights.forEach((v, i) => {
    const r = document.createElementNS(ns, "rect");
    const bh = (h * v) / top;
    r.setAttribute("x", (i * w) / n); r.setAttribute("y", h - bh);
    r.setAttribute("width", Math.max(1, w / n - 1)); r.setAttribute("height", bh);
    r.setAttribute("class", "bar"); r.setAttribute("fill", "#5c8dd6");
    const t = document.createElementNS(ns, "title");
    t.textContent = `${cbFmt(hist.edges[i], 3)}..${cbFmt(hist.edges[i + 1], 3)}: ${v}`;
    r.append(t); svg.append(r);
  });
  for (const [x, v, anchor] of [[0, hist.edges[0], "start"], [w, hist.edges[n], "end"]]) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x); t.setAttribute("y", h + 14); t.setAttribute("font-size", "11");
    t.setAttribute("text-anchor", anchor); t.textContent = cbFmt(v, 3);
    svg.append(t);
  }
  return svg;
}

function cbLens(lens) {
  const table = cbEl("table");
  table.id = "logit-lens";
  const head = table.createTHead().insertRow();
  for (const h of ["raises", "logit", "lowers", "logit"]) head.append(cbEl("th", h));
  const body = table.createTBody();
  const n = Math.max(lens.positive.length, lens.negative.length);
  for (let i = 0; i < n; i++) {
    const tr = body.insertRow();
    for (const side of [lens.positive[i], lens.negative[i]]) {
      tr.insertCell().append(cbEl("code", side ? JSON.stringify(side.token) : ""));
      tr.insertCell().textContent = side ? cbFmt(side.logit) : "";
    }
  }
  return table;
}

// page: the JSON; root: the element to fill; link(code) -> href of another code's page.
function renderCodePage(page, root, link) {
  root.replaceChildren();
  const h = cbEl("h1", page.code);
  root.append(h);
  const label = cbEl("div", "", "label");
  label.id = "label";
  if (page.label) {
    label.append(cbEl("b", page.label.label));
    label.append(cbEl("span", ` (${page.label.kind}; held-out precision ${cbFmt(page.label.precision)}, recall ${cbFmt(page.label.recall)})`));
  } else {
    label.textContent = "no automatic label (run pipelines/label.py on this store)";
  }
  root.append(label);
  const d = page.density;
  root.append(cbEl("p", `fires on ${page.count} of ${page.tokens} tokens ` +
    `(frequency ${cbFmt(page.frequency, 5)}, 10^${cbFmt(d.log10_frequency, 2)}) in ${page.documents} documents; ` +
    `examples ranked by ${page.ranked_by}`, "stats"));

  root.append(cbEl("h2", "Top examples"));
  const maxScore = Math.max(0, ...page.examples.map((e) => e.score ?? 0));
  root.append(cbExamples(page.examples, maxScore, "examples"));

  if (page.quantiles && page.quantiles.length) {
    root.append(cbEl("h2", "Examples by score quantile"));
    for (const q of page.quantiles) {
      root.append(cbEl("h3", `${q.band} (scores ${cbFmt(q.low)}..${cbFmt(q.high)}, ${q.firings} firings)`));
      root.append(cbExamples(q.examples, maxScore, "quantile"));
    }
  }

  root.append(cbEl("h2", "Density"));
  if (d.histogram) root.append(cbHistogram(d.histogram));
  else root.append(cbEl("p", "no score histogram: the store was extracted without --scores"));

  root.append(cbEl("h2", "Logit lens"));
  if (page.logit_lens) {
    root.append(cbEl("p", page.logit_lens.method, "note"));
    root.append(cbLens(page.logit_lens));
  } else root.append(cbEl("p", "no model loaded"));

  const cols = cbEl("div", "", "cols");
  const tokens = cbEl("div");
  tokens.append(cbEl("h2", "Most frequent tokens"));
  const tt = cbEl("table");
  for (const t of page.top_tokens) {
    const tr = tt.insertRow();
    tr.insertCell().append(cbEl("code", JSON.stringify(t.token)));
    tr.insertCell().textContent = `${t.count} (${cbFmt(100 * t.share, 1)}%)`;
  }
  tokens.append(tt);
  const co = cbEl("div");
  co.append(cbEl("h2", "Co-occurring codes (by lift)"));
  const ct = cbEl("table");
  ct.id = "cooccurring";
  for (const c of page.cooccurring) {
    const tr = ct.insertRow();
    const a = cbEl("a", c.code, "code");
    if (link) a.href = link(c.code);
    tr.insertCell().append(a);
    tr.insertCell().textContent = `lift ${cbFmt(c.lift, 1)}, ${c.joint} tokens`;
  }
  co.append(ct);
  const sim = cbEl("div");
  sim.append(cbEl("h2", "Similar codes (cosine)"));
  for (const s of page.similar || []) {
    const a = cbEl("a", `${s.code} (${cbFmt(s.cosine)})`, "code");
    if (link) a.href = link(s.code);
    sim.append(a, cbEl("br"));
  }
  cols.append(tokens, co, sim);
  root.append(cols);
}
