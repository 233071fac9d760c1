// The explorer page: lists graphs from the JSON API, draws one (layer on y, token position on x), prunes it live,
// shows feature dashboards, supernodes and perturbation results. Graph JSON files (circuit-tracer / Neuronpedia
// format) open too. Everything is served by `ct-ray serve`; nothing is fetched from elsewhere.
import { select } from "d3-selection";
import { scaleLinear } from "d3-scale";
import { setHTML } from "./html.js";
import { featureDetails, fmt, hint, nodeHead } from "./render.js";

const $ = (id) => document.getElementById(id);
const state = { info: null, graph: null, selected: new Set(), supernodes: [], featureCache: new Map() };

async function api(path, opts) {
  const r = await fetch(path, opts);
  const body = await r.json().catch(() => ({ error: r.statusText }));
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}
const qs = (o) => new URLSearchParams(Object.entries(o).filter(([, v]) => v !== "" && v != null)).toString();

// --- the list of graphs --------------------------------------------------------------------------------------
async function loadList() {
  const rows = await api("/api/graphs?" + qs({ sweep: $("sweep").value, q: $("q").value, status: $("status").value,
                                              min_completeness: $("min-completeness").value }));
  const ul = select($("graph-list"));
  ul.selectAll("li").remove();
  const li = ul.selectAll("li").data(rows).enter().append("li")
    .attr("class", (d) => "graph-item " + d.status).attr("data-key", (d) => d.key).attr("data-sweep", (d) => d.sweep_id)
    .on("click", (_, d) => { location.hash = qs({ sweep: d.sweep_id, key: d.key }); });
  li.append("div").text((d) => d.prompt);
  li.append("div").attr("class", "meta").text((d) => d.status === "ok"
    ? `${d.sweep_id} · → ${JSON.stringify(d.top_token_str)} p=${fmt(d.top_prob, 2)} · compl ${fmt(d.completeness_score_pruned, 2)} · ${d.n_nodes_pruned} nodes`
    : `${d.sweep_id} · error: ${d.error}`);
  $("graph-list").dataset.count = rows.length;
}

// --- graphs from the API or from a JSON file, normalised to one shape -------------------------------------------
function cumulative(nodes) {
  // share of the total influence of the nodes at least as influential (circuit-tracer's `influence`)
  const ranked = nodes.filter((n) => n.kind === "feature" || n.kind === "error");
  const tot = ranked.reduce((s, n) => s + Math.max(0, n.influence || 0), 0) || 1;
  let acc = 0;
  ranked.sort((a, b) => (b.influence || 0) - (a.influence || 0)).forEach((n) => {
    acc += Math.max(0, n.influence || 0); n.cum = acc / tot;
  });
}

function fromApi(g) {
  const m = g.meta;
  const nodes = g.nodes.map((n) => ({ id: n.node_id, idx: n.node, kind: n.kind, layer: n.layer, pos: n.position,
    feature: n.feature, act: n.activation, prob: n.probability, influence: n.influence,
    label: n.kind === "logit" ? `${JSON.stringify(n.token_str)} p=${fmt(n.probability, 2)}` : "" }));
  cumulative(nodes);
  const byIdx = new Map(nodes.map((n) => [n.idx, n]));
  const edges = g.edges.source.map((s, i) => ({ s: byIdx.get(s), t: byIdx.get(g.edges.target[i]), w: g.edges.weight[i] }))
    .filter((e) => e.s && e.t);
  return { source: "store", sweep: g.sweep_id, key: m.key, title: m.prompt, tokens: m.token_strs, nodes, edges,
           featuresId: g.features_id, supernodes: g.supernodes || [], meta: m };
}

function fromJson(j) {
  const md = j.metadata || {};
  const kinds = { "cross layer transcoder": "feature", "mlp reconstruction error": "error", embedding: "embedding", logit: "logit" };
  const nodes = (j.nodes || []).map((n) => {
    const kind = kinds[n.feature_type] || (String(n.node_id).startsWith("E") ? "embedding" : "feature");
    const layer = n.layer === "E" ? -1 : parseInt(n.layer, 10);
    const f = kind === "feature" && n.jsNodeId ? parseInt(String(n.jsNodeId).split("_")[1], 10) : -1;
    return { id: String(n.node_id), kind, layer, pos: n.ctx_idx, feature: f, act: n.activation, prob: n.token_prob,
             cum: kind === "feature" || kind === "error" ? (n.influence ?? 1) : undefined,
             label: kind === "logit" ? n.clerp || `p=${fmt(n.token_prob, 2)}` : "" };
  });
  const L = Math.max(0, ...nodes.filter((n) => n.kind !== "logit").map((n) => n.layer)) + 1;
  nodes.forEach((n) => { if (n.kind === "logit") n.layer = L; });
  const byId = new Map(nodes.map((n) => [n.id, n]));
  const edges = (j.links || []).map((l) => ({ s: byId.get(String(l.source)), t: byId.get(String(l.target)), w: l.weight }))
    .filter((e) => e.s && e.t);
  const sn = ((j.qParams || {}).supernodes || []).map((s) => ({ name: s[0], nodes: s.slice(1) }));
  return { source: "file", title: md.prompt || md.slug || "graph JSON", tokens: md.prompt_tokens || [], nodes, edges,
           supernodes: sn, featuresId: null };
}

