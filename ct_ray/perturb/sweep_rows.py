"""The sweep's per-graph perturbation job: `validate` on the graph's selected nodes, one call per splice mode."""

from __future__ import annotations

from .validate import validate


def perturbation_rows(model, clt, graph, plan) -> list[dict]:
    """Intervene on the plan's nodes (or the `plan.top_k` most influential feature nodes) of `graph` with each of the
    plan's interventions; rows of the perturbations table, one per (intervention, node, logit), with the graph's
    predicted and the model's measured change of the demeaned logit. `intervention` indexes the plan's list."""
    rows: list[dict] = []
    by_mode: dict[str, list[int]] = {}
    for j, iv in enumerate(plan.interventions):
        by_mode.setdefault(iv.mode, []).append(j)
    for mode, js in by_mode.items():
        v = validate(model, clt, graph, top_k=plan.top_k or 1, nodes=plan.nodes or None, mode=mode,
                     ops=[plan.interventions[j] for j in js])
        for r in v.table.to_pylist():
            r["intervention"] = js[r["intervention"]]
            rows.append(r)
    return rows
