"""Graph JSON in the circuit-tracer / Neuronpedia format, so existing graph viewers open ct_ray graphs.

The JSON is built from node rows and edge rows (never a dense adjacency), so an in-memory graph (`graph_json`)
and a sweep's table rows (export_files.py) go through the same code and give the same file. The format follows
Neuronpedia's published graph schema (apps/webapp/app/api/graph/graph-schema.json in
https://github.com/hijohnnylin/neuronpedia) and circuit-tracer's frontend models and `graph-metadata.json` index
(circuit_tracer/frontend/graph_models.py, utils.py in https://github.com/safety-research/circuit-tracer).
See docs/export.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa

# built-in model names (ct_ray.models) -> the Hugging Face id of the weights their package ships
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_HUB_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_KIND_TYPE = {"feature": "cross layer transcoder", "error": "mlp reconstruction error", "embedding": "embedding",
              "logit": "logit"}
NODE_COLUMNS = ["node", "node_id", "kind", "layer", "position", "feature", "token", "token_str", "activation",
                "probability", "influence"]
INDEX_FIELDS = ("slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold", "schema_version",
                "title_prefix")


def _generator() -> dict:
    from .. import __version__

    return {"name": "ct_ray", "version": __version__}


def cantor(a: int, b: int) -> int:
    return (a + b) * (a + b + 1) // 2 + b


def process_token(s: str) -> str:
    """Whitespace tokens made visible, as circuit-tracer writes `prompt_tokens`."""
    return s.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def _is_local(s: str) -> bool:
    return "://" not in s or s.startswith("file://")


def hub_id(model: str) -> str | None:
    """The Hugging Face id of a model as sweeps record it (built-in name, local directory or hub id), if known."""
    if model in HUB_IDS:
        return HUB_IDS[model]
    p = Path(model.removeprefix("file://")).expanduser()
    if p.is_dir():  # a local copy: its config names the hub id it came from, when it does
        try:
            name = str(json.loads((p / "config.json").read_text()).get("_name_or_path") or "")
        except (OSError, ValueError, AttributeError):
            name = ""
        return name if _HUB_RE.match(name) and not Path(name).exists() else None
    return model if _HUB_RE.match(model) and not p.exists() else None


def scan_id(model: str | None) -> str:
    """`metadata.scan`: Neuronpedia uses it as a model id (e.g. gemma-2-2b, for google/gemma-2-2b), so it is the
    lower-cased name of the model's hub id, else of its directory; never a path."""
    name = hub_id(model or "") or (model or "").removeprefix("file://").rstrip("/\\")
    base = re.split(r"[/\\]", name)[-1].lower()
    return re.sub(r"[^a-z0-9._\-]+", "-", base).strip("-.") or "model"


def transcoder_id(clt: str | None) -> str:
    """The CLT as the JSON names it: a remote URL whole, a local directory by its name only (no local paths)."""
    clt = clt or ""
    return clt if not _is_local(clt) or clt.startswith("random(") else Path(clt.rstrip("/\\")).name


def cumulative_influence(inf: np.ndarray) -> np.ndarray | None:
    """circuit-tracer's `influence` field: a node's influence plus that of every more influential node, over the
    total (smaller = more important), clamped to [0, 1] (the float cumulative sum overshoots 1). None when no
    influence is known."""
    x = np.nan_to_num(np.asarray(inf, dtype=np.float64), nan=0.0).clip(min=0.0)
    total = x.sum()
    if not np.isfinite(inf).any() or total <= 0:
        return None
    order = np.argsort(-x, kind="stable")
    out = np.empty_like(x)
    out[order] = np.cumsum(x[order]) / total
    return out.clip(0.0, 1.0)


def supernode_params(groups, present: set[str]) -> tuple[list[list[str]], list[str]]:
    """Supernodes ({name, nodes} records or [name, *ids] lists) as `qParams.supernodes` ([name, *node ids]) and
    the pinned ids that make the viewers draw them; members not in the exported graph are left out."""
    out, pinned = [], []
    for g in groups or []:
        name, ids = (g["name"], g["nodes"]) if isinstance(g, dict) else (g[0], g[1:])
        ids = [i for i in ids if i in present]
        if ids:
            out.append([str(name), *ids])
            pinned += [i for i in ids if i not in pinned]
    return out, pinned


