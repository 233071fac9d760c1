"""Graph JSON in the circuit-tracer / Neuronpedia format, so existing graph viewers open ct_ray graphs."""

from __future__ import annotations

import torch


def cantor(a: int, b: int) -> int:
    return (a + b) * (a + b + 1) // 2 + b


def cumulative_influence(inf: torch.Tensor) -> torch.Tensor:
    """Each node's cumulative share of the total influence, nodes sorted by decreasing influence (circuit-tracer's
    `influence` field: smaller means more important)."""
    order = torch.argsort(inf, descending=True)
    cum = torch.cumsum(inf[order], 0) / inf.sum().clamp_min(1e-30)
    out = torch.empty_like(inf)
    out[order] = cum
    return out


def graph_json(graph, slug: str | None = None) -> dict:
    """The JSON dict of `graph` (typically a pruned graph). Links are its non-zero edges."""
    meta = graph.meta
    L = meta["n_layers"]
    nodes = graph.nodes.to_pylist()
    inf = graph.column("influence")
    cum = cumulative_influence(torch.nan_to_num(inf, nan=0.0)) if torch.isfinite(inf).any() else None
    out_nodes = []
    for i, n in enumerate(nodes):
        k, l, p, f, t = n["kind"], n["layer"], n["position"], n["feature"], n["token"]
        rec = {
            "node_id": n["node_id"],
            "feature": None,
            "layer": str(l),
            "ctx_idx": p,
            "feature_type": None,
            "token_prob": 0.0,
            "is_target_logit": False,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "jsNodeId": None,
            "clerp": "",
            "influence": float(cum[i]) if cum is not None else None,
            "activation": None,
        }
        if k == "feature":
            rec.update(feature=cantor(l, f), feature_type="cross layer transcoder", jsNodeId=f"{l}_{f}-0",
                       activation=n["activation"])
        elif k == "error":
            rec.update(feature=-1, feature_type="mlp reconstruction error", jsNodeId=f"{l}_-1-{p}")
        elif k == "embedding":
            rec.update(feature=p, layer="E", feature_type="embedding", jsNodeId=f"E_{t}-{p}")
        else:
            prob = n["probability"]
            rec.update(feature=t, layer=str(L + 1), feature_type="logit", jsNodeId=f"L_{t}-{p}", token_prob=prob,
                       is_target_logit=(t == meta["logit_tokens"][0]), influence=None,
                       clerp=f'Output "{n["token_str"]}" (p={prob:.3f})')
        out_nodes.append(rec)
    ids = [n["node_id"] for n in nodes]
    tgt, src = torch.nonzero(graph.adjacency, as_tuple=True)
    w = graph.adjacency[tgt, src].tolist()
    links = [{"source": ids[s], "target": ids[t], "weight": x} for s, t, x in zip(src.tolist(), tgt.tolist(), w)]
    # viewers expect every non-fixed node to take part in a link
    linked = {x["source"] for x in links} | {x["target"] for x in links}
    out_nodes = [n for n in out_nodes if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")]
    pruning = meta.get("pruning", {})
    return {
        "metadata": {
            "slug": slug or "ct-ray-graph",
            "scan": meta.get("clt") or meta.get("model"),
            "transcoder_list": [],
            "prompt_tokens": meta["token_strs"],
            "prompt": meta.get("prompt") or "".join(meta["token_strs"]),
            "node_threshold": pruning.get("node_threshold"),
            "schema_version": 1,
            "info": {"generator": {"name": "ct_ray", "version": "0.1.0"}, "model": meta.get("model"),
                     "transcoder_set": meta.get("clt")},
            "generation_settings": {"max_n_logits": meta.get("max_n_logits"),
                                    "desired_logit_prob": meta.get("desired_logit_prob"),
                                    "max_feature_nodes": meta.get("max_feature_nodes")},
            "pruning_settings": {"node_threshold": pruning.get("node_threshold"),
                                 "edge_threshold": pruning.get("edge_threshold")},
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": out_nodes,
        "links": links,
    }
