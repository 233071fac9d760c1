// The explorer page: lists graphs from the JSON API, draws one (layer on y, token position on x), prunes it live,
// shows feature dashboards, supernodes (hand-made and automatic), perturbation results and, when the sweep computed
// attention attribution, a selected edge's head loadings and a selected node's QK terms (attention.js). Graph JSON files
// (circuit-tracer / Neuronpedia format) open too. Two more views: a sweep's overview (#overview=SWEEP: score
// histograms, recurring features and paths) and one prompt's graphs of two sweeps side by side (#diff=1&a=&b=&key_a=).
// Everything is served by `ct-ray serve`; nothing is fetched from elsewhere.
import { select } from "d3-selection";
import { scaleLinear } from "d3-scale";
import { html, setHTML } from "./html.js";
import { featureDetails, fmt, hint, nodeHead } from "./render.js";
import { drawGraph, groupColor } from "./draw.js";
import { hashOf, renderOverview } from "./overview.js";
import { onlyIn, renderDiffSummary } from "./diff.js";
import { attachHeads, edgeHeadsPanel, groupQK, linkHeads, qkPanel } from "./attention.js";
import { renderPerturbations } from "./perturb.js";

const $ = (id) => document.getElementById(id);
const state = { info: null, sweeps: [], graph: null, selected: new Set(), supernodes: [], featureCache: new Map(),
                auto: null, diff: null, edge: null, qkNode: null, th: { node: 1, edge: 1 } };

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
  // share of the total influence of the nodes at least as influential (circuit-tracer's `influence`; `before`: of
  // the more influential ones, for ct_ray's pruning rule in draw.js `visible`)
  const ranked = nodes.filter((n) => n.kind === "feature" || n.kind === "error");
  const tot = ranked.reduce((s, n) => s + Math.max(0, n.influence || 0), 0) || 1;
  let acc = 0;
  ranked.sort((a, b) => (b.influence || 0) - (a.influence || 0)).forEach((n) => {
    n.before = acc / tot; acc += Math.max(0, n.influence || 0); n.cum = acc / tot;
  });
}

// where a graph's sliders open: the thresholds it was pruned with, else PruneSpec's defaults (from /api/info)
function thresholds(node, edge) {
  const d = state.info.prune_defaults || { node_threshold: 0.8, edge_threshold: 0.98 };
  const ok = (t) => typeof t === "number" && t >= 0 && t <= 1;
  return { node: ok(node) ? node : d.node_threshold, edge: ok(edge) ? edge : d.edge_threshold };
}

function fromApi(g) {
  const m = g.meta;
  const nodes = g.nodes.map((n) => ({ id: n.node_id, idx: n.node, kind: n.kind, layer: n.layer, pos: n.position,
    feature: n.feature, act: n.activation, prob: n.probability, influence: n.influence,
    label: n.kind === "logit" ? JSON.stringify(n.token_str ?? "") : "" }));
  cumulative(nodes);
  const byIdx = new Map(nodes.map((n) => [n.idx, n]));
  const edges = g.edges.source.map((s, i) => ({ s: byIdx.get(s), t: byIdx.get(g.edges.target[i]), w: g.edges.weight[i] }))
    .filter((e) => e.s && e.t);
  const hasHeads = attachHeads(edges, g.edge_heads) > 0;
  const p = g.pruning || {};
  return { source: "store", sweep: g.sweep_id, key: m.key, title: m.prompt, tokens: m.token_strs || [], nodes, edges,
           featuresId: g.features_id, supernodes: g.supernodes || [], meta: m, hasHeads, qk: groupQK(g.qk, byIdx),
           th: thresholds(p.node_threshold, p.edge_threshold) };
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
             label: kind === "logit" ? logitLabel(n.clerp) : "" };
  });
  const L = Math.max(0, ...nodes.filter((n) => n.kind !== "logit").map((n) => n.layer)) + 1;
  nodes.forEach((n) => { if (n.kind === "logit") n.layer = L; });
  const byId = new Map(nodes.map((n) => [n.id, n]));
  const edges = (j.links || []).map((l) => ({ s: byId.get(String(l.source)), t: byId.get(String(l.target)), w: l.weight,
    heads: linkHeads(l) })).filter((e) => e.s && e.t);
  const sn = ((j.qParams || {}).supernodes || []).map((s) => ({ name: s[0], nodes: s.slice(1) }));
  // head loadings of the links are shown; the file's qk_tracing_results are not (they no longer say which score)
  // the viewers' slider starts at metadata.node_threshold; the edges' at the threshold the file was pruned with
  return { source: "file", title: md.prompt || md.slug || "graph JSON", tokens: md.prompt_tokens || [], nodes, edges,
           supernodes: sn, featuresId: null, hasHeads: edges.some((e) => e.heads), qk: new Map(),
           th: thresholds(md.node_threshold, (md.pruning_settings || {}).edge_threshold) };
}

