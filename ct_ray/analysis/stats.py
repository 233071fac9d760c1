"""Per-unit work of `ct-ray analyze`: the rows of a group of graphs in, small partial aggregates out.

A unit is a set of graphs whose node and edge rows sit in the same few data files. Everything here is a pure function
of those rows, so units run in any order, in this process or as Ray tasks, and their partials merge associatively
(`Partials.merge`): memory is bounded by one unit plus the sweep's distinct features and paths, never the sweep.

Definitions (docs/analysis.md):
- a feature's *logit influence* in a graph is `nodes.influence` (w Σ_{k>=1} Â^k: its share of the influence on the
  logit nodes, weighted by the logits' probabilities), summed over its positions; the same number the nodes table,
  the explorer and the exported JSON derive from;
- the logit tokens a feature *pushes* are the sums of its direct edges into each logit node;
- a *path* feature -> ... -> logit is scored by p(logit) x Π Â[t, s] over its edges, Â the absolute edge weights
  with each target's incoming weights normalised to sum to 1 (the pruning's matrix): its term in the logit influence
  of its first node. Paths through error or embedding nodes are not circuits of features and are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

TOP_KEYS = 5  # graphs listed per feature (top_keys)
TOP_LOGITS = 5  # logit tokens listed per feature
NODE_COLS = ["key", "node", "node_id", "kind", "layer", "feature", "token", "token_str", "activation", "probability",
             "influence", "kept"]
EDGE_COLS = ["key", "source", "target", "weight", "kept"]
# a feature as one int64: CLT (its index in the run's CLT list) | layer | index. Partials are integer columns only, so
# merging the sweep's distinct (feature, logit) pairs stays small and fast
_CLT_SHIFT, _LAYER_SHIFT = 44, 28


def feature_code(clt_code, layer, feature):
    return (np.asarray(clt_code, np.int64) << _CLT_SHIFT) | (np.asarray(layer, np.int64) << _LAYER_SHIFT) \
        | np.asarray(feature, np.int64)


def decode_feature(code: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    code = np.asarray(code, np.int64)
    return code >> _CLT_SHIFT, (code >> _LAYER_SHIFT) & ((1 << (_CLT_SHIFT - _LAYER_SHIFT)) - 1), \
        code & ((1 << _LAYER_SHIFT) - 1)


@dataclass
class Partials:
    """What a unit contributes: per-feature sums, candidate top graphs and logits per feature, and its graphs' paths.
    Features are `feature_code`s, graphs their index in the run's key list (`kid`), logits their token id."""

    features: pa.Table  # fcode, n_prompts, n_prompts_kept, n_nodes, act_sum, act_max, inf_sum, inf_max
    top_keys: pa.Table  # fcode, kid, inf (<= TOP_KEYS rows per feature)
    logits: pa.Table  # fcode, token, weight
    tokens: pa.Table  # token, token_str of the logit nodes seen
    paths: pa.Table  # circuit_paths rows without the sweep-level columns
    supernodes: pa.Table | None = None  # graph-level automatic supernodes rows (with --supernodes)
    pairs: pa.Table | None = None  # features co-grouped in a graph: a, b (feature codes), n (graphs)
    n_graphs: int = 0
    seconds: dict = field(default_factory=dict)


def merge_partials(parts: list) -> Partials | None:
    """One Partials from several (None entries skipped): sums and maxima summed again, top lists cut again."""
    parts = [p for p in parts if p is not None]
    if len(parts) <= 1:
        return parts[0] if parts else None
    cat = lambda name: pa.concat_tables([getattr(p, name) for p in parts])  # noqa: E731
    sn = [p for p in parts if p.supernodes is not None]
    if sn:
        from .sweep_supernodes import merge_pairs
    return Partials(features=_sum_features(cat("features")), top_keys=top_per_feature(cat("top_keys"), "inf", TOP_KEYS),
                    logits=_agg(cat("logits"), ["fcode", "token"], [("weight", "sum")]),
                    tokens=_agg(cat("tokens"), ["token"], [("token_str", "min")]), paths=cat("paths"),
                    supernodes=pa.concat_tables([p.supernodes for p in sn]) if sn else None,
                    pairs=merge_pairs([p.pairs for p in sn]) if sn else None, n_graphs=sum(p.n_graphs for p in parts))


