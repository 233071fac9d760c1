// Drawing one attribution graph into a given <svg>: token positions on x, layers on y (embeddings at the bottom,
// logits at the top, their labels in rows above them that never overlap), edges by |weight|. Used by the graph view and by both panes of the diff view. Pruning by
// node / edge threshold happens here too (`visible`), in the browser.
import { select } from "d3-selection";
import { scaleLinear } from "d3-scale";
import { fmt } from "./render.js";

export const COLORS = { feature: "#4e79a7", error: "#bab0ac", embedding: "#59a14f", logit: "#e15759" };
// a stored kind names no other CSS class
export const kindClass = (k) => (Object.prototype.hasOwnProperty.call(COLORS, k) ? k : "other");
// automatic supernode groups, by rank (the palette repeats past its length)
export const GROUP_COLORS = ["#e6194b", "#3cb44b", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#469990",
  "#9a6324", "#800000", "#808000", "#000075", "#ffe119", "#4363d8", "#a9a9a9"];
export const groupColor = (i) => GROUP_COLORS[i % GROUP_COLORS.length];

// Nodes up to `nodeTh`: with `before` (the share of the more influential nodes, graphs of the store) ct_ray's pruning
// rule, the smallest most influential set whose share reaches it; else (graph JSON files) the viewers' rule, cumulative
// influence at most it. Nodes in `keep` (selected, in a supernode) always show, as the viewers show pinned ones.
export function visible(g, nodeTh, edgeTh, keep = new Set()) {
  const vn = new Set(g.nodes.filter((n) => n.cum === undefined || nodeTh >= 1 || keep.has(n.id)
    || (n.before !== undefined ? n.before < nodeTh - 1e-9 : n.cum <= nodeTh + 1e-9)));
  const cand = g.edges.filter((e) => vn.has(e.s) && vn.has(e.t)).sort((a, b) => Math.abs(b.w) - Math.abs(a.w));
  const tot = cand.reduce((s, e) => s + Math.abs(e.w), 0) || 1;
  let acc = 0;
  const ve = cand.filter((e) => { acc += Math.abs(e.w); return edgeTh >= 1 || acc / tot <= edgeTh + 1e-9; });
  return { nodes: [...vn], edges: ve };
}

