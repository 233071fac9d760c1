// Attention attribution in the graph view (tables edge_heads and qk_attributions, docs/explorer.md): a selected
// edge's head loadings and a selected node's explained attention scores (QK). The normalisers attach the API's
// rows to the graph's edges and nodes; the panels are markup built with `html` (every stored string escaped).
import { html } from "./html.js";
import { fmt } from "./render.js";

// +0.123 / -0.123: loadings and terms are signed
export const signed = (x, d = 3) => (x == null ? "–" : (x >= 0 ? "+" : "") + Number(x).toFixed(d));

// layer -1 marks the rows that are no head: head -1 the residual path, head -2 the heads not listed, summed
export const headLabel = (layer, head) => (layer >= 0 ? `L${layer}.H${head}` : head === -2 ? "other heads" : "residual path");

// edge_heads columns (source, target: `node` values) -> `heads` ([{layer, head, w}]) on the edges; how many attached
export function attachHeads(edges, cols) {
  if (!cols || !cols.source || !cols.source.length) return 0;
  const byPair = new Map(edges.map((e) => [`${e.s.idx}>${e.t.idx}`, e]));
  let n = 0;
  cols.source.forEach((s, i) => {
    const e = byPair.get(`${s}>${cols.target[i]}`);
    if (!e) return;
    (e.heads || (e.heads = [])).push({ layer: cols.layer[i], head: cols.head[i], w: cols.weight[i] });
    n++;
  });
  return n;
}

// a graph JSON link's `heads` ([[layer, head, weight], ...], what `ct-ray attribute --heads --out` writes)
export const linkHeads = (l) => (Array.isArray(l.heads) && l.heads.length
  ? l.heads.filter((h) => Array.isArray(h) && h.length >= 3).map(([layer, head, w]) => ({ layer, head, w })) : undefined);

// qk rows (API) -> Map node id -> the scores explained at that node, each with its pair / query / key terms by rank
export function groupQK(rows, byIdx) {
  const out = new Map(), byScore = new Map();
  for (const r of rows || []) {
    const n = byIdx.get(r.target);
    if (!n || !["pair", "query", "key"].includes(r.role)) continue;
    const k = `${r.target}/${r.layer}/${r.head}/${r.query_position}/${r.key_position}`;
    let s = byScore.get(k);
    if (!s) {
      s = { layer: r.layer, head: r.head, q: r.query_position, k: r.key_position, score: r.score, pattern: r.pattern,
            pair: [], query: [], key: [] };
      byScore.set(k, s);
      (out.get(n.id) || out.set(n.id, []).get(n.id)).push(s);
    }
    s[r.role].push({ q: r.query_source, k: r.key_source, w: r.weight, rank: r.rank });
  }
  const byRank = (a, b) => (a.rank ?? 0) - (b.rank ?? 0) || Math.abs(b.w) - Math.abs(a.w);
  out.forEach((list) => {
    list.sort((a, b) => a.layer - b.layer || a.head - b.head || a.q - b.q || a.k - b.k);
    list.forEach((s) => ["pair", "query", "key"].forEach((role) => s[role].sort(byRank)));
  });
  return out;
}

const tokAt = (g, p) => `${g.tokens[p] != null ? JSON.stringify(g.tokens[p]) : "?"}@${p}`;

// a node in words: "L3 #42 "cat"@2", "L1 error "on"@4", "emb "the"@5", a logit's token
export function nodeName(n, g) {
  if (n.kind === "feature") return `L${n.layer} #${n.feature} ${tokAt(g, n.pos)}`;
  if (n.kind === "error") return `L${n.layer} error ${tokAt(g, n.pos)}`;
  if (n.kind === "embedding") return `emb ${tokAt(g, n.pos)}`;
  if (n.kind === "logit") return `logit ${n.label || n.id}`;
  return n.id;
}

const bar = (w, max) => html`<span class="lbar ${w >= 0 ? "pos" : "neg"}" style="width:${
  (100 * Math.min(1, Math.abs(w) / max)).toFixed(1)}%"></span>`;
const maxAbs = (xs) => Math.max(1e-12, ...xs.map((x) => Math.abs(x.w)));
const close = html`<button class="close" title="close">×</button>`;

export function edgeHeadsPanel(e, g) {
  const hs = [...(e.heads || [])].sort((a, b) => Math.abs(b.w) - Math.abs(a.w));
  const head = html`<h3>${close}Head loadings <small>${e.s.id} → ${e.t.id}</small></h3><div class="stats">${
    nodeName(e.s, g)} → ${nodeName(e.t, g)} · edge weight ${signed(e.w)}</div>`;
  if (!hs.length) return html`${head}<p class="hint">no head loadings for this edge</p>`;
  const max = maxAbs(hs), sum = hs.reduce((a, h) => a + h.w, 0);
  const n = hs.filter((h) => h.layer >= 0).length;
  return html`${head}<table id="head-loadings" class="loadings" data-count="${hs.length}">${hs.map((h) => html`<tr class="load" data-layer="${
    h.layer}" data-head="${h.head}"><td class="lbl">${headLabel(h.layer, h.head)}</td><td class="num">${signed(h.w)}</td><td class="barcell">${
    bar(h.w, max)}</td></tr>`)}</table><div class="hint">${n} head${n === 1 ? "" : "s"} listed, by |weight|; the rows sum to ${
    signed(sum)}, the edge's weight</div>`;
}

export function qkPanel(n, scores, g) {
  const byId = g.byId || new Map(g.nodes.map((x) => [x.id, x]));
  const src = (id) => {
    if (id == null) return "";
    if (id === "bias") return html`<span class="src bias" title="the constant terms (biases)">bias</span>`;
    const m = byId.get(id);
    return m ? html`<span class="src in-graph" data-node="${id}" title="${id}">${nodeName(m, g)} <small>${id}</small></span>`
      : html`<span class="src off-graph" data-node="${id}" title="not a node of the pruned graph">${id}</span>`;
  };
  const terms = (cls, list, cell) => {
    if (!list.length) return html`<p class="hint">none</p>`;
    const max = maxAbs(list);
    return html`<table class="loadings ${cls}" data-count="${list.length}">${list.map((t) => html`<tr><td class="lbl">${
      cell(t)}</td><td class="num">${signed(t.w)}</td><td class="barcell">${bar(t.w, max)}</td></tr>`)}</table>`;
  };
  // one score per fold, the first open
  const one = (s, i) => html`<details class="qk-score" data-layer="${s.layer}" data-head="${s.head}" data-q="${s.q}" data-k="${
    s.k}"${i === 0 ? html` open` : ""}><summary class="qk-title"><b>L${s.layer}.H${s.head}</b> ${tokAt(g, s.q)} → ${tokAt(g, s.k)} · score ${
    fmt(s.score)} · attention ${fmt(s.pattern)}</summary><h5>Top pairs <small>(query × key)</small></h5>${
    terms("qk-pairs", s.pair, (t) => html`${src(t.q)} × ${src(t.k)}`)}<h5>Query side</h5>${
    terms("qk-query", s.query, (t) => src(t.q))}<h5>Key side</h5>${terms("qk-key", s.key, (t) => src(t.k))}</details>`;
  return html`<h3>${close}QK <small>${n.id}</small></h3><div class="stats">${nodeName(n, g)} · ${scores.length} attention score${
    scores.length === 1 ? "" : "s"} of the heads carrying its inputs, each split into terms of its sources (they sum to the pre-softmax score); grey: not in the pruned graph</div><div id="qk-scores" data-count="${
    scores.length}">${scores.map(one)}</div>`;
}