def _agg(t: pa.Table, keys: list[str], specs: list[tuple[str, str]]) -> pa.Table:
    """group_by + aggregate with the aggregated columns keeping their own names (keys first)."""
    g = t.group_by(keys, use_threads=False).aggregate(specs)
    return pa.table({**{k: g.column(k) for k in keys}, **{c: g.column(f"{c}_{fn}") for c, fn in specs}})


def _sum_features(t: pa.Table) -> pa.Table:
    return _agg(t, ["fcode"], [("n_prompts", "sum"), ("n_prompts_kept", "sum"), ("n_nodes", "sum"),
                               ("act_sum", "sum"), ("act_max", "max"), ("inf_sum", "sum"), ("inf_max", "max")])


def top_per_feature(t: pa.Table, by: str, k: int, absolute: bool = False) -> pa.Table:
    """The `k` rows of largest `by` (or |by|) per feature, largest first; rows sorted by feature."""
    if not t.num_rows:
        return t
    score = pc.abs(t.column(by)) if absolute else t.column(by)
    t = t.append_column("_s", score).sort_by([("fcode", "ascending"), ("_s", "descending")])
    f = t.column("fcode").to_numpy()
    new = np.ones(len(f), bool)
    new[1:] = f[1:] != f[:-1]
    start = np.maximum.accumulate(np.where(new, np.arange(len(f)), 0))
    return t.filter(pa.array(np.arange(len(f)) - start < k)).drop_columns(["_s"])


