// A graph's perturbation results in the graph view (GET /api/perturbations): the change of each target measured on
// the model against the change the graph predicts, one point per (intervention, target). One figure per splice mode,
// each with its axes and its own agreement (sign agreement, Spearman's rho): constrained rows are exact by
// construction, so pooling them with the free ones would only inflate the agreement. Stored strings go in as text.
import { select } from "d3-selection";
import { scaleLinear } from "d3-scale";
import { fmt } from "./render.js";

export const MODES = {
  constrained: {
    title: "Constrained mode",
    note: "Exact by construction: attention and norms are frozen and the other features clamped, so the model's "
      + "change is the graph's direct-edge prediction up to float error. These points check the splice, not how well "
      + "the graph predicts.",
  },
  free: {
    title: "Free mode",
    note: "Everything downstream recomputed on the real model: how well the graph's prediction through its features "
      + "holds.",
  },
};
const W = 340, H = 270, L = 56, R = 12, T = 12, B = 42;

// ranks from 1, ties sharing their mean rank
function ranks(xs) {
  const idx = xs.map((_, i) => i).sort((a, b) => xs[a] - xs[b]);
  const r = new Array(xs.length);
  for (let i = 0; i < idx.length;) {
    let j = i;
    while (j + 1 < idx.length && xs[idx[j + 1]] === xs[idx[i]]) j++;
    for (let k = i; k <= j; k++) r[idx[k]] = (i + j) / 2 + 1;
    i = j + 1;
  }
  return r;
}

// Spearman's rho (Pearson's r of the ranks); null under 3 points or when either side is constant
export function spearman(xs, ys) {
  if (xs.length < 3) return null;
  const rx = ranks(xs), ry = ranks(ys), m = (xs.length + 1) / 2;
  let sxy = 0, sxx = 0, syy = 0;
  rx.forEach((a, i) => { const dx = a - m, dy = ry[i] - m; sxy += dx * dy; sxx += dx * dx; syy += dy * dy; });
  return sxx > 0 && syy > 0 ? sxy / Math.sqrt(sxx * syy) : null;
}

export function agreement(pts) {
  const agree = pts.filter((p) => Math.sign(p.predicted_delta) === Math.sign(p.measured_delta)).length;
  return { n: pts.length, agree, rho: spearman(pts.map((p) => p.predicted_delta), pts.map((p) => p.measured_delta)) };
}

// box: the #pert element; rows: the API's rows, or null for a graph read from a file
export function renderPerturbations(box, rows) {
  const ok = (rows || []).filter((r) => r.status === "ok" && r.predicted_delta != null && r.measured_delta != null);
  const by = { constrained: ok.filter((r) => r.mode === "constrained"), free: ok.filter((r) => r.mode !== "constrained") };
  box.dataset.points = ok.length;
  box.querySelector("#pert-summary").textContent = rows == null ? "graphs from files have no perturbation rows"
    : !rows.length ? "no perturbation rows" : !ok.length ? "no measured rows"
    : `${ok.length} measured changes: ${by.constrained.length} in constrained mode, ${by.free.length} in free mode`
      + (rows.length > ok.length ? ` (${rows.length - ok.length} rows failed or not measured)` : "");
  for (const mode of Object.keys(MODES)) scatter(box.querySelector(`.pert-fig[data-mode='${mode}']`), by[mode], mode);
}

function scatter(fig, pts, mode) {
  const m = MODES[mode], a = agreement(pts);
  fig.dataset.points = pts.length;
  fig.dataset.agree = a.agree;
  fig.dataset.spearman = a.rho ?? "";
  fig.querySelector(".pert-title").textContent = `${m.title}: ${pts.length} measured change${pts.length === 1 ? "" : "s"}`;
  fig.querySelector(".pert-agree").textContent = pts.length
    ? `sign agreement ${(100 * a.agree / a.n).toFixed(0)}% (${a.agree}/${a.n}) · Spearman ρ ${
      a.rho == null ? "– (needs 3 points that vary)" : fmt(a.rho, 3)}` : "";
  fig.querySelector(".pert-note").textContent = m.note;
  const svg = select(fig.querySelector("svg")).attr("width", W).attr("height", H);
  svg.selectAll("*").remove();
  if (!pts.length) {
    svg.append("text").attr("class", "empty").attr("x", W / 2).attr("y", H / 2).attr("text-anchor", "middle")
      .text(`no ${mode}-mode rows for this graph`);
    return;
  }
  // one symmetric scale for both axes, so the diagonal is "measured = predicted"
  const ext = Math.max(1e-9, ...pts.flatMap((p) => [Math.abs(p.predicted_delta), Math.abs(p.measured_delta)]));
  const x = scaleLinear().domain([-ext, ext]).nice(5).range([L, W - R]);
  const [d0, d1] = x.domain();
  const y = scaleLinear().domain([d0, d1]).range([H - B, T]);
  const tick = x.tickFormat(5);
  const ax = svg.append("g").attr("class", "axis");
  ax.append("rect").attr("class", "frame").attr("x", L).attr("y", T).attr("width", W - R - L).attr("height", H - B - T);
  const tx = ax.append("g").attr("class", "tick-x").selectAll("g").data(x.ticks(5)).enter().append("g");
  tx.append("line").attr("x1", (t) => x(t)).attr("x2", (t) => x(t)).attr("y1", H - B).attr("y2", H - B + 4);
  tx.append("text").attr("x", (t) => x(t)).attr("y", H - B + 14).attr("text-anchor", "middle").text(tick);
  const ty = ax.append("g").attr("class", "tick-y").selectAll("g").data(y.ticks(5)).enter().append("g");
  ty.append("line").attr("x1", L - 4).attr("x2", L).attr("y1", (t) => y(t)).attr("y2", (t) => y(t));
  ty.append("text").attr("x", L - 6).attr("y", (t) => y(t) + 3).attr("text-anchor", "end").text(tick);
  ax.append("line").attr("class", "zero").attr("x1", x(0)).attr("x2", x(0)).attr("y1", T).attr("y2", H - B);
  ax.append("line").attr("class", "zero").attr("x1", L).attr("x2", W - R).attr("y1", y(0)).attr("y2", y(0));
  ax.append("line").attr("class", "diagonal").attr("x1", x(d0)).attr("y1", y(d0)).attr("x2", x(d1)).attr("y2", y(d1));
  ax.append("text").attr("class", "axis-title x-title").attr("x", (L + W - R) / 2).attr("y", H - 8)
    .attr("text-anchor", "middle").text("predicted Δ (graph)");
  ax.append("text").attr("class", "axis-title y-title").attr("transform", `translate(12,${(T + H - B) / 2}) rotate(-90)`)
    .attr("text-anchor", "middle").text("measured Δ (model)");
  svg.append("g").selectAll("circle").data(pts).enter().append("circle").attr("class", "pt").attr("r", 3)
    .attr("cx", (p) => x(p.predicted_delta)).attr("cy", (p) => y(p.measured_delta))
    .append("title").text((p) => `${p.supernode ?? p.node_id} ${p.op} ${p.value} → ${p.target_str != null
      ? JSON.stringify(p.target_str) : p.target_id}: predicted ${fmt(p.predicted_delta)}, measured ${fmt(p.measured_delta)}`);
}
