// The diff view's summary (#diff=1&a=A&b=B&key_a=K): the two graphs' own scores side by side, and the graph_diffs
// row of the prompt when `ct-ray diff A B` wrote one (deltas, matched features, most changed edges). Nothing heavy is
// computed here: without a row the page says which command fills it. Stored strings go in as text only.
import { select } from "d3-selection";
import { fmt } from "./render.js";

const $ = (id) => document.getElementById(id);

// feature nodes only in one of the graphs: same CLT only (then a node id names the same feature at the same
// position in both; different CLTs need the decoder matching of `ct-ray diff`)
export function onlyIn(ga, gb) {
  if ((ga.meta.clt || "") !== (gb.meta.clt || "")) return null;
  const ids = (g) => new Set(g.nodes.filter((n) => n.kind === "feature").map((n) => n.id));
  const a = ids(ga), b = ids(gb);
  return { a: new Set([...a].filter((i) => !b.has(i))), b: new Set([...b].filter((i) => !a.has(i))) };
}

export function renderDiffSummary(res, ga, gb, only) {
  const box = select($("diff-summary"));
  box.selectAll("*").remove();
  const r = res.row, ma = ga.meta, mb = gb.meta;
  const flipped = r && r.sweep_a !== res.a;  // the store holds B..A only: its deltas are A - B
  const d = (x, y) => (x == null || y == null ? null : y - x);
  const rows = [
    ["top token", JSON.stringify(ma.top_token_str), JSON.stringify(mb.top_token_str), ""],
    ["top token probability", fmt(ma.top_prob, 3), fmt(mb.top_prob, 3), r ? fmt(r.top_prob_delta, 3) : ""],
    ["replacement score (pruned)", fmt(ma.replacement_score_pruned, 3), fmt(mb.replacement_score_pruned, 3),
      fmt(r ? r.replacement_delta : d(ma.replacement_score_pruned, mb.replacement_score_pruned), 3)],
    ["completeness score (pruned)", fmt(ma.completeness_score_pruned, 3), fmt(mb.completeness_score_pruned, 3),
      fmt(r ? r.completeness_delta : d(ma.completeness_score_pruned, mb.completeness_score_pruned), 3)],
    ["nodes / edges (pruned)", `${ma.n_nodes_pruned} / ${ma.n_edges_pruned}`, `${mb.n_nodes_pruned} / ${mb.n_edges_pruned}`, ""],
  ];
  if (r) {
    rows.push(["feature nodes (matched)", `${r.n_features_a} (${r.n_matched})`, `${r.n_features_b} (${r.n_matched})`, ""],
      ["feature influence (on matched)", `${fmt(r.influence_a, 3)} (${fmt(r.matched_influence_a, 3)})`,
        `${fmt(r.influence_b, 3)} (${fmt(r.matched_influence_b, 3)})`, ""],
      ["logit probability L1", "", "", fmt(r.logit_prob_l1, 3)],
      ["edge change L1", "", "", fmt(r.edge_change_l1, 3)]);
  }
  box.append("div").attr("class", "diff-prompt").text(`prompt: ${JSON.stringify(res.prompt)}`);
  const t = box.append("table").attr("id", "diff-table").attr("data-row", r ? "1" : "0");
  const head = t.append("thead").append("tr");
  ["", `A: ${res.a}`, `B: ${res.b}`, flipped ? "Δ (A − B, stored as B..A)" : "Δ (B − A)"].forEach((h) => head.append("th").text(h));
  const tr = t.append("tbody").selectAll("tr").data(rows).enter().append("tr");
  tr.selectAll("td").data((x) => x).enter().append("td").text((x) => x);
  if (only) {
    box.append("div").attr("class", "diff-only").text(
      `outlined: ${only.a.size} feature nodes only in A, ${only.b.size} only in B (same CLT: matched by node id)`);
  }
  if (r) {
    box.append("div").attr("class", "diff-match").text(`graph_diffs ${res.diff_id}, features matched by ${r.match}`);
    box.append("h4").text("Most changed edges");
    const ul = box.append("ul").attr("id", "diff-edges");
    ul.selectAll("li").data(r.top_changed_edges || []).enter().append("li").text((e) => e);
  } else {
    box.append("p").attr("class", "hint").text(res.diffed
      ? `the graph_diffs partition ${res.diff_id} has no row for this prompt; re-run:`
      : "no graph_diffs rows for these sweeps (only the graphs' own scores above); the deltas come from:");
    box.append("pre").attr("id", "diff-command").text(res.command);
  }
}