def unit_partials(nodes: pa.Table, edges: pa.Table, keys: list[str], kids: list[int], clt_codes: list[int], *,
                  top_paths: int = 10, max_hops: int = 4, beam: int = 64, supernodes: dict | None = None) -> Partials:
    """The partials of one unit's graphs: `nodes` / `edges` hold their rows (NODE_COLS / EDGE_COLS); graph `keys[i]`
    has index `kids[i]` in the run's key list and CLT code `clt_codes[i]` (its index in the run's CLT list).
    `supernodes`: {'clts': the run's CLT ids, 'models': their models, 'use_clt': bool} to group each graph's features
    (sweep_supernodes.py)."""
    at = pc.index_in(nodes.column("key"), value_set=pa.array(keys, pa.string())).to_numpy(zero_copy_only=False)
    kid = np.asarray(kids, np.int32)[at]
    ccode = np.asarray(clt_codes, np.int64)[at]
    is_f = np.asarray(pc.fill_null(pc.equal(nodes.column("kind"), "feature"), False).to_numpy(zero_copy_only=False))
    is_l = np.asarray(pc.fill_null(pc.equal(nodes.column("kind"), "logit"), False).to_numpy(zero_copy_only=False))
    node = nodes.column("node").to_numpy(zero_copy_only=False)
    layer = pc.fill_null(nodes.column("layer"), 0).to_numpy(zero_copy_only=False)
    feat = pc.fill_null(nodes.column("feature"), 0).to_numpy(zero_copy_only=False)
    infl = pc.fill_null(nodes.column("influence"), 0.0).to_numpy(zero_copy_only=False).astype(np.float64)
    infl[~np.isfinite(infl)] = 0.0
    fcode = feature_code(ccode[is_f], layer[is_f], feat[is_f])
    feats = pa.table({"kid": kid[is_f], "fcode": fcode, "influence": infl[is_f],
                      "activation": pc.fill_null(nodes.column("activation"), 0.0).filter(pa.array(is_f)),
                      "kept": pc.cast(pc.fill_null(nodes.column("kept"), True), pa.int8()).filter(pa.array(is_f))})
    # one row per (graph, feature): its positions summed
    # activation twice under two names: one group_by gives its sum and its max (_agg names a result by its column)
    feats = feats.append_column("n", pa.array(np.ones(feats.num_rows, np.int64))).append_column(
        "act", feats.column("activation"))
    per = _agg(feats, ["kid", "fcode"], [("influence", "sum"), ("activation", "sum"), ("act", "max"), ("kept", "max"),
                                         ("n", "sum")])
    features = _sum_features(pa.table({
        "fcode": per.column("fcode"), "n_prompts": pa.array(np.ones(per.num_rows, np.int64)),
        "n_prompts_kept": pc.cast(per.column("kept"), pa.int64()), "n_nodes": per.column("n"),
        "act_sum": pc.cast(per.column("activation"), pa.float64()), "act_max": pc.cast(per.column("act"), pa.float32()),
        "inf_sum": per.column("influence"), "inf_max": pc.cast(per.column("influence"), pa.float32())}))
    top_keys = top_per_feature(pa.table({"fcode": per.column("fcode"), "kid": per.column("kid"),
                                          "inf": pc.cast(per.column("influence"), pa.float32())}), "inf", TOP_KEYS)
    # direct edges from feature nodes into logit nodes, summed by the logit's token
    e_at = pc.index_in(edges.column("key"), value_set=pa.array(keys, pa.string())).to_numpy(zero_copy_only=False)
    e = pa.table({"kid": np.asarray(kids, np.int32)[e_at], "source": edges.column("source"),
                  "target": edges.column("target"), "weight": pc.cast(edges.column("weight"), pa.float64())})
    src = pa.table({"kid": kid[is_f], "source": node[is_f], "fcode": fcode})
    tok = pc.fill_null(nodes.column("token"), -1).filter(pa.array(is_l))
    tgt = pa.table({"kid": kid[is_l], "target": node[is_l], "token": tok})
    direct = e.join(tgt, ["kid", "target"], join_type="inner", use_threads=False).join(
        src, ["kid", "source"], join_type="inner", use_threads=False)
    logits = _agg(direct.select(["fcode", "token", "weight"]), ["fcode", "token"], [("weight", "sum")])
    tokens = _agg(pa.table({"token": tok, "token_str": nodes.column("token_str").filter(pa.array(is_l))}), ["token"],
                  [("token_str", "min")])
    paths = _unit_paths(nodes.append_column("ccode", pa.array(ccode.astype(np.int32))), edges, keys, top_paths,
                        max_hops, beam)
    out = Partials(features, top_keys, logits, tokens, paths, n_graphs=int(len(np.unique(at))))
    if supernodes is not None:
        from .sweep_supernodes import graph_groups

        def fcode_of(n: pa.Table, i: int) -> np.ndarray:
            isf = np.asarray(pc.fill_null(pc.equal(n.column("kind"), "feature"), False).to_numpy(zero_copy_only=False))
            code = feature_code(clt_codes[i], pc.fill_null(n.column("layer"), 0).to_numpy(zero_copy_only=False),
                                pc.fill_null(n.column("feature"), 0).to_numpy(zero_copy_only=False))
            return np.where(isf, code, -1)

        ids = [supernodes["clts"][c] for c in clt_codes]
        models = [supernodes["models"][c] for c in clt_codes]
        out.supernodes, out.pairs = graph_groups(nodes, edges, keys, fcode_of, ids, models, supernodes["use_clt"])
    return out


# --- paths -----------------------------------------------------------------------------------------------------
_PATH_SCHEMA = pa.schema([("key", pa.string()), ("rank", pa.int16()), ("path", pa.string()), ("hops", pa.int16()),
                          ("node_ids", pa.list_(pa.string())), ("layers", pa.list_(pa.int32())),
                          ("features", pa.list_(pa.int32())), ("logit_token", pa.int32()), ("logit_str", pa.string()),
                          ("score", pa.float32()), ("ccode", pa.int32())])
_FEATURE, _LOGIT, _OTHER = 0, 1, 2


