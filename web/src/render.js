// The node details panel as markup: a node's head line and a feature's dashboard (top contexts, quantile samples).
// Every value comes from the store or a graph file and goes through `html`, which escapes it.
import { html } from "./html.js";

export const fmt = (x, d = 3) => (x == null ? "–" : Number(x).toFixed(d));

export function nodeHead(n) {
  const where = n.kind === "feature" ? ` L${n.layer} #${n.feature}` : "";
  return html`<h3>${n.id} <small>${n.kind}${where}</small></h3><div class="stats">activation ${fmt(n.act)}${
    n.kind === "logit" ? `, p=${fmt(n.prob)}` : ""}${n.cum !== undefined ? `, cumulative influence ${fmt(n.cum, 2)}` : ""}</div>`;
}

export const hint = (head, msg) => html`${head}<p class="hint">${msg}</p>`;

function tokens(c, max) {
  return (c.tokens || []).map((t, i) => {
    const a = (c.acts || [])[i] || 0, alpha = max > 0 ? Math.min(1, Math.max(0, a) / max) : 0;
    const cls = c.start + i === c.position ? "tok max" : "tok";
    return html`<span class="${cls}" style="background:rgba(255,140,0,${alpha.toFixed(3)})" title="${fmt(a)}">${t}</span>`;
  });
}

function context(c, max) {
  const q = c.quantile != null ? html`<span class="q">q${fmt(c.quantile, 2)}</span>` : "";
  return html`<div class="ctx">${q}<span class="q">${fmt(c.activation, 2)}</span>${tokens(c, max)}</div>`;
}

export function featureDetails(head, d) {
  const top = d.top_contexts || [], qs = d.quantile_samples || [], m = d.max_activation;
  const stats = html`<div class="stats">density ${(100 * d.density).toPrecision(3)}% · mean when active ${
    fmt(d.mean_activation)} · max ${fmt(m)} · ${d.n_tokens} tokens</div>`;
  return html`${head}${stats}<h4>Top activating contexts</h4><div id="top-contexts" data-count="${top.length}">${
    top.map((c) => context(c, m))}</div><h4>Quantile samples</h4><div id="quantile-samples">${
    qs.map((c) => context(c, m))}</div>`;
}
