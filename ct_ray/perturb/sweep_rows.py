"""The sweep's per-graph perturbation job: `validate` on the graph, rows in the sweep's `perturbations` schema."""

from __future__ import annotations

from .validate import validate


def perturbation_rows(model, clt, graph, plan) -> list[dict]:
    """Intervene on the `len(plan.nodes)` (or `plan.top_k`) most influential feature nodes of `graph` with each of
    the plan's interventions; one row per (intervention, node, logit) with the graph's predicted and the model's
    measured change of the demeaned logit. Interventions are grouped by mode (one `validate` call per mode)."""
    k = len(plan.nodes) if plan.nodes else plan.top_k
    nL, N = graph.n_logits, graph.n_nodes
    logit_nodes = list(range(N - nL, N))
    ids = graph.nodes.column("node_id").to_pylist()
    tokens = graph.meta["logit_tokens"]
    baseline = graph.target_values[N - nL :].tolist()
    rows: list[dict] = []
    by_mode: dict[str, list[tuple[int, object]]] = {}
    for j, iv in enumerate(plan.interventions):
        by_mode.setdefault(iv.mode, []).append((j, iv))
    for mode, ivs in by_mode.items():
        ops = [(iv.op, float(iv.value)) for _, iv in ivs]
        v = validate(model, clt, graph, top_k=k, ops=ops, mode=mode)
        for i in range(len(v.targets) * len(ops)):
            t, (j, iv) = v.targets[i // len(ops)], ivs[i % len(ops)]
            node = t.nodes[0]
            for c, ln in enumerate(logit_nodes):
                rows.append({
                    "intervention": j, "node": node, "op": iv.op, "value": float(iv.value), "mode": mode,
                    "target_node": ln, "target_id": ids[ln], "target_kind": "logit", "target_token": tokens[c],
                    "baseline": float(baseline[c]), "predicted_delta": float(v.predicted_logits[i, c]),
                    "measured_delta": float(v.measured_logits[i, c]), "status": "ok"})
    return rows