def _groups(key_col, keys: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(row order grouping rows by key, bounds: group i is order[bounds[i]:bounds[i+1]]) for `keys`' order."""
    code = pc.fill_null(pc.index_in(key_col, value_set=keys), -1).to_numpy(zero_copy_only=False)
    order = np.argsort(code, kind="stable")
    return order, np.searchsorted(code[order], np.arange(len(keys) + 1))


def _np(col, fill, dtype) -> np.ndarray:
    """A column as a numpy array of `dtype`, nulls as `fill`."""
    return np.asarray(pc.fill_null(col, fill).to_numpy(zero_copy_only=False), dtype=dtype)


def _unit_paths(nodes: pa.Table, edges: pa.Table, keys: list[str], top: int, max_hops: int, beam: int) -> pa.Table:
    """Every graph's strongest paths: the unit's columns turned into numpy once, then one small search per graph."""
    kv = pa.array(keys, pa.string())
    n_ord, n_b = _groups(nodes.column("key"), kv)
    e_ord, e_b = _groups(edges.column("key"), kv)
    kinds = nodes.column("kind")
    kind = np.full(nodes.num_rows, _OTHER, np.int8)
    kind[_np(pc.equal(kinds, "feature"), False, bool)] = _FEATURE
    kind[_np(pc.equal(kinds, "logit"), False, bool)] = _LOGIT
    N = {"node": _np(nodes.column("node"), -1, np.int64), "kind": kind, "layer": _np(nodes.column("layer"), -1, np.int64),
         "feature": _np(nodes.column("feature"), -1, np.int64),
         "prob": _np(nodes.column("probability"), float("nan"), np.float64), "kept": _np(nodes.column("kept"), True, bool)}
    E = {"source": _np(edges.column("source"), -1, np.int64), "target": _np(edges.column("target"), -1, np.int64),
         "weight": np.abs(_np(edges.column("weight"), 0.0, np.float64)), "kept": _np(edges.column("kept"), True, bool)}
    found = []  # (key index, rank, score, node rows of the unit table)
    for i in range(len(keys)):
        rows_n = n_ord[n_b[i]:n_b[i + 1]]
        rows_e = e_ord[e_b[i]:e_b[i + 1]]
        if len(rows_n) and len(rows_e):
            for rank, (score, path) in enumerate(_graph_paths({c: v[rows_n] for c, v in N.items()},
                                                              {c: v[rows_e] for c, v in E.items()}, top, max_hops, beam)):
                found.append((i, rank, score, rows_n[list(path)]))
    return _path_rows(nodes, keys, found)


def _graph_paths(n: dict, e: dict, top: int, max_hops: int, beam: int) -> list[tuple[float, tuple]]:
    """The `top` strongest feature -> ... -> logit paths of one graph (kept rows), one per signature: a beam search
    back from the logits, `beam` partial paths kept per hop, up to `max_hops` edges. Paths as rows of `n`."""
    keep_n = n["kept"]
    ids = np.where(keep_n, n["node"], -1)
    order = np.argsort(ids)
    sid = ids[order]
    ke = e["kept"]
    s_raw, t_raw, w = e["source"][ke], e["target"][ke], e["weight"][ke]
    si, ti = np.searchsorted(sid, s_raw).clip(0, len(sid) - 1), np.searchsorted(sid, t_raw).clip(0, len(sid) - 1)
    ok = (sid[si] == s_raw) & (sid[ti] == t_raw) & (sid[si] >= 0) & (sid[ti] >= 0)
    s, t, w = order[si[ok]], order[ti[ok]], w[ok]
    tot = np.bincount(t, weights=w, minlength=len(ids))
    a_hat = w / np.where(tot[t] > 0, tot[t], 1.0)
    keep = (n["kind"][s] == _FEATURE) & (a_hat > 0)  # feature sources only: paths stay on features
    s, t, a_hat = s[keep], t[keep], a_hat[keep]
    by_t = np.argsort(t, kind="stable")
    s, t, a_hat = s[by_t], t[by_t], a_hat[by_t]
    starts = np.searchsorted(t, np.arange(len(ids) + 1))
    prob = n["prob"]
    logit = np.flatnonzero((n["kind"] == _LOGIT) & keep_n & np.isfinite(prob) & (prob > 0))
    score, paths = prob[logit], logit[:, None]  # partial paths: rows from the head to the logit
    found: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(max_hops):  # one hop back: every incoming feature edge of every head, the best `beam` kept
        head = paths[:, 0]
        cnt = starts[head + 1] - starts[head]
        if not cnt.sum():
            break
        rep = np.repeat(np.arange(len(head)), cnt)
        at = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt) + np.repeat(starts[head], cnt)
        cand = score[rep] * a_hat[at]
        pick = np.argsort(-cand, kind="stable")[:beam]
        score, paths = cand[pick], np.concatenate([s[at[pick]][:, None], paths[rep[pick]]], axis=1)
        found.append((score, paths))
    best: dict[tuple, tuple] = {}
    layer, feat = n["layer"], n["feature"]
    scores = np.concatenate([f[0] for f in found]) if found else np.zeros(0)
    which = np.concatenate([np.full(len(f[0]), h) for h, f in enumerate(found)]) if found else np.zeros(0, int)
    within = np.concatenate([np.arange(len(f[0])) for f in found]) if found else np.zeros(0, int)
    for j in np.argsort(-scores, kind="stable"):  # the best path of each signature (positions dropped)
        rows = found[which[j]][1][within[j]]
        sig = (*((int(layer[r]), int(feat[r])) for r in rows[:-1]), int(rows[-1]))
        if sig not in best:
            best[sig] = (float(scores[j]), tuple(int(r) for r in rows))
            if len(best) == top:
                break
    return list(best.values())