// o: nodeTh, edgeTh; selected, inSn, mark (Sets of node ids: selected, in a hand-made supernode, marked by the
// caller, e.g. "only in this graph" in a diff); groupOf (Map node id -> automatic group rank); onHover, onClick;
// onEdgeClick (edges selectable: a wider invisible line over each takes the click), selectedEdge (highlighted);
// qkNodes (Set of node ids with explained attention scores: ringed); fit (scale the drawing to the svg's box instead of drawing it at its natural size); posWidth, minWidth (pixels
// per token position and in all, before any fitting).
export function drawGraph(svgEl, g, o = {}) {
  const nodeTh = o.nodeTh ?? 1, edgeTh = o.edgeTh ?? 1;
  const selected = o.selected || new Set(), inSn = o.inSn || new Set(), mark = o.mark || new Set();
  const groupOf = o.groupOf || new Map(), qkNodes = o.qkNodes || new Set();
  const v = visible(g, nodeTh, edgeTh, new Set([...selected, ...inSn]));
  const nPos = Math.max(g.tokens.length, ...g.nodes.map((n) => n.pos + 1));
  const layers = g.nodes.map((n) => n.layer);
  const lo = Math.min(-1, ...layers), hi = Math.max(...layers);
  const GW = Math.max(o.minWidth ?? 700, nPos * (o.posWidth ?? 90));
  const x = scaleLinear().domain([0, nPos]).range([50, GW - 10]);
  // nodes of one (layer, position) cell side by side; logits by probability, the likeliest leftmost
  const cells = new Map();
  v.nodes.forEach((n) => { const k = n.layer + "/" + n.pos; (cells.get(k) || cells.set(k, []).get(k)).push(n); });
  const order = (a, b) => (a.kind === "logit" && b.kind === "logit" ? (b.prob ?? 0) - (a.prob ?? 0) : (a.feature ?? 0) - (b.feature ?? 0));
  cells.forEach((ns) => ns.sort(order).forEach((n, i) => {
    const cw = x(1) - x(0);
    n.x = x(n.pos) + cw * (i + 1) / (ns.length + 1);
  }));
  const svg = select(svgEl);
  svg.selectAll("*").remove();
  const labels = layoutLogitLabels(svg, v.nodes.filter((n) => n.kind === "logit" && n.label), x);
  const top = Math.max(40, 24 + labels.rows * LABEL_ROW);  // room above the logits for their labels
  const W = Math.max(GW, labels.right + 6), H = Math.max(420, (hi - lo + 1) * 24 + 30 + top);
  const y = scaleLinear().domain([lo, hi]).range([H - 40, top]);
  v.nodes.forEach((n) => { n.y = y(n.layer); });
  svg.attr("data-nodes", v.nodes.length).attr("data-edges", v.edges.length)
    .attr("data-total-nodes", g.nodes.length).attr("data-total-edges", g.edges.length)
    .classed("grouped", groupOf.size > 0);
  if (o.fit) svg.attr("viewBox", `0 0 ${W} ${H}`).attr("width", "100%").attr("height", null);
  else svg.attr("viewBox", null).attr("width", W).attr("height", H);
  const axis = svg.append("g");
  g.tokens.forEach((t, i) => axis.append("text").attr("x", (x(i) + x(i + 1)) / 2).attr("y", H - 8)
    .attr("text-anchor", "middle").text(JSON.stringify(t)));
  const logitTop = g.nodes.some((n) => n.kind === "logit" && n.layer === hi);
  for (let l = lo; l <= hi; l++) axis.append("text").attr("x", 2).attr("y", y(l) + 3).text(l === -1 ? "emb" : l === hi && logitTop ? "logit" : "L" + l);
  const maxW = Math.max(1e-12, ...v.edges.map((e) => Math.abs(e.w)));
  const ends = (sel) => sel.attr("x1", (e) => e.s.x).attr("y1", (e) => e.s.y).attr("x2", (e) => e.t.x).attr("y2", (e) => e.t.y)
    .attr("data-s", (e) => e.s.id).attr("data-t", (e) => e.t.id);
  svg.append("g").selectAll("line").data(v.edges).enter().append("line")
    .attr("class", (e) => (e === o.selectedEdge ? "edge selected" : "edge")).call(ends)
    .attr("stroke", (e) => (e.w >= 0 ? "#2166ac" : "#b2182b")).attr("stroke-opacity", 0.55)
    .attr("stroke-width", (e) => 0.3 + 4 * Math.abs(e.w) / maxW);
  if (o.onEdgeClick) {
    svg.append("g").selectAll("line").data(v.edges).enter().append("line").attr("class", "edge-hit").call(ends)
      .on("click", (_, e) => o.onEdgeClick(e))
      .append("title").text((e) => `${e.s.id} → ${e.t.id}: ${fmt(e.w)} (click: head loadings)`);
  }
  const cls = (n) => `node ${kindClass(n.kind)}` + (selected.has(n.id) ? " selected" : "") + (inSn.has(n.id) ? " in-sn" : "")
    + (groupOf.has(n.id) ? " auto-member" : "") + (mark.has(n.id) ? " marked" : "") + (qkNodes.has(n.id) ? " has-qk" : "");
  const gn = svg.append("g").selectAll("g").data(v.nodes).enter().append("g")
    .attr("class", cls).attr("data-id", (n) => n.id).attr("data-cum", (n) => n.cum ?? "")
    .attr("data-group", (n) => (groupOf.has(n.id) ? groupOf.get(n.id) : null))
    .attr("transform", (n) => `translate(${n.x},${n.y})`)
    .on("mouseenter", (_, n) => o.onHover && o.onHover(n)).on("click", (_, n) => o.onClick && o.onClick(n));
  gn.each(function (n) {
    const el = select(this);
    if (n.kind === "feature") el.append("circle").attr("r", 5);
    else el.append("rect").attr("x", -5).attr("y", -5).attr("width", 10).attr("height", 10)
      .attr("transform", n.kind === "logit" ? "rotate(45)" : null);
    const gi = groupOf.get(n.id);
    el.select(":first-child").attr("fill", gi !== undefined ? groupColor(gi) : COLORS[kindClass(n.kind)] || "#999")
      .attr("stroke", "#333").attr("stroke-width", 0.5);
    if (gi !== undefined) el.append("circle").attr("class", "auto-ring").attr("r", 8.5).attr("fill", "none").attr("stroke", groupColor(gi));
    if (mark.has(n.id)) el.append("circle").attr("class", "mark-ring").attr("r", 9).attr("fill", "none");
    if (qkNodes.has(n.id)) el.append("circle").attr("class", "qk-ring").attr("r", 7.5).attr("fill", "none");
    el.append("title").text(`${n.id} (${n.kind}) act=${fmt(n.act)}` + (n.kind === "logit" ? ` p=${fmt(n.prob)}` : "")
      + (o.groupName && gi !== undefined ? ` · ${o.groupName(gi)}` : "") + (qkNodes.has(n.id) ? " · QK: click" : ""));
    if (n.label && n.kind !== "logit") el.append("text").attr("transform", "translate(7,12)").text(n.label);
  });
  drawLogitLabels(svg, labels, o);
  return v;
}