// a logit's clerp as circuit-tracer and ct_ray write it, 'Output "tok" (p=0.123)': the token, quoted like the store's
function logitLabel(clerp) {
  const m = /^Output "([\s\S]*)" \(p=[-\d.e]+\)$/.exec(clerp || "");
  return m ? JSON.stringify(m[1]) : clerp || "?";
}

// --- the graph view: drawing (draw.js), automatic supernodes -------------------------------------------------
function draw() {
  const g = state.graph;
  if (!g) return;
  const nodeTh = state.th.node, edgeTh = state.th.edge;
  $("node-th-v").textContent = nodeTh.toFixed(2);
  $("edge-th-v").textContent = edgeTh.toFixed(2);
  const auto = $("auto-sn").checked && state.auto && state.auto.graph === g ? state.auto : null;
  const v = drawGraph($("graph"), g, { nodeTh, edgeTh, selected: state.selected,
    inSn: new Set(state.supernodes.flatMap((s) => s.nodes)), groupOf: auto ? auto.groupOf : null,
    groupName: (i) => auto.groups[i].name, onHover: (n) => showNode(n), onClick: (n) => { toggle(n); showNode(n); showQK(n); },
    onEdgeClick: g.hasHeads ? selectEdge : null, selectedEdge: state.edge, qkNodes: g.qk.size ? new Set(g.qk.keys()) : null });
  $("counts").textContent = `${v.nodes.length}/${g.nodes.length} nodes, ${v.edges.length}/${g.edges.length} edges`;
}

async function loadAuto() {
  const g = state.graph, on = $("auto-sn").checked;
  $("auto-sn-box").hidden = !on;
  if (!on || !g) { draw(); return; }
  const method = $("auto-sn-method").value || null;
  if (!(state.auto && state.auto.graph === g && (!method || state.auto.method === method))) {
    state.auto = { graph: g, groups: [], groupOf: new Map(), methods: [], method: null, msg: "loading…" };
    renderAuto();
    if (g.source !== "store") state.auto.msg = "graphs from files have no automatic supernodes";
    else {
      try {
        const r = await api("/api/auto-supernodes?" + qs({ sweep: g.sweep, key: g.key, method }));
        if (state.graph !== g) return;
        const groupOf = new Map();
        r.supernodes.forEach((s, i) => s.nodes.forEach((id) => { if (!groupOf.has(id)) groupOf.set(id, i); }));
        state.auto = { graph: g, groups: r.supernodes, groupOf, methods: r.methods, method: r.method,
          msg: r.supernodes.length ? `${r.supernodes.length} groups (${r.method})` + (r.truncated ? ", the largest shown" : "")
            : "none for this graph: the supernodes table has no rows for it" };
      } catch (e) { state.auto.msg = e.message; }
    }
  }
  renderAuto(); draw();
}