def _path_rows(nodes: pa.Table, keys: list[str], found: list) -> pa.Table:
    """circuit_paths rows (without the sweep-level columns) of the paths found: list columns built from offsets, only
    the signature strings in Python."""
    if not found:
        return _PATH_SCHEMA.empty_table()
    lens = np.array([len(f[3]) for f in found], np.int32)
    flat = pa.array(np.concatenate([f[3] for f in found]))
    offs = pa.array(np.r_[0, np.cumsum(lens)].astype(np.int32))
    last = np.cumsum(lens) - 1  # the logit, last on each path
    body = np.setdiff1d(np.arange(int(lens.sum())), last)  # the features
    b_offs = pa.array(np.r_[0, np.cumsum(lens - 1)].astype(np.int32))
    take = lambda c, idx: nodes.column(c).take(flat).combine_chunks().take(pa.array(idx))  # noqa: E731
    lay, fea = take("layer", body), take("feature", body)
    tok_str = take("token_str", last)
    l_py, f_py, t_py = lay.to_pylist(), fea.to_pylist(), tok_str.to_pylist()
    sigs, at = [], 0
    for m, t in zip((lens - 1).tolist(), t_py):
        sigs.append(" > ".join([*(f"L{a}/F{b}" for a, b in zip(l_py[at:at + m], f_py[at:at + m])),
                                json.dumps(t, ensure_ascii=False)]))
        at += m
    ki = np.array([f[0] for f in found])
    return pa.table({
        "key": pa.array(keys, pa.string()).take(pa.array(ki)), "rank": pa.array([f[1] for f in found], pa.int16()),
        "path": pa.array(sigs, pa.string()), "hops": pa.array(lens - 1, pa.int16()),
        "node_ids": pa.ListArray.from_arrays(offs, nodes.column("node_id").take(flat).combine_chunks()),
        "layers": pa.ListArray.from_arrays(b_offs, lay.cast(pa.int32())),
        "features": pa.ListArray.from_arrays(b_offs, fea.cast(pa.int32())),
        "logit_token": take("token", last).cast(pa.int32()), "logit_str": tok_str,
        "score": pa.array([f[2] for f in found], pa.float32()), "ccode": take("ccode", last)}, schema=_PATH_SCHEMA)