// --- pruning in the browser ------------------------------------------------------------------------------------
function visible(g, nodeTh, edgeTh) {
  const vn = new Set(g.nodes.filter((n) => n.cum === undefined || nodeTh >= 1 || n.cum <= nodeTh + 1e-9));
  const cand = g.edges.filter((e) => vn.has(e.s) && vn.has(e.t)).sort((a, b) => Math.abs(b.w) - Math.abs(a.w));
  const tot = cand.reduce((s, e) => s + Math.abs(e.w), 0) || 1;
  let acc = 0;
  const ve = cand.filter((e) => { acc += Math.abs(e.w); return edgeTh >= 1 || acc / tot <= edgeTh + 1e-9; });
  return { nodes: [...vn], edges: ve };
}

// --- drawing ---------------------------------------------------------------------------------------------------
const COLORS = { feature: "#4e79a7", error: "#bab0ac", embedding: "#59a14f", logit: "#e15759" };
const kindClass = (k) => (Object.prototype.hasOwnProperty.call(COLORS, k) ? k : "other");  // a stored kind names no other CSS class

function draw() {
  const g = state.graph;
  if (!g) return;
  const nodeTh = +$("node-th").value, edgeTh = +$("edge-th").value;
  $("node-th-v").textContent = nodeTh.toFixed(2);
  $("edge-th-v").textContent = edgeTh.toFixed(2);
  const v = visible(g, nodeTh, edgeTh);
  const nPos = Math.max(g.tokens.length, ...g.nodes.map((n) => n.pos + 1));
  const layers = g.nodes.map((n) => n.layer);
  const lo = Math.min(-1, ...layers), hi = Math.max(...layers);
  const W = Math.max(700, nPos * 90), H = Math.max(420, (hi - lo + 1) * 24 + 130);
  const x = scaleLinear().domain([0, nPos]).range([50, W - 10]);
  const y = scaleLinear().domain([lo, hi]).range([H - 40, 100]);  // room above for the slanted logit labels
  // nodes of one (layer, position) cell side by side
  const cells = new Map();
  v.nodes.forEach((n) => { const k = n.layer + "/" + n.pos; (cells.get(k) || cells.set(k, []).get(k)).push(n); });
  cells.forEach((ns) => ns.sort((a, b) => (a.feature ?? 0) - (b.feature ?? 0)).forEach((n, i) => {
    const cw = x(1) - x(0);
    n.x = x(n.pos) + cw * (i + 1) / (ns.length + 1); n.y = y(n.layer);
  }));
  const svg = select($("graph")).attr("width", W).attr("height", H)
    .attr("data-nodes", v.nodes.length).attr("data-edges", v.edges.length)
    .attr("data-total-nodes", g.nodes.length).attr("data-total-edges", g.edges.length);
  svg.selectAll("*").remove();
  const axis = svg.append("g");
  g.tokens.forEach((t, i) => axis.append("text").attr("x", (x(i) + x(i + 1)) / 2).attr("y", H - 8)
    .attr("text-anchor", "middle").text(JSON.stringify(t)));
  for (let l = lo; l <= hi; l++) axis.append("text").attr("x", 2).attr("y", y(l) + 3).text(l === -1 ? "emb" : l === hi && g.nodes.some((n) => n.kind === "logit" && n.layer === hi) ? "logit" : "L" + l);
  const maxW = Math.max(1e-12, ...v.edges.map((e) => Math.abs(e.w)));
  svg.append("g").selectAll("line").data(v.edges).enter().append("line").attr("class", "edge")
    .attr("x1", (e) => e.s.x).attr("y1", (e) => e.s.y).attr("x2", (e) => e.t.x).attr("y2", (e) => e.t.y)
    .attr("stroke", (e) => (e.w >= 0 ? "#2166ac" : "#b2182b")).attr("stroke-opacity", 0.55)
    .attr("stroke-width", (e) => 0.3 + 4 * Math.abs(e.w) / maxW);
  const inSn = new Set(state.supernodes.flatMap((s) => s.nodes));
  const gn = svg.append("g").selectAll("g").data(v.nodes).enter().append("g")
    .attr("class", (n) => `node ${kindClass(n.kind)}` + (state.selected.has(n.id) ? " selected" : "") + (inSn.has(n.id) ? " in-sn" : ""))
    .attr("data-id", (n) => n.id).attr("data-cum", (n) => n.cum ?? "").attr("transform", (n) => `translate(${n.x},${n.y})`)
    .on("mouseenter", (_, n) => showNode(n)).on("click", (_, n) => { toggle(n); showNode(n); });
  gn.each(function (n) {
    const el = select(this);
    if (n.kind === "feature") el.append("circle").attr("r", 5);
    else el.append("rect").attr("x", -5).attr("y", -5).attr("width", 10).attr("height", 10)
      .attr("transform", n.kind === "logit" ? "rotate(45)" : null);
    el.select(":first-child").attr("fill", COLORS[kindClass(n.kind)] || "#999").attr("stroke", "#333").attr("stroke-width", 0.5);
    el.append("title").text(`${n.id} (${n.kind}) act=${fmt(n.act)}` + (n.kind === "logit" ? ` p=${fmt(n.prob)}` : ""));
    if (n.label) el.append("text").attr("transform", n.kind === "logit" ? "translate(3,-8) rotate(-50)" : "translate(7,12)").text(n.label);
  });
  $("counts").textContent = `${v.nodes.length}/${g.nodes.length} nodes, ${v.edges.length}/${g.edges.length} edges`;
}