function renderAuto() {
  const a = state.auto && state.auto.graph === state.graph ? state.auto : { groups: [], methods: [], msg: "" };
  $("auto-sn-status").textContent = a.msg;
  const sel = select($("auto-sn-method"));
  sel.selectAll("option").remove();
  sel.selectAll("option").data(a.methods).enter().append("option").attr("value", (m) => m).text((m) => m)
    .property("selected", (m) => m === a.method);
  $("auto-sn-method").hidden = a.methods.length < 2;
  const ul = select($("auto-sn-list"));
  ul.selectAll("li").remove();
  const li = ul.selectAll("li").data(a.groups).enter().append("li").attr("class", "auto-sn");
  li.append("span").attr("class", "swatch").style("background", (_, i) => groupColor(i));
  li.append("span").attr("class", "auto-sn-name").text((s) => s.name);
  li.append("span").attr("class", "meta").text((s) => ` ${s.size} nodes · influence ${fmt(s.influence, 3)}`);
  li.append("button").attr("class", "auto-sn-use").text("use").attr("title", "copy into the hand-made supernodes (then save)")
    .on("click", (_, s) => {
      const have = new Set(state.graph.nodes.map((n) => n.id));
      // the server takes names of 1-64 printable characters without < or >
      const name = s.name.replace(/</g, "‹").replace(/>/g, "›").replace(/[\x00-\x1f\x7f]/g, " ").trim().slice(0, 64).trim();
      addGroup(name, s.nodes.filter((id) => have.has(id)));
    });
  $("auto-sn-list").dataset.count = a.groups.length;
}

// --- details: feature dashboards (markup built in render.js, every stored string escaped) -------------------------
async function dashboard(featuresId, layer, feature) {
  const key = `${featuresId}/${layer}/${feature}`;
  let d = state.featureCache.get(key);
  if (!d) {
    try {
      d = await api("/api/feature?" + qs({ clt_id: featuresId, layer, feature }));
    } catch (e) { d = { error: e.message }; }
    state.featureCache.set(key, d);
  }
  return d;
}

async function showNode(n, g = state.graph) {
  const box = $("feature");
  const head = nodeHead(n);
  box.dataset.node = n.id;
  if (n.kind !== "feature" || !g.featuresId) {
    setHTML(box, n.kind === "feature" ? hint(head, "no feature dashboards for this CLT (run ct-ray features)") : head);
    return;
  }
  const d = await dashboard(g.featuresId, n.layer, n.feature);
  if (box.dataset.node !== n.id) return;  // the pointer moved on meanwhile
  setHTML(box, d.error ? hint(head, d.error) : featureDetails(head, d));
}

// --- attention: a selected edge's head loadings, a selected node's QK terms (panels built in attention.js) ---------
function panel(id, markup, onClose) {
  const box = $(id);
  box.hidden = !markup;
  if (!markup) { setHTML(box, html``); return; }
  setHTML(box, markup);
  box.querySelector("button.close").addEventListener("click", onClose);
}

function renderEdge() {
  const e = state.edge;
  panel("edge-heads", e && edgeHeadsPanel(e, state.graph), () => selectEdge(state.edge));
  $("edge-heads").dataset.edge = e ? `${e.s.id}>${e.t.id}` : "";
}

function selectEdge(e) {  // clicking the selected edge again unselects it
  state.edge = state.edge === e ? null : e;
  renderEdge(); draw();
}

