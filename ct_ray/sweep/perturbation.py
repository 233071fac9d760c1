"""The per-graph perturbation job of a sweep: node selection, the pluggable function, row conformance.

A perturbation function has the signature `fn(model, clt, graph, plan) -> rows` where
- `model` is the worker's LoadedModel, `clt` its CrossLayerTranscoder,
- `graph` is the *full* attribution Graph of the prompt, its nodes' `influence` filled (`Graph.with_influence`),
- `plan` is the sweep's PerturbationPlan with `nodes` set to the node indices (`node` column) to intervene on,
- rows are a pyarrow Table, a list of dicts or a dict of columns holding columns of the `perturbations` table
  (ct_ray.store.schemas.PERTURBATIONS_SCHEMA); `key` and `plan` are filled in by the sweep, node description
  columns (node_id, layer, position, feature, influence) are filled from the graph when missing.

`plan.function` names it as 'module:function' (default `ct_ray.perturb:perturbation_rows`). When it cannot be
imported the sweep skips perturbations (and says so). `predicted_only` below is a graph-only reference.
"""

from __future__ import annotations

import importlib

import numpy as np
import pyarrow as pa
import torch

from ..specs import PerturbationPlan
from ..store.tables import conform


def resolve(plan: PerturbationPlan):
    """The plan's function, or (None, reason) when the plan is empty or the function cannot be imported."""
    if plan.empty:
        return None, "empty perturbation plan"
    mod, _, name = plan.function.partition(":")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except ImportError as e:
        return None, f"cannot import {mod} ({e})"
    except AttributeError:
        return None, f"{mod} has no function {name!r}"
    return fn, ""


def select_nodes(pruned, plan: PerturbationPlan) -> list[int]:
    """`plan.nodes` if given, else the `top_k` feature nodes of the pruned graph by influence (ties: node order)."""
    if plan.nodes:
        return list(plan.nodes)
    t = pruned.nodes
    kind = t.column("kind").to_numpy(zero_copy_only=False)
    node = t.column("node").to_numpy()
    infl = np.nan_to_num(t.column("influence").to_numpy(zero_copy_only=False).astype(np.float64), nan=-np.inf)
    feat = np.nonzero(kind == "feature")[0]
    order = feat[np.lexsort((node[feat], -infl[feat]))]
    return [int(node[i]) for i in order[: plan.top_k]]


def finish_rows(rows, graph, key: str, plan_hash: str) -> pa.Table:
    """Conform a function's rows to the perturbations schema; fill key, plan and the intervened nodes' columns."""
    t = conform(rows, "perturbations")
    n = t.num_rows
    t = t.set_column(t.schema.get_field_index("key"), t.schema.field("key"), pa.array([key] * n, pa.string()))
    t = t.set_column(t.schema.get_field_index("plan"), t.schema.field("plan"), pa.array([plan_hash] * n, pa.string()))
    if n == 0:
        return t
    nodes = graph.nodes
    idx = {int(v): i for i, v in enumerate(nodes.column("node").to_pylist())}
    which = [idx.get(v) if v is not None else None for v in t.column("node").to_pylist()]
    for col in ("node_id", "layer", "position", "feature", "influence"):
        cur = t.column(col)
        if cur.null_count < n:
            continue
        src = nodes.column(col).to_pylist()
        vals = [src[i] if i is not None else None for i in which]
        f = t.schema.field(col)
        t = t.set_column(t.schema.get_field_index(col), f, pa.array(vals, f.type))
    if t.column("status").null_count == n:
        t = t.set_column(t.schema.get_field_index("status"), t.schema.field("status"), pa.array(["ok"] * n, pa.string()))
    return t


def error_rows(message: str) -> list[dict]:
    return [{"status": "error", "error": message}]


def predicted_only(model, clt, graph, plan: PerturbationPlan):
    """Graph-only reference: the change of every logit node predicted by the graph's linear system (the
    intervention's direct edges, propagated through the downstream feature nodes, each feature's outgoing
    edges taken per unit of activation); `measured_delta` stays null. Stands in until a model-measuring
    function (ct_ray.perturb) is plugged in, and exercises the sweep's perturbation fan-out."""
    A = graph.adjacency.double()
    nodes = graph.nodes
    kind = nodes.column("kind").to_pylist()
    act = torch.tensor(nodes.column("activation").to_numpy(zero_copy_only=False), dtype=torch.float64)
    node_col = nodes.column("node").to_pylist()
    pos = {v: i for i, v in enumerate(node_col)}
    is_feat = torch.tensor([k == "feature" for k in kind])
    # per unit of activation: feature columns divided by their activation, other sources fixed
    scale = torch.where(is_feat & (act != 0), 1.0 / act.where(act != 0, torch.ones_like(act)), torch.zeros_like(act))
    M = A * scale[None, :]
    logits = [i for i, k in enumerate(kind) if k == "logit"]
    rows = []
    sel = [pos[n] for n in (plan.nodes or []) if n in pos]
    if not sel or not logits:
        return rows
    MF = M * is_feat[None, :].double()
    depth = int(graph.meta.get("n_layers", 0) or max(nodes.column("layer").to_pylist()) + 1) + 2
    for j, iv in enumerate(plan.interventions):
        B = torch.zeros(len(kind), len(sel), dtype=torch.float64)
        for c, s in enumerate(sel):
            B[:, c] = M[:, s] * (iv.apply(float(act[s])) - float(act[s]))
        X = B.clone()  # x = B + MF x; the graph is a DAG over layers, so depth iterations are exact
        for _ in range(depth):
            X = B + MF @ X
        for c, s in enumerate(sel):
            for t in logits:
                rows.append({"intervention": j, "node": node_col[s], "op": iv.op, "value": iv.value,
                             "mode": iv.mode, "target_node": node_col[t], "target_id": nodes.column("node_id")[t].as_py(),
                             "target_kind": "logit", "target_token": nodes.column("token")[t].as_py(),
                             "baseline": float(act[t]), "predicted_delta": float(X[t, c]), "measured_delta": None})
    return rows