// --- details: feature dashboards (markup built in render.js, every stored string escaped) -------------------------
async function showNode(n) {
  const box = $("feature");
  const head = nodeHead(n);
  box.dataset.node = n.id;
  if (n.kind !== "feature" || !state.graph.featuresId) {
    setHTML(box, n.kind === "feature" ? hint(head, "no feature dashboards for this CLT (run ct-ray features)") : head);
    return;
  }
  const key = `${state.graph.featuresId}/${n.layer}/${n.feature}`;
  let d = state.featureCache.get(key);
  if (!d) {
    try {
      d = await api("/api/feature?" + qs({ clt_id: state.graph.featuresId, layer: n.layer, feature: n.feature }));
    } catch (e) { d = { error: e.message }; }
    state.featureCache.set(key, d);
  }
  if (box.dataset.node !== n.id) return;  // the pointer moved on meanwhile
  setHTML(box, d.error ? hint(head, d.error) : featureDetails(head, d));
}

// --- supernodes ------------------------------------------------------------------------------------------------
function toggle(n) {
  state.selected.has(n.id) ? state.selected.delete(n.id) : state.selected.add(n.id);
  $("selection").textContent = `selected: ${state.selected.size}`;
  draw();
}

function renderSupernodes() {
  const ul = select($("sn-list"));
  ul.selectAll("li").remove();
  const li = ul.selectAll("li").data(state.supernodes).enter().append("li").attr("class", "sn");
  li.append("span").text((s) => `${s.name} (${s.nodes.length})`);
  li.append("button").text("×").on("click", (_, s) => { state.supernodes = state.supernodes.filter((x) => x !== s); renderSupernodes(); draw(); });
  const g = state.graph;
  $("sn-save").disabled = !(g && g.source === "store" && state.info.writable);
  $("sn-save").title = g && g.source === "store" ? (state.info.writable ? "" : "read-only server (start it with --allow-write)") : "graphs from files are not saved";
}

function addSupernode() {
  const name = $("sn-name").value.trim();
  if (!name || !state.selected.size) { $("sn-status").textContent = "select nodes and give a name"; return; }
  // a node belongs to one group: it moves to the new one; a group left empty goes
  const nodes = [...state.selected];
  state.supernodes = state.supernodes.filter((s) => s.name !== name)
    .map((s) => ({ ...s, nodes: s.nodes.filter((id) => !state.selected.has(id)) })).filter((s) => s.nodes.length)
    .concat([{ name, nodes }]);
  state.selected.clear();
  $("selection").textContent = "selected: 0";
  $("sn-name").value = "";
  renderSupernodes(); draw();
}

async function saveSupernodes() {
  const g = state.graph;
  try {
    await api("/api/supernodes?" + qs({ sweep: g.sweep, key: g.key }), { method: "PUT",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify({ supernodes: state.supernodes }) });
    $("sn-status").textContent = "saved";
  } catch (e) { $("sn-status").textContent = "not saved: " + e.message; }
}