function showQK(n) {  // the last clicked node's explained scores, while it stays selected; nothing for a node without
  const g = state.graph, scores = g.qk.get(n.id);
  state.qkNode = scores && state.selected.has(n.id) ? n.id : null;
  panel("qk", state.qkNode && qkPanel(n, scores, g), () => { state.qkNode = null; panel("qk", null); $("qk").dataset.node = ""; });
  $("qk").dataset.node = state.qkNode || "";
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

function addGroup(name, nodes) {
  // a node belongs to one group: it moves to the new one; a group left empty goes
  if (!name || !nodes.length) { $("sn-status").textContent = "select nodes and give a name"; return; }
  const moving = new Set(nodes);
  state.supernodes = state.supernodes.filter((s) => s.name !== name)
    .map((s) => ({ ...s, nodes: s.nodes.filter((id) => !moving.has(id)) })).filter((s) => s.nodes.length)
    .concat([{ name, nodes }]);
  $("sn-status").textContent = "";
  renderSupernodes(); draw();
}

function addSupernode() {
  const name = $("sn-name").value.trim();
  if (!name || !state.selected.size) { $("sn-status").textContent = "select nodes and give a name"; return; }
  const nodes = [...state.selected];
  state.selected.clear();
  $("selection").textContent = "selected: 0";
  $("sn-name").value = "";
  addGroup(name, nodes);
}

async function saveSupernodes() {
  const g = state.graph;
  try {
    await api("/api/supernodes?" + qs({ sweep: g.sweep, key: g.key }), { method: "PUT",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify({ supernodes: state.supernodes }) });
    $("sn-status").textContent = "saved";
  } catch (e) { $("sn-status").textContent = "not saved: " + e.message; }
}

// --- perturbations (figures in perturb.js) ----------------------------------------------------------------------
async function loadPerturbations(g) {
  const rows = g.source === "store" ? await api("/api/perturbations?" + qs({ sweep: g.sweep, key: g.key })) : null;
  if (state.graph === g) renderPerturbations($("pert"), rows);
}

// --- opening graphs --------------------------------------------------------------------------------------------
function show(g) {
  state.graph = g; state.selected.clear(); state.supernodes = g.supernodes.map((s) => ({ ...s }));
  g.byId = new Map(g.nodes.map((n) => [n.id, n]));
  state.edge = null; state.qkNode = null;
  renderEdge(); panel("qk", null); $("qk").dataset.node = "";
  $("attention").dataset.heads = g.hasHeads ? "1" : "";
  $("attention").dataset.qk = g.qk.size;
  $("selection").textContent = "selected: 0";
  $("sn-status").textContent = "";
  setThresholds(g.th);
  $("title").textContent = g.source === "store"
    ? `${g.title} → ${JSON.stringify(g.meta.top_token_str)} (p=${fmt(g.meta.top_prob, 2)}) · completeness ${fmt(g.meta.completeness_score_pruned, 3)} · replacement ${fmt(g.meta.replacement_score_pruned, 3)}`
    : `${g.title} (file)`;
  document.querySelectorAll("#graph-list li").forEach((li) => li.classList.toggle("active", li.dataset.key === g.key));
  select($("auto-sn-method")).selectAll("option").remove();  // each graph starts with its default method
  renderSupernodes(); draw();
  loadAuto().catch((e) => { $("auto-sn-status").textContent = e.message; });
  loadPerturbations(g).catch((e) => { $("pert-summary").textContent = e.message; });
}

// the sliders of the graph view (they show a value rounded to their step; the threshold itself is kept exact)
function setThresholds(th) {
  state.th = { ...th };
  $("node-th").value = th.node; $("edge-th").value = th.edge;
  $("controls").dataset.nodeTh = th.node; $("controls").dataset.edgeTh = th.edge;
}

// `focus`: node ids and feature prefixes (`{layer}_{feature}_`, any position), comma-separated: selected on opening
function focus(g, spec) {
  const items = (spec || "").split(",").filter(Boolean).slice(0, 200);
  const hit = g.nodes.filter((n) => items.some((f) => (f.endsWith("_") ? n.kind === "feature" && n.id.startsWith(f) : n.id === f)));
  hit.forEach((n) => state.selected.add(n.id));
  $("selection").textContent = `selected: ${state.selected.size}`;
  if (hit.length) { draw(); showNode(hit[0]); }
}

async function openFromHash(h) {
  if (!h.get("sweep") || !h.get("key")) return;
  try {
    const g = fromApi(await api("/api/graph?" + qs({ sweep: h.get("sweep"), key: h.get("key") })));
    show(g);
    focus(g, h.get("focus"));
  } catch (e) { $("title").textContent = "cannot open graph: " + e.message; }
}

async function openJsonText(text) {
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);  // no view in the hash now
  setView("graph");
  try { show(fromJson(JSON.parse(text))); } catch (e) { $("title").textContent = "not a graph JSON file: " + e.message; }
}

// --- the sweep overview ----------------------------------------------------------------------------------------
async function openOverview(sid) {
  const box = $("overview-view");
  box.dataset.ready = "";
  $("ov-title").textContent = `Sweep ${sid}: loading…`;
  let d;
  try { d = await api("/api/overview?" + qs({ sweep: sid })); } catch (e) {
    $("ov-title").textContent = `cannot open the overview of ${sid}: ${e.message}`;
    return;
  }
  renderOverview(d, (r) => showFeatureStat(d, r));
}

