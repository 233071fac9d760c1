// Drawing one attribution graph into a given <svg>: token positions on x, layers on y (embeddings at the bottom,
// logits at the top), edges by |weight|. Used by the graph view and by both panes of the diff view. Pruning by
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

export function visible(g, nodeTh, edgeTh) {
  const vn = new Set(g.nodes.filter((n) => n.cum === undefined || nodeTh >= 1 || n.cum <= nodeTh + 1e-9));
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
  const v = visible(g, nodeTh, edgeTh);
  const nPos = Math.max(g.tokens.length, ...g.nodes.map((n) => n.pos + 1));
  const layers = g.nodes.map((n) => n.layer);
  const lo = Math.min(-1, ...layers), hi = Math.max(...layers);
  const W = Math.max(o.minWidth ?? 700, nPos * (o.posWidth ?? 90)), H = Math.max(420, (hi - lo + 1) * 24 + 130);
  const x = scaleLinear().domain([0, nPos]).range([50, W - 10]);
  const y = scaleLinear().domain([lo, hi]).range([H - 40, 100]);  // room above for the slanted logit labels
  // nodes of one (layer, position) cell side by side
  const cells = new Map();
  v.nodes.forEach((n) => { const k = n.layer + "/" + n.pos; (cells.get(k) || cells.set(k, []).get(k)).push(n); });
  cells.forEach((ns) => ns.sort((a, b) => (a.feature ?? 0) - (b.feature ?? 0)).forEach((n, i) => {
    const cw = x(1) - x(0);
    n.x = x(n.pos) + cw * (i + 1) / (ns.length + 1); n.y = y(n.layer);
  }));
  const svg = select(svgEl)
    .attr("data-nodes", v.nodes.length).attr("data-edges", v.edges.length)
    .attr("data-total-nodes", g.nodes.length).attr("data-total-edges", g.edges.length)
    .classed("grouped", groupOf.size > 0);
  if (o.fit) svg.attr("viewBox", `0 0 ${W} ${H}`).attr("width", "100%").attr("height", null);
  else svg.attr("viewBox", null).attr("width", W).attr("height", H);
  svg.selectAll("*").remove();
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
    if (n.label) el.append("text").attr("transform", n.kind === "logit" ? "translate(3,-8) rotate(-50)" : "translate(7,12)").text(n.label);
  });
  return v;
}