// --- perturbations ---------------------------------------------------------------------------------------------
async function loadPerturbations(g) {
  const rows = g.source === "store" ? await api("/api/perturbations?" + qs({ sweep: g.sweep, key: g.key })) : [];
  const pts = rows.filter((r) => r.status === "ok" && r.predicted_delta != null && r.measured_delta != null);
  const svg = select($("pert-plot")).attr("data-points", pts.length);
  svg.selectAll("*").remove();
  if (!pts.length) { $("pert-summary").textContent = rows.length ? "no measured rows" : "no perturbation rows"; return; }
  const ext = Math.max(1e-9, ...pts.flatMap((p) => [Math.abs(p.predicted_delta), Math.abs(p.measured_delta)]));
  const x = scaleLinear().domain([-ext, ext]).range([30, 310]), y = scaleLinear().domain([-ext, ext]).range([220, 10]);
  svg.append("line").attr("x1", x(-ext)).attr("y1", y(-ext)).attr("x2", x(ext)).attr("y2", y(ext)).attr("stroke", "#aaa").attr("stroke-dasharray", "3 3");
  svg.append("line").attr("x1", x(0)).attr("y1", y(-ext)).attr("x2", x(0)).attr("y2", y(ext)).attr("stroke", "#eee");
  svg.append("line").attr("x1", x(-ext)).attr("y1", y(0)).attr("x2", x(ext)).attr("y2", y(0)).attr("stroke", "#eee");
  svg.selectAll("circle").data(pts).enter().append("circle").attr("r", 3).attr("fill", "#4e79a7").attr("fill-opacity", 0.7)
    .attr("cx", (p) => x(p.predicted_delta)).attr("cy", (p) => y(p.measured_delta))
    .append("title").text((p) => `${p.node_id} ${p.op} ${p.value} → ${p.target_id}: predicted ${fmt(p.predicted_delta)}, measured ${fmt(p.measured_delta)}`);
  svg.append("text").attr("x", 170).attr("y", 238).attr("font-size", 10).text("predicted Δ");
  svg.append("text").attr("x", 2).attr("y", 10).attr("font-size", 10).text("measured Δ");
  const agree = pts.filter((p) => Math.sign(p.predicted_delta) === Math.sign(p.measured_delta)).length;
  $("pert-summary").textContent = `${pts.length} measured changes, sign agreement ${(100 * agree / pts.length).toFixed(0)}%`;
}

// --- opening graphs --------------------------------------------------------------------------------------------
function show(g) {
  state.graph = g; state.selected.clear(); state.supernodes = g.supernodes.map((s) => ({ ...s }));
  $("selection").textContent = "selected: 0";
  $("title").textContent = g.source === "store"
    ? `${g.title} → ${JSON.stringify(g.meta.top_token_str)} (p=${fmt(g.meta.top_prob, 2)}) · completeness ${fmt(g.meta.completeness_score_pruned, 3)} · replacement ${fmt(g.meta.replacement_score_pruned, 3)}`
    : `${g.title} (file)`;
  document.querySelectorAll("#graph-list li").forEach((li) => li.classList.toggle("active", li.dataset.key === g.key));
  renderSupernodes(); draw();
  loadPerturbations(g).catch((e) => { $("pert-summary").textContent = e.message; });
}

async function openFromHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  if (!h.get("sweep") || !h.get("key")) return;
  try {
    show(fromApi(await api("/api/graph?" + qs({ sweep: h.get("sweep"), key: h.get("key") }))));
  } catch (e) { $("title").textContent = "cannot open graph: " + e.message; }
}

async function openJsonText(text) {
  try { show(fromJson(JSON.parse(text))); } catch (e) { $("title").textContent = "not a graph JSON file: " + e.message; }
}

async function init() {
  state.info = await api("/api/info");
  $("store").textContent = state.info.store;
  $("mode").textContent = state.info.writable ? "read-write" : "read-only";
  document.body.dataset.writable = state.info.writable;
  for (const s of await api("/api/sweeps")) select($("sweep")).append("option").attr("value", s.sweep_id).text(`${s.sweep_id} (${s.ok}/${s.graphs})`);
  ["sweep", "status", "min-completeness"].forEach((id) => $(id).addEventListener("change", loadList));
  $("q").addEventListener("input", loadList);
  ["node-th", "edge-th"].forEach((id) => $(id).addEventListener("input", draw));
  $("sn-add").addEventListener("click", addSupernode);
  $("sn-save").addEventListener("click", saveSupernodes);
  $("file").addEventListener("change", (ev) => { const f = ev.target.files[0]; if (f) f.text().then(openJsonText); });
  if (state.info.graph_json) {
    $("served-json").hidden = false;
    $("served-json").addEventListener("click", () => fetch("/api/graph-json").then((r) => r.text()).then(openJsonText));
  }
  window.addEventListener("hashchange", openFromHash);
  await loadList();
  await openFromHash();
  document.body.dataset.ready = "1";
}

init().catch((e) => { $("title").textContent = "explorer failed to start: " + e.message; });