async function showFeatureStat(d, r) {
  const box = $("feature"), id = `stat:${r.clt}/${r.layer}/${r.feature}`;
  box.dataset.node = id;
  const pct = (x) => (x == null ? "–" : `${(100 * x).toFixed(0)}%`);
  setHTML(box, html`<h3>L${r.layer} #${r.feature} <small>${r.clt}</small></h3><div class="stats">in ${r.n_prompts} graphs (${
    pct(r.frac_prompts)}), kept in ${r.n_prompts_kept ?? "–"} · influence mean ${fmt(r.influence_mean, 4)}, max ${
    fmt(r.influence_max, 4)} · activation mean ${fmt(r.activation_mean, 2)}, max ${fmt(r.activation_max, 2)}</div><div class="stats">pushes ${
    r.top_logits.map((l) => `${JSON.stringify(l.token)} (${fmt(l.weight, 3)})`).join(", ") || "–"}</div><h4>Top graphs</h4><ul id="stat-graphs"></ul><div id="stat-dash"></div>`);
  select($("stat-graphs")).selectAll("li").data(r.top_graphs).enter().append("li").append("a")
    .attr("href", (t) => hashOf({ sweep: d.sweep_id, key: t.key, focus: r.node_prefix }))
    .text((t) => `${t.prompt ?? t.key} (influence ${fmt(t.influence, 4)})`);
  if (!r.features_id) {
    setHTML($("stat-dash"), html`<p class="hint">no feature dashboards for this CLT (run ct-ray features)</p>`);
    return;
  }
  const f = await dashboard(r.features_id, r.layer, r.feature);
  if (box.dataset.node !== id) return;
  setHTML($("stat-dash"), f.error ? hint(html`<h4>Dashboard</h4>`, f.error) : featureDetails(html`<h4>Dashboard</h4>`, f));
}

// --- two sweeps' graphs of one prompt --------------------------------------------------------------------------
function fillSweepSelect(id, value) {
  const sel = select($(id));
  sel.selectAll("option").remove();
  sel.selectAll("option").data(state.sweeps).enter().append("option").attr("value", (s) => s.sweep_id)
    .text((s) => s.sweep_id).property("selected", (s) => s.sweep_id === value);
}

let promptsAsked = 0;
async function loadDiffPrompts(keep) {
  const a = $("diff-a").value, b = $("diff-b").value, asked = ++promptsAsked;
  const sel = select($("diff-prompt"));
  sel.selectAll("option").remove();
  $("diff-prompt").dataset.count = 0;
  if (!a || !b) return;
  try {
    const r = await api("/api/diff?" + qs({ a, b, q: $("diff-q").value }));
    if (asked !== promptsAsked) return;  // a later choice of sweeps or filter answers instead
    sel.selectAll("option").data(r.prompts).enter().append("option").attr("value", (p) => p.key_a)
      .text((p) => p.prompt).property("selected", (p) => p.key_a === keep);
    $("diff-prompt").dataset.count = r.prompts.length;
    $("diff-info").textContent = `${r.n_common} prompts in both (${r.n_a} in A, ${r.n_b} in B)` + (r.n_listed > r.prompts.length ? `, ${r.prompts.length} listed` : "")
      + (r.diffed ? ` · graph_diffs ${r.diff_id}` : " · not diffed yet");
  } catch (e) { if (asked === promptsAsked) $("diff-info").textContent = e.message; }
}

function drawDiff() {
  const d = state.diff;
  if (!d) return;
  const nodeTh = +$("diff-node-th").value;
  $("diff-node-th-v").textContent = nodeTh.toFixed(2);
  for (const [side, g] of [["a", d.ga], ["b", d.gb]]) {
    drawGraph($(`diff-graph-${side}`), g, { nodeTh, edgeTh: 1, fit: true, posWidth: 50, minWidth: 500, mark: d.only ? d.only[side] : null,
      onHover: (n) => showNode(n, g), onClick: (n) => showNode(n, g) });
  }
}

