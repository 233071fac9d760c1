// End-to-end scenario in headless Debian Chromium (playwright-core, no downloaded browser), run by
// tests/test_explorer_e2e.py: node e2e/explorer.mjs BASE_URL SWEEP KEY [SCREENSHOT_DIR [GRAPH_JSON [SWEEP_B [ATTN]]]]
// ("" or "-" skips one). With SWEEP_B: automatic supernodes of SWEEP/KEY, the overviews of SWEEP (analysed) and
// SWEEP_B, and the diff of KEY's prompt between them. ATTN (JSON {edge: [source id, target id], qk_node, key_b}):
// that edge's head loadings and that node's QK panel in SWEEP/KEY, and no attention panels in SWEEP_B/key_b.
// Prints one JSON object.
import { chromium } from "playwright-core";

const [base, sweep, key, shots, graphJson, sweepB, attn] = process.argv.slice(2);
const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];
const out = {};
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: FLAGS });
try {
  const page = await browser.newPage({ viewport: { width: 1500, height: shots ? 1250 : 950 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  const counts = () => page.$eval("#graph", (s) => [+s.dataset.nodes, +s.dataset.edges]);
  const totals = () => page.$eval("#graph", (s) => [+s.dataset.totalNodes, +s.dataset.totalEdges]);
  // where the sliders stand: the exact thresholds, the sliders' own (rounded) values, the numbers shown
  const sliders = () => page.$eval("#controls", (c) => ({ th: [+c.dataset.nodeTh, +c.dataset.edgeTh],
    values: [...c.querySelectorAll("input[type=range]")].map((e) => +e.value),
    shown: [...c.querySelectorAll("output")].map((e) => e.textContent) }));
  // the logit labels: text, tooltip and box (page pixels), and the svg's box
  const labels = (sel) => page.$eval(sel, (svg) => ({ svg: (({ left, top, right, bottom }) => [left, top, right, bottom])(svg.getBoundingClientRect()),
    logits: svg.querySelectorAll(".node.logit").length,
    labels: [...svg.querySelectorAll(".logit-label")].map((g) => {
      const t = g.querySelector("text"), b = t.getBoundingClientRect();
      return { id: g.dataset.id, text: t.firstChild.nodeValue, title: t.querySelector("title").textContent,
               box: [b.left, b.top, b.right, b.bottom] };
    }) }));
  const url = `${base}/#sweep=${encodeURIComponent(sweep)}&key=${encodeURIComponent(key)}`;
  await page.goto(url);
  await page.waitForSelector("body[data-ready='1']", { timeout: 15000 });
  await page.waitForFunction(() => +document.getElementById("graph").dataset.nodes > 0, null, { timeout: 15000 });
  out.listed = await page.$$eval("#graph-list li", (l) => l.length);
  // the graph opens pruned at the thresholds it was pruned with
  out.opened = await counts();
  out.opened_sliders = await sliders();
  out.labels = await labels("#graph");
  const setTh = (id, v) => page.$eval(id, (el, v) => { el.value = v; el.dispatchEvent(new Event("input")); }, v);
  await setTh("#node-th", "1");
  await setTh("#edge-th", "1");
  out.full = await counts();
  await setTh("#node-th", "0.3");
  out.node_th = await counts();
  await setTh("#edge-th", "0.5");
  out.both_th = await counts();
  await setTh("#node-th", "1");
  await setTh("#edge-th", "1");
  out.restored = await counts();
  // perturbations: one figure per splice mode, with ticks, axis titles and its own agreement
  await page.waitForFunction(() => document.getElementById("pert-summary").textContent !== "", null, { timeout: 15000 });
  out.pert_points = +(await page.$eval("#pert", (s) => s.dataset.points));
  out.pert_summary = await page.$eval("#pert-summary", (s) => s.textContent);
  out.pert = await page.$$eval("#pert .pert-fig", (fs) => fs.map((f) => ({ mode: f.dataset.mode, points: +f.dataset.points,
    agree: +f.dataset.agree, spearman: f.dataset.spearman === "" ? null : +f.dataset.spearman,
    circles: f.querySelectorAll("circle.pt").length, title: f.querySelector(".pert-title").textContent,
    xticks: [...f.querySelectorAll(".tick-x text")].map((t) => t.textContent),
    yticks: [...f.querySelectorAll(".tick-y text")].map((t) => t.textContent),
    axis_titles: [...f.querySelectorAll(".axis-title")].map((t) => t.textContent),
    caption: f.querySelector("figcaption").innerText })));
  if (shots) await page.locator("#pert").screenshot({ path: `${shots}/explorer-perturbations.png` });
  // the most influential feature nodes first: the first one's dashboard shows top contexts
  const feats = await page.$$eval(".node.feature", (ns) => ns.map((n) => [+n.dataset.cum, n.dataset.id])
    .sort((a, b) => a[0] - b[0]).map((x) => x[1]));
  out.n_feature_nodes = feats.length;
  await page.click(`.node.feature[data-id='${feats[0]}']`, { force: true });
  await page.waitForSelector("#top-contexts .ctx", { timeout: 10000 });
  out.clicked = feats[0];
  out.top_contexts = await page.$$eval("#top-contexts .ctx", (c) => c.length);
  out.highlighted_tokens = await page.$$eval("#top-contexts .tok.max", (t) => t.length);
  out.feature_text = await page.$eval("#feature", (f) => f.innerText.slice(0, 400));
  if (shots) await page.screenshot({ path: `${shots}/explorer-feature.png` });
  // group two features (the first is selected already by the click) and save
  await page.click(`.node.feature[data-id='${feats[1]}']`, { force: true });
  out.selected = await page.$eval("#selection", (s) => s.textContent);
  await page.fill("#sn-name", "my group");
  await page.click("#sn-add");
  await page.click("#sn-save");
  await page.waitForFunction(() => document.getElementById("sn-status").textContent !== "", null, { timeout: 10000 });
  out.save_status = await page.$eval("#sn-status", (s) => s.textContent);
  await page.reload();
  await page.waitForSelector("body[data-ready='1']", { timeout: 15000 });
  await page.waitForFunction(() => +document.getElementById("graph").dataset.nodes > 0, null, { timeout: 15000 });
  out.after_reload = await page.$$eval("#sn-list li span", (s) => s.map((x) => x.textContent));
  out.in_supernode = await page.$$eval(".node.in-sn", (s) => s.map((x) => x.dataset.id).sort());
  if (shots) {
    if (process.env.SHOT_NODE_TH) await setTh("#node-th", process.env.SHOT_NODE_TH);  // else where it opens
    await page.click(`.node.feature[data-id='${feats[0]}']`, { force: true });  // a dashboard beside the graph
    await page.waitForSelector("#top-contexts .ctx", { timeout: 10000 });
    await page.screenshot({ path: `${shots}/explorer-graph.png` });
  }
  if (graphJson && graphJson !== "-") {  // a circuit-tracer / Neuronpedia JSON file opened in the page
    await page.setInputFiles("#file", graphJson);
    await page.waitForFunction(() => document.getElementById("title").textContent.endsWith("(file)"), null, { timeout: 10000 });
    out.file_opened = await counts();
    out.file_sliders = await sliders();
    out.file_total = await totals();
    out.file_labels = await labels("#graph");
    await setTh("#node-th", "1");
    await setTh("#edge-th", "1");
    out.file = await counts();
    out.file_edge_hits = await page.$$eval("#graph line.edge-hit", (l) => l.length);  // links with head loadings
  }
  if (attn && attn !== "-") await attentionViews(page, out, JSON.parse(attn));
  if (sweepB && sweepB !== "-") await analysisViews(page, out);
  out.errors = errors;
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));

async function analysisViews(page, out) {
  const T = { timeout: 15000 };
  const text = (sel) => page.$eval(sel, (e) => e.textContent);
  const count = (sel) => page.$$eval(sel, (l) => l.length);
  // automatic supernodes in the graph view, beside the hand-made ones
  await page.evaluate((h) => { location.hash = h; }, `sweep=${encodeURIComponent(sweep)}&key=${encodeURIComponent(key)}`);
  await page.waitForFunction(() => !document.getElementById("title").textContent.endsWith("(file)")
    && +document.getElementById("graph").dataset.nodes > 0, null, T);
  for (const id of ["#node-th", "#edge-th"]) await page.$eval(id, (el) => { el.value = "1"; el.dispatchEvent(new Event("input")); });
  await page.check("#auto-sn");
  await page.waitForFunction(() => !["", "loading…"].includes(document.getElementById("auto-sn-status").textContent), null, T);
  out.auto_status = await text("#auto-sn-status");
  out.auto_groups = await count("#auto-sn-list li");
  out.auto_members = await count("#graph .node.auto-member");
  if (shots) await page.screenshot({ path: `${shots}/explorer-auto-supernodes.png` });
  await page.click("#auto-sn-list li:first-child .auto-sn-use");  // copied into the hand-made supernodes
  out.after_use = await page.$$eval("#sn-list li span", (s) => s.map((x) => x.textContent));
  await page.click("#sn-save");
  await page.waitForFunction(() => document.getElementById("sn-status").textContent !== "", null, T);
  out.save_after_use = await text("#sn-status");
  await page.uncheck("#auto-sn");
  out.auto_off_members = await count("#graph .node.auto-member");

  // the sweep overview: score histograms, recurring features and paths
  await page.click(`.overview-link[data-sweep='${sweep}']`);
  await page.waitForSelector(`#overview-view[data-ready='1'][data-sweep='${sweep}']`, T);
  out.ov_hist = await page.$$eval("#ov-hists svg", (l) => l.map((s) => +s.dataset.total));
  out.ov_bars = await page.$$eval("#ov-hists svg", (l) => l.map((s) => [...s.querySelectorAll("rect.bar")]
    .reduce((a, r) => a + +r.dataset.count, 0)));
  out.ov_features = await count("#ov-features tbody tr");
  out.ov_paths = await count("#ov-paths tbody tr");
  await page.click("#ov-features tbody tr:first-child");
  await page.waitForSelector("#stat-graphs li a", T);
  await page.waitForSelector("#stat-dash #top-contexts, #stat-dash .hint", T);
  out.ov_top_graphs = await count("#stat-graphs li a");
  out.ov_dash = await count("#stat-dash #top-contexts .ctx");
  if (shots) await page.screenshot({ path: `${shots}/explorer-overview.png` });
  // a path opens its strongest graph with the path's nodes selected
  await page.click("#ov-paths tbody tr:first-child a.path-link");
  await page.waitForFunction(() => !document.getElementById("graph-view").hidden
    && document.querySelectorAll("#graph .node.selected").length > 0, null, T);
  out.path_selected = await count("#graph .node.selected");
  // a sweep not analysed says so, with the command
  await page.click(`.overview-link[data-sweep='${sweepB}']`);
  await page.waitForSelector(`#overview-view[data-ready='1'][data-sweep='${sweepB}']`, T);
  out.ov_b_command = await text("#ov-command");

  // one prompt of both sweeps side by side, with its graph_diffs row
  await page.click("#open-diff");
  await page.waitForFunction(() => +document.getElementById("diff-prompt").dataset.count > 0, null, T);
  await page.selectOption("#diff-a", sweep);
  await page.selectOption("#diff-b", sweepB);
  await page.waitForFunction(() => +document.getElementById("diff-prompt").dataset.count > 0, null, T);
  out.diff_prompts = await count("#diff-prompt option");
  await page.selectOption("#diff-prompt", { label: "The cat sat on the" });
  await page.click("#diff-go");
  await page.waitForSelector("#diff-view[data-ready='1']", T);
  out.diff_nodes = await page.$$eval("#diff-panes svg", (l) => l.map((s) => +s.dataset.totalNodes));
  out.diff_row = await page.$eval("#diff-table", (t) => t.dataset.row);
  out.diff_edges = await count("#diff-edges li");
  out.diff_text = await page.$eval("#diff-summary", (e) => e.innerText.slice(0, 2000));
  if (shots) await page.screenshot({ path: `${shots}/explorer-diff.png` });
}

async function attentionViews(page, out, a) {
  const T = { timeout: 15000 };
  const count = (sel) => page.$$eval(sel, (l) => l.length);
  const open = async (sw, k) => {  // then every stored node and edge
    await page.evaluate((h) => { location.hash = h; }, `sweep=${encodeURIComponent(sw)}&key=${encodeURIComponent(k)}`);
    await page.waitForFunction((k) => !!document.querySelector(`#graph-list li.active[data-key='${k}']`)
      && +document.getElementById("graph").dataset.nodes > 0, k, T);
    const th = await page.$eval("#controls", (c) => [+c.dataset.nodeTh, +c.dataset.edgeTh]);
    for (const id of ["#node-th", "#edge-th"]) await page.$eval(id, (el) => { el.value = "1"; el.dispatchEvent(new Event("input")); });
    return th;
  };
  const hidden = () => page.$$eval("#edge-heads, #qk", (l) => l.map((e) => e.hidden));
  // a graph of a sweep without attention attribution: no edge to pick, no node ringed, no panel (even on a click)
  out.attn_b_opened_at = await open(sweepB, a.key_b);  // pruned at node_threshold 0.5: its sliders open there
  await page.dispatchEvent("#graph .node.feature", "click");
  out.attn_none = { hits: await count("#graph line.edge-hit"), ringed: await count("#graph .node.has-qk"),
                    hidden: await hidden() };
  await open(sweep, key);
  out.attn_flags = await page.$eval("#attention", (e) => [e.dataset.heads, +e.dataset.qk]);
  out.edge_hits = await count("#graph line.edge-hit");
  out.qk_ringed = await page.$$eval("#graph .node.has-qk", (l) => l.map((n) => n.dataset.id).sort());
  // an edge: its head loadings, largest |weight| first, with bars
  const [s, t] = a.edge;
  const hit = `#graph line.edge-hit[data-s='${s}'][data-t='${t}']`;
  await page.dispatchEvent(hit, "click");
  await page.waitForSelector("#edge-heads:not([hidden]) #head-loadings", T);
  out.edge_panel = await page.$eval("#edge-heads", (e) => e.dataset.edge);
  out.edge_selected = await page.$$eval("#graph line.edge.selected", (l) => l.map((x) => [x.dataset.s, x.dataset.t]));
  out.head_rows = await page.$$eval("#head-loadings tr", (l) => l.map((r) => [r.querySelector(".lbl").textContent,
    +r.querySelector(".num").textContent, parseFloat(r.querySelector(".lbar").style.width)]));
  out.head_text = await page.$eval("#edge-heads", (e) => e.innerText);
  // a node with explained attention scores: each score with its pairs and query-/key-side terms
  await page.dispatchEvent(`#graph .node[data-id='${a.qk_node}']`, "click");
  await page.waitForSelector("#qk:not([hidden]) .qk-score", T);
  out.qk_panel = await page.$eval("#qk", (e) => e.dataset.node);
  out.qk_scores = await page.$$eval("#qk .qk-score", (l) => l.map((d) => ({
    id: [+d.dataset.layer, +d.dataset.head, +d.dataset.q, +d.dataset.k],
    title: d.querySelector(".qk-title").textContent,
    n: ["qk-pairs", "qk-query", "qk-key"].map((c) => d.querySelectorAll(`table.${c} tr`).length) })));
  out.qk_src = { in_graph: await count("#qk .src.in-graph"), off_graph: await count("#qk .src.off-graph"),
                 bias: await count("#qk .src.bias") };
  out.qk_labels = await page.$$eval("#qk .src.in-graph", (l) => l.slice(0, 5).map((x) => [x.dataset.node, x.textContent]));
  if (shots) await page.screenshot({ path: `${shots}/explorer-attention.png` });
  // clicking them again closes both panels
  await page.dispatchEvent(hit, "click");
  await page.dispatchEvent(`#graph .node[data-id='${a.qk_node}']`, "click");
  out.attn_closed = await hidden();
}