// --- logit labels ----------------------------------------------------------------------------------------------
// A logit's label is its token (truncated past LABEL_CHARS, the whole text in a tooltip) and probability, written
// level in rows above the logit row: each starts right of its position's cell and takes the lowest row where it
// overlaps no label already placed, the rightmost logit first, so the labels of one position stack into a column
// (likeliest on top) and a leader line joins each to its node without crossing another.
export const LABEL_CHARS = 16;
const LABEL_ROW = 13, LABEL_GAP = 8;
export const truncate = (s, n = LABEL_CHARS) => (s.length > n ? s.slice(0, n - 1) + "…" : s);

function layoutLogitLabels(svg, logits, x) {
  const probe = svg.append("text").attr("class", "label-probe").attr("visibility", "hidden");
  const items = logits.map((n) => {
    const text = `${truncate(n.label)} ${fmt(n.prob, 2)}`;
    const w = probe.text(text).node().getComputedTextLength() || 6 * text.length;  // an estimate when not laid out
    return { n, text, full: `${n.label} p=${fmt(n.prob, 3)} (${n.id})`, x0: x(n.pos + 1) + LABEL_GAP, w };
  });
  probe.remove();
  const rows = [];  // per row: the [from, to] spans taken
  items.sort((a, b) => b.n.x - a.n.x || a.n.id.localeCompare(b.n.id)).forEach((it) => {
    const span = [it.x0, it.x0 + it.w];
    let r = rows.findIndex((spans) => spans.every(([a, b]) => span[1] + 4 <= a || span[0] >= b + 4));
    if (r < 0) { r = rows.length; rows.push([]); }
    rows[r].push(span);
    it.row = r;
  });
  return { items, rows: rows.length, right: Math.max(0, ...items.map((it) => it.x0 + it.w)) };
}

function drawLogitLabels(svg, labels, o) {
  if (!labels.items.length) return;
  const base = (it) => it.n.y - 14 - it.row * LABEL_ROW;  // the text's baseline
  const gl = svg.append("g").attr("class", "logit-labels").selectAll("g").data(labels.items).enter().append("g")
    .attr("class", "logit-label").attr("data-id", (it) => it.n.id).attr("data-row", (it) => it.row)
    .on("mouseenter", (_, it) => o.onHover && o.onHover(it.n)).on("click", (_, it) => o.onClick && o.onClick(it.n));
  gl.append("line").attr("class", "leader").attr("x1", (it) => it.n.x).attr("y1", (it) => it.n.y - 6)
    .attr("x2", (it) => it.x0 - 2).attr("y2", (it) => base(it) - 3);
  gl.append("text").attr("x", (it) => it.x0).attr("y", base).text((it) => it.text)
    .append("title").text((it) => it.full);
}