async function openDiff(h) {
  const ids = state.sweeps.map((s) => s.sweep_id);
  const a = h.get("a") || ids[0] || "", b = h.get("b") || ids[1] || ids[0] || "";
  fillSweepSelect("diff-a", a); fillSweepSelect("diff-b", b);
  const view = $("diff-view");
  view.dataset.ready = "";
  await loadDiffPrompts(h.get("key_a"));
  if (!h.get("key_a") && !h.get("prompt")) {
    state.diff = null;
    select($("diff-summary")).selectAll("*").remove();
    ["a", "b"].forEach((s) => { select($(`diff-graph-${s}`)).selectAll("*").remove(); $(`diff-title-${s}`).textContent = ""; });
    return;
  }
  try {
    const res = await api("/api/diff?" + qs({ a, b, key_a: h.get("key_a"), prompt: h.get("prompt") }));
    const [ja, jb] = await Promise.all([api("/api/graph?" + qs({ sweep: a, key: res.key_a })),
      api("/api/graph?" + qs({ sweep: b, key: res.key_b }))]);
    const ga = fromApi(ja), gb = fromApi(jb);
    state.diff = { res, ga, gb, only: onlyIn(ga, gb) };
    $("diff-title-a").textContent = `A: ${a} · ${res.key_a}`;
    $("diff-title-b").textContent = `B: ${b} · ${res.key_b}`;
    drawDiff();
    renderDiffSummary(res, ga, gb, state.diff.only);
    view.dataset.ready = "1";
  } catch (e) { $("diff-info").textContent = "cannot compare: " + e.message; }
}

// --- views and the location hash -------------------------------------------------------------------------------
function setView(v) {
  if (document.body.dataset.view !== v) setHTML($("feature"), html`<p class="hint">Hover or click a node${v === "overview" ? ", or a recurring feature" : ""}.</p>`);
  document.body.dataset.view = v;
  for (const name of ["graph", "overview", "diff"]) $(`${name}-view`).hidden = v !== name;
  $("supernodes").hidden = v !== "graph";
  $("attention").hidden = v !== "graph";
}

async function route() {
  const h = new URLSearchParams(location.hash.slice(1));
  if (h.get("overview")) { setView("overview"); return openOverview(h.get("overview")); }
  if (h.get("diff")) { setView("diff"); return openDiff(h); }
  setView("graph");
  return openFromHash(h);
}

async function init() {
  state.info = await api("/api/info");
  $("store").textContent = state.info.store;
  $("mode").textContent = state.info.writable ? "read-write" : "read-only";
  document.body.dataset.writable = state.info.writable;
  state.sweeps = await api("/api/sweeps");
  for (const s of state.sweeps) select($("sweep")).append("option").attr("value", s.sweep_id).text(`${s.sweep_id} (${s.ok}/${s.graphs})`);
  const li = select($("sweep-list")).selectAll("li").data(state.sweeps).enter().append("li");
  li.append("span").attr("class", "sweep-name").text((s) => `${s.sweep_id} (${s.ok}/${s.graphs})`);
  li.append("a").attr("class", "overview-link").attr("data-sweep", (s) => s.sweep_id)
    .attr("href", (s) => hashOf({ overview: s.sweep_id })).text("overview");
  ["sweep", "status", "min-completeness"].forEach((id) => $(id).addEventListener("change", loadList));
  $("q").addEventListener("input", loadList);
  [["node-th", "node"], ["edge-th", "edge"]].forEach(([id, k]) => $(id).addEventListener("input", () => {
    state.th[k] = +$(id).value; $("controls").dataset[k + "Th"] = state.th[k]; draw();
  }));
  $("diff-node-th").value = thresholds().node;
  $("sn-add").addEventListener("click", addSupernode);
  $("sn-save").addEventListener("click", saveSupernodes);
  $("auto-sn").addEventListener("change", () => loadAuto());
  $("auto-sn-method").addEventListener("change", () => loadAuto());
  ["diff-a", "diff-b"].forEach((id) => $(id).addEventListener("change", () => loadDiffPrompts()));
  $("diff-q").addEventListener("input", () => loadDiffPrompts());
  $("diff-go").addEventListener("click", () => {
    location.hash = hashOf({ diff: 1, a: $("diff-a").value, b: $("diff-b").value, key_a: $("diff-prompt").value });
  });
  $("diff-node-th").addEventListener("input", drawDiff);
  $("file").addEventListener("change", (ev) => { const f = ev.target.files[0]; if (f) f.text().then(openJsonText); });
  if (state.info.graph_json) {
    $("served-json").hidden = false;
    $("served-json").addEventListener("click", () => fetch("/api/graph-json").then((r) => r.text()).then(openJsonText));
  }
  window.addEventListener("hashchange", route);
  await loadList();
  await route();
  document.body.dataset.ready = "1";
}

init().catch((e) => { $("title").textContent = "explorer failed to start: " + e.message; });
