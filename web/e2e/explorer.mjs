// End-to-end scenario in headless Debian Chromium (playwright-core, no downloaded browser), run by
// tests/test_explorer_e2e.py: node e2e/explorer.mjs BASE_URL SWEEP KEY [SCREENSHOT_DIR]. Prints one JSON object.
import { chromium } from "playwright-core";

const [base, sweep, key, shots, graphJson] = process.argv.slice(2);
const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];
const out = {};
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: FLAGS });
try {
  const page = await browser.newPage({ viewport: { width: 1500, height: shots ? 1250 : 950 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  const counts = () => page.$eval("#graph", (s) => [+s.dataset.nodes, +s.dataset.edges]);
  const url = `${base}/#sweep=${encodeURIComponent(sweep)}&key=${encodeURIComponent(key)}`;
  await page.goto(url);
  await page.waitForSelector("body[data-ready='1']", { timeout: 15000 });
  await page.waitForFunction(() => +document.getElementById("graph").dataset.nodes > 0, null, { timeout: 15000 });
  out.listed = await page.$$eval("#graph-list li", (l) => l.length);
  out.full = await counts();
  const setTh = (id, v) => page.$eval(id, (el, v) => { el.value = v; el.dispatchEvent(new Event("input")); }, v);
  await setTh("#node-th", "0.3");
  out.node_th = await counts();
  await setTh("#edge-th", "0.5");
  out.both_th = await counts();
  await setTh("#node-th", "1");
  await setTh("#edge-th", "1");
  out.restored = await counts();
  await page.waitForFunction(() => +document.getElementById("pert-plot").dataset.points >= 0);
  out.pert_points = +(await page.$eval("#pert-plot", (s) => s.dataset.points));
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
    await setTh("#node-th", process.env.SHOT_NODE_TH || "1");
    await page.click(`.node.feature[data-id='${feats[0]}']`, { force: true });  // a dashboard beside the graph
    await page.waitForSelector("#top-contexts .ctx", { timeout: 10000 });
    await page.screenshot({ path: `${shots}/explorer-graph.png` });
  }
  if (graphJson && graphJson !== "-") {  // a circuit-tracer / Neuronpedia JSON file opened in the page
    await page.setInputFiles("#file", graphJson);
    await page.waitForFunction(() => document.getElementById("title").textContent.endsWith("(file)"), null, { timeout: 10000 });
    out.file = await counts();
  }
  out.errors = errors;
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