def _settings(d: dict, ints: tuple, floats: tuple) -> dict:
    """Known settings with the schema's types; unknown (None) values left out (the schema has no nulls there)."""
    out = {k: int(d[k]) for k in ints if d.get(k) is not None}
    out.update({k: float(d[k]) for k in floats if d.get(k) is not None})
    return out


def prune_defaults() -> dict:
    """The pruning thresholds of ct_ray/specs/attribution.py `PruneSpec` (node 0.8, edge 0.98)."""
    from ..specs.attribution import PruneSpec

    return PruneSpec().model_dump()


def viewer_node_threshold(cum, ranked, node_threshold: float | None = None, *, kept_set: bool = False) -> float:
    """`metadata.node_threshold`, where the viewers' influence slider starts (they show the feature and error nodes
    whose `influence` is at most it): the graph opens pruned at `node_threshold` (the thresholds it was pruned
    with, else PruneSpec's default 0.8) by ct_ray's pruning rule (prune.py): the smallest most influential set of
    the feature / error nodes (`ranked`) whose share of their influence reaches the threshold.

    cum: each node row's cumulative influence (`cumulative_influence`, circuit-tracer's definition: over every
    node, embeddings included). kept_set: `cum` is over the graph the rows were pruned from (they are that
    pruning's kept set already): every row shows. Otherwise `cum` is over these rows (a sweep's default
    `graph_rows: pruned`, or an unpruned graph), each row's share is recovered from it and the viewers prune them
    once more at the threshold, as the explorer does."""
    t = float(node_threshold if node_threshold is not None else prune_defaults()["node_threshold"])
    c = np.asarray(cum, dtype=np.float64)
    r = np.asarray(ranked, dtype=bool)
    if not r.any():
        return t
    if kept_set:
        return max(t, float(c[r].max()))
    order = np.argsort(c, kind="stable")
    share = np.diff(c[order], prepend=0.0)[r[order]]  # the cumulative sum undone, feature / error rows only
    if share.sum() <= 0:
        return t
    reach = np.cumsum(share) / share.sum()
    i = min(int(np.searchsorted(reach, t * (1 - 1e-9))), len(reach) - 1)
    return float(c[order][r[order]][i])


