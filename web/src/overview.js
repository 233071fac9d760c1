// The sweep overview (#overview=SWEEP): histograms of the graphs' pruned scores, the sweep's most recurring features
// (feature_stats) and strongest recurring paths (circuit_paths), from GET /api/overview. Stored strings go in as
// text (d3's .text / .attr), never as markup.
import { select } from "d3-selection";
import { scaleLinear } from "d3-scale";
import { fmt } from "./render.js";

const $ = (id) => document.getElementById(id);
export const hashOf = (o) => "#" + new URLSearchParams(Object.entries(o).filter(([, v]) => v !== "" && v != null)).toString();
const pct = (x) => (x == null ? "–" : `${(100 * x).toFixed(0)}%`);

// a bar chart of one histogram {counts, lo, hi, n, mean, median}
export function histogram(svgEl, h, label) {
  const W = 320, H = 170, L = 34, B = 30;
  const svg = select(svgEl).attr("width", W).attr("height", H)
    .attr("data-total", h.n).attr("data-bins", h.counts.length);
  svg.selectAll("*").remove();
  const x = scaleLinear().domain([h.lo, h.hi]).range([L, W - 8]);
  const y = scaleLinear().domain([0, Math.max(1, ...h.counts)]).range([H - B, 18]);
  const bw = (h.hi - h.lo) / h.counts.length;
  svg.append("g").selectAll("rect").data(h.counts).enter().append("rect").attr("class", "bar")
    .attr("x", (_, i) => x(h.lo + i * bw) + 0.5).attr("width", (_, i) => Math.max(0.5, x(h.lo + (i + 1) * bw) - x(h.lo + i * bw) - 1))
    .attr("y", (c) => y(c)).attr("height", (c) => y(0) - y(c)).attr("data-count", (c) => c)
    .append("title").text((c, i) => `${fmt(h.lo + i * bw, 2)}–${fmt(h.lo + (i + 1) * bw, 2)}: ${c} graphs`);
  const ax = svg.append("g").attr("class", "axis");
  ax.append("line").attr("x1", L).attr("x2", W - 8).attr("y1", y(0)).attr("y2", y(0)).attr("stroke", "#999");
  [h.lo, (h.lo + h.hi) / 2, h.hi].forEach((t) => ax.append("text").attr("x", x(t)).attr("y", H - B + 13)
    .attr("text-anchor", "middle").text(fmt(t, 2)));
  ax.append("text").attr("x", L - 4).attr("y", y(Math.max(1, ...h.counts)) + 4).attr("text-anchor", "end").text(Math.max(1, ...h.counts));
  ax.append("text").attr("x", L - 4).attr("y", y(0)).attr("text-anchor", "end").text(0);
  if (h.mean != null) {
    ax.append("line").attr("class", "mean").attr("x1", x(h.mean)).attr("x2", x(h.mean)).attr("y1", 14).attr("y2", y(0));
  }
  svg.append("text").attr("class", "hist-title").attr("x", L).attr("y", 11).text(`${label} (pruned graphs)`);
  svg.append("text").attr("x", (L + W) / 2).attr("y", H - 3).attr("text-anchor", "middle").attr("class", "axis-label")
    .text(`${h.n} graphs · mean ${fmt(h.mean, 3)} · median ${fmt(h.median, 3)}` + (h.missing ? ` · ${h.missing} without a score` : ""));
}

// the whole view; `onFeature(row)` when a recurring feature is clicked
export function renderOverview(d, onFeature) {
  const box = $("overview-view");
  box.dataset.sweep = d.sweep_id;
  $("ov-title").textContent = `Sweep ${d.sweep_id}: ${d.ok}/${d.graphs} graphs ok` + (d.model ? ` · ${d.model}` : "") + (d.clt ? ` · ${d.clt}` : "");
  histogram($("hist-replacement"), d.scores.replacement, "replacement score");
  histogram($("hist-completeness"), d.scores.completeness, "completeness score");
  const status = $("ov-status");
  select(status).selectAll("*").remove();
  status.classList.toggle("not-analysed", !d.analysed);
  if (!d.analysed) {
    select(status).append("p").text("This sweep has not been analysed: no feature_stats or circuit_paths rows. Run:");
    select(status).append("pre").attr("id", "ov-command").text(d.command);
  } else {
    select(status).append("p").text(`${d.n_features} features over the sweep's graphs, ${d.n_paths} distinct paths.`);
  }
  $("ov-analysis").hidden = !d.analysed;

  // recurring features
  const tb = select("#ov-features tbody");
  tb.selectAll("tr").remove();
  const tr = tb.selectAll("tr").data(d.features).enter().append("tr").attr("class", "ov-feature")
    .attr("data-layer", (r) => r.layer).attr("data-feature", (r) => r.feature)
    .on("click", function (_, r) {
      tb.selectAll("tr").classed("active", false);
      select(this).classed("active", true);
      onFeature(r);
    });
  tr.append("td").text((r) => `L${r.layer}/F${r.feature}`);
  tr.append("td").attr("class", "num").text((r) => `${r.n_prompts} (${pct(r.frac_prompts)})`);
  tr.append("td").attr("class", "num").text((r) => r.n_prompts_kept ?? "–");
  tr.append("td").attr("class", "num").text((r) => fmt(r.influence_mean, 4));
  tr.append("td").attr("class", "num").text((r) => fmt(r.activation_max, 2));
  tr.append("td").attr("class", "logits").text((r) => r.top_logits.slice(0, 4).map((l) => `${JSON.stringify(l.token)} ${fmt(l.weight, 2)}`).join(", "));
  $("ov-features").dataset.count = d.features.length;

  // strongest recurring paths: distinct paths by support, then mean score; each opens its strongest graph
  const pb = select("#ov-paths tbody");
  pb.selectAll("tr").remove();
  const pr = pb.selectAll("tr").data(d.paths).enter().append("tr").attr("class", "ov-path");
  pr.append("td").attr("class", "path").text((p) => p.path);
  pr.append("td").attr("class", "num").text((p) => p.hops);
  pr.append("td").attr("class", "num").text((p) => `${p.support} (${pct(p.support_frac)})`);
  pr.append("td").attr("class", "num").text((p) => fmt(p.mean_score, 4));
  pr.append("td").append("a").attr("class", "path-link")
    .attr("href", (p) => hashOf({ sweep: d.sweep_id, key: p.example.key, focus: p.example.node_ids.join(",") }))
    .attr("title", (p) => `strongest in this graph (score ${fmt(p.example.score, 4)})`)
    .text((p) => p.example.prompt ?? p.example.key);
  $("ov-paths").dataset.count = d.paths.length;

  // diffs that name the sweep
  const ul = select($("ov-diffs"));
  ul.selectAll("li").remove();
  ul.selectAll("li").data(d.diffs).enter().append("li").append("a")
    .attr("href", (r) => hashOf({ diff: 1, a: r.sweep_a, b: r.sweep_b }))
    .text((r) => `${r.sweep_a} → ${r.sweep_b}: ${r.n_prompts} prompts, Δ replacement ${fmt(r.replacement_delta, 3)}, Δ completeness ${fmt(r.completeness_delta, 3)}`);
  $("ov-diffs-box").hidden = !d.diffs.length;
  box.dataset.ready = "1";
}