def build_graph_json(nodes: pa.Table, edges: pa.Table, meta: dict, *, slug: str, influence=None, scan: str | None = None,
                     feature_details: dict | None = None, supernodes=None, title_prefix: str | None = None,
                     kept_set: bool = False) -> dict:
    """The JSON dict of one graph from its rows.

    nodes: NODE_COLUMNS rows of the exported graph; edges: `source`, `target` (`node` values) and `weight`;
    influence: each node row's cumulative influence (see `cumulative_influence`; None: not known); kept_set: it is
    over the graph the rows were pruned from (see `viewer_node_threshold`); meta: prompt, token_strs, n_layers,
    logit_tokens, model, clt, attribution / pruning settings (`pruning`: node_threshold, edge_threshold),
    created_at_ms (all optional but token_strs and n_layers)."""
    cols = {c: nodes.column(c).to_pylist() for c in NODE_COLUMNS if c != "influence"}
    L = int(meta["n_layers"])
    target = (meta.get("logit_tokens") or [None])[0]
    ids = cols["node_id"]
    by_node = dict(zip(cols["node"], ids))
    order = np.lexsort((edges.column("source").to_numpy(), edges.column("target").to_numpy()))
    src = edges.column("source").to_numpy()[order].tolist()
    tgt = edges.column("target").to_numpy()[order].tolist()
    w = edges.column("weight").to_numpy()[order].tolist()
    links = [{"source": by_node[s], "target": by_node[t], "weight": x} for s, t, x in zip(src, tgt, w)]
    # viewers expect every feature / error node to take part in a link
    linked = set(src) | set(tgt)
    out_nodes = []
    for i in range(nodes.num_rows):
        k, l, p, f, t = (cols[c][i] for c in ("kind", "layer", "position", "feature", "token"))
        if k in ("feature", "error") and cols["node"][i] not in linked:
            continue
        cum = float(influence[i]) if influence is not None else None
        rec = {"node_id": ids[i], "feature": None, "layer": str(l), "ctx_idx": p, "feature_type": _KIND_TYPE[k],
               "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": "",
               "clerp": "", "influence": cum, "activation": None}
        if k == "feature":
            act = cols["activation"][i]
            rec.update(feature=cantor(l, f), jsNodeId=f"{l}_{f}-0", activation=float(act) if act is not None else None)
        elif k == "error":
            rec.update(feature=-1, jsNodeId=f"{l}_-1-{p}")
        elif k == "embedding":
            rec.update(feature=p, layer="E", jsNodeId=f"E_{t}-{p}")
        else:
            prob = float(cols["probability"][i] or 0.0)
            rec.update(feature=t, layer=str(L + 1), jsNodeId=f"L_{t}-{p}", token_prob=prob, is_target_logit=t == target,
                       influence=None, clerp=f'Output "{process_token(cols["token_str"][i] or "")}" (p={prob:.3f})')
        out_nodes.append(rec)
    present = {n["node_id"] for n in out_nodes}
    sn, pinned = supernode_params(supernodes, present)
    pruning = meta.get("pruning") if isinstance(meta.get("pruning"), dict) else {}
    metadata = {
        "slug": slug,
        "scan": scan or scan_id(meta.get("model")),
        "transcoder_list": [],
        "prompt_tokens": [process_token(s) for s in meta["token_strs"]],
        "prompt": meta.get("prompt") or "".join(meta["token_strs"]),
        "schema_version": 1,
        "feature_details": dict(feature_details or {}),
        "info": {"generator": _generator(), "model": hub_id(meta.get("model") or "") or scan_id(meta.get("model")),
                 "transcoder_set": transcoder_id(meta.get("clt")),
                 "source_urls": [meta["clt"]] if meta.get("clt") and not _is_local(meta["clt"]) else []},
        "generation_settings": _settings(meta, ("max_n_logits", "batch_size", "max_feature_nodes"),
                                         ("desired_logit_prob",)),
        "pruning_settings": _settings(pruning, (), ("node_threshold", "edge_threshold")),
    }
    if meta.get("created_at_ms") is not None:
        metadata["info"]["create_time_ms"] = int(meta["created_at_ms"])
    if title_prefix:
        metadata["title_prefix"] = title_prefix
    t = metadata["pruning_settings"].get("node_threshold")
    metadata["node_threshold"] = (viewer_node_threshold(influence, [k in ("feature", "error") for k in cols["kind"]], t,
                                                         kept_set=kept_set)
                                  if influence is not None else viewer_node_threshold([], [], t))
    return {"metadata": metadata,
            "qParams": {"pinnedIds": pinned, "supernodes": sn, "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": out_nodes, "links": links}


def _qk_only_node(node_id: str) -> dict:
    """A descriptor (Neuronpedia's `qk_only_nodes`) of a QK contributor that is not among the exported nodes."""
    if node_id == "bias":
        return {"node_id": node_id, "feature": None, "layer": "0", "ctx_idx": 0, "feature_type": "bias",
                "jsNodeId": "bias", "clerp": "constant terms (biases, BOS)", "activation": None}
    a, b, c = node_id.split("_")
    if a == "E":
        return {"node_id": node_id, "feature": int(c), "layer": "E", "ctx_idx": int(c), "feature_type": "embedding",
                "jsNodeId": f"E_{b}-{c}", "clerp": "", "activation": None}
    if b == "-1":
        return {"node_id": node_id, "feature": -1, "layer": a, "ctx_idx": int(c),
                "feature_type": _KIND_TYPE["error"], "jsNodeId": f"{a}_-1-{c}", "clerp": "", "activation": None}
    return {"node_id": node_id, "feature": cantor(int(a), int(b)), "layer": a, "ctx_idx": int(c),
            "feature_type": _KIND_TYPE["feature"], "jsNodeId": f"{a}_{b}-0", "clerp": "", "activation": None}


def add_attention(data: dict, nodes: pa.Table, edge_heads: pa.Table | None = None, qk: pa.Table | None = None) -> dict:
    """Attention attribution into a graph's JSON (in place): each link's head loadings (`heads`: [[layer, head,
    weight], ...]; layer -1: head -1 the residual path, head -2 the heads not listed), and on each node that QK
    results are attached to, Neuronpedia's `qk_tracing_results` (with `qk_only_nodes` for contributors outside the
    graph) plus `qk_heads`, the scores explained ([layer, head, query position, key position, score, pattern])."""
    node_id = dict(zip(nodes.column("node").to_pylist(), nodes.column("node_id").to_pylist()))
    if edge_heads is not None and edge_heads.num_rows:
        per: dict[tuple, list] = {}
        cols = [edge_heads.column(c).to_pylist() for c in ("source", "target", "layer", "head", "weight")]
        for s, t, l, h, w in zip(*cols):
            if s in node_id and t in node_id:
                per.setdefault((node_id[s], node_id[t]), []).append([l, h, w])
        for link in data["links"]:
            hs = per.get((link["source"], link["target"]))
            if hs:
                link["heads"] = sorted(hs, key=lambda x: -abs(x[2]))
    if qk is not None and qk.num_rows:
        by_target: dict[str, dict] = {}
        for r in qk.to_pylist():
            t = node_id.get(r["target"])
            if t is None:
                continue
            res = by_target.setdefault(t, {"pair_wise_contributors": [], "top_q_marginal_contributors": [],
                                           "top_k_marginal_contributors": [], "heads": {}})
            res["heads"][(r["layer"], r["head"], r["query_position"], r["key_position"])] = [r["score"], r["pattern"]]
            if r["role"] == "pair":
                res["pair_wise_contributors"].append([r["query_source"], r["key_source"], r["weight"]])
            elif r["role"] == "query":
                res["top_q_marginal_contributors"].append([r["query_source"], r["weight"]])
            else:
                res["top_k_marginal_contributors"].append([r["key_source"], r["weight"]])
        present = {n["node_id"] for n in data["nodes"]}
        only: dict[str, dict] = {}
        for n in data["nodes"]:
            res = by_target.get(n["node_id"])
            if res is None:
                continue
            heads = res.pop("heads")
            for v in res.values():
                v.sort(key=lambda x: -abs(x[-1]))
                for entry in v:
                    for i in entry[:-1]:
                        if i not in present and i not in only:
                            only[i] = _qk_only_node(i)
            n["qk_tracing_results"] = res
            n["qk_heads"] = [[*k, *v] for k, v in heads.items()]
        if only:
            data["qk_only_nodes"] = only
    return data


def graph_json(graph, slug: str | None = None, *, full=None, scan: str | None = None,
               feature_details: dict | None = None, supernodes=None, attention=None) -> dict:
    """The JSON dict of `graph` (typically a pruned graph): its nodes and non-zero edges. Influence is each node's
    cumulative share over `full` (the graph it was pruned from; circuit-tracer's definition) when given, else over
    `graph`'s own nodes. `attention`: the graph's `attention_attribution` (head loadings, QK), added to the JSON."""
    ref = full if full is not None else graph
    inf = ref.column("influence").numpy()
    if not np.isfinite(inf).any():  # an unpruned graph: influence not computed yet
        inf = ref.influence().numpy()
    cum = cumulative_influence(inf)
    if cum is not None and full is not None:
        pos = {n: i for i, n in enumerate(full.nodes.column("node").to_pylist())}
        cum = cum[[pos[n] for n in graph.nodes.column("node").to_pylist()]]
    data = build_graph_json(graph.nodes.select(NODE_COLUMNS), graph.edges(), graph.meta, slug=slug or "ct-ray-graph",
                            influence=cum, scan=scan, feature_details=feature_details, supernodes=supernodes,
                            kept_set=full is not None)
    if attention is not None:
        add_attention(data, graph.nodes, attention.edge_heads, attention.qk_rows)
    return data


def index_entry(data: dict) -> dict:
    """A graph's entry in `graph-metadata.json` (circuit-tracer's Metadata fields, as its server lists them)."""
    return {k: data["metadata"][k] for k in INDEX_FIELDS if k in data["metadata"]}


def merge_index(old: dict | None, entries: list[dict]) -> dict:
    """`graph-metadata.json` with `entries` added, replacing entries of the same slug in place (as circuit-tracer's
    add_graph_metadata does, but keeping their order so a re-run writes the same file)."""
    graphs = list((old or {}).get("graphs") or [])
    at = {g.get("slug"): i for i, g in enumerate(graphs)}
    for e in entries:
        if e["slug"] in at:
            graphs[at[e["slug"]]] = e
        else:
            at[e["slug"]] = len(graphs)
            graphs.append(e)
    return {**(old or {}), "graphs": graphs}
