"""`analyze`: a sweep's `feature_stats` and `circuit_paths`, from its committed tables into two more tables.

Plan: the sweep's 'ok' graphs and, per data file, the keys it holds (one key-column scan of `nodes` and `edges`).
Units: graphs grouped by the nodes file that holds them (and by CLT), cut to at most `unit_graphs` graphs, so a unit
reads a few files once. Each unit's rows become small partials (stats.py); the partials merge as they arrive. Units
run in this process or, with `workers > 1`, as Ray tasks (executor/tasks.py); memory stays at one unit per worker plus
the merged partials. The results replace the sweep's partitions of both tables in one commit each, so re-running
replaces and never duplicates. See docs/analysis.md.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import CTRayError
from ..store.names import check_name
from ..store.schemas import TABLES_SCHEMA_VERSION
from . import stats as st
from .stats import EDGE_COLS, NODE_COLS, TOP_KEYS, TOP_LOGITS, Partials

UNIT_GRAPHS = 1000


@dataclass
class Unit:
    """One task's share of the sweep: its graphs and the data files holding their rows (picklable, small)."""

    nodes: object  # KeyedRows subset
    edges: object
    keys: list[str]
    kids: list[int]  # index of each key in the run's key list
    clt_codes: list[int]  # index of each key's CLT in the run's CLT list


def plan_units(store, sweep_id: str, unit_graphs: int = UNIT_GRAPHS):
    """(units, keys, clts, models): the sweep's 'ok' graphs grouped by the nodes data file that holds them (and their
    CLT), at most `unit_graphs` a unit; keys and CLT ids are the lists the units' indices point into; models[i] is the
    model of clts[i]'s graphs."""
    from ..store.keyed import KeyedRows

    g = store.read("graphs", sweep_id, columns=["key", "status", "clt", "model"])
    ok = g.filter(pc.equal(g.column("status"), "ok"))
    if not g.num_rows:
        have = store.partitions("graphs")
        raise CTRayError(f"no committed graphs in sweep {sweep_id!r} of {store.url}"
                         + (f"; sweeps there: {', '.join(have[:10])}" if have else ""))
    if not ok.num_rows:
        raise CTRayError(f"sweep {sweep_id!r} has no 'ok' graphs to analyse ({g.num_rows} error rows)")
    keys = ok.column("key").to_pylist()
    clt_of = [c or "" for c in ok.column("clt").to_pylist()]
    clts = sorted(set(clt_of))
    code = {c: i for i, c in enumerate(clts)}
    model_of = dict(zip(clt_of, ok.column("model").to_pylist()))
    models = [model_of[c] for c in clts]
    nodes = KeyedRows(store, "nodes", sweep_id, set(keys))
    edges = KeyedRows(store, "edges", sweep_id, set(keys))
    groups: dict[tuple, list[int]] = {}
    for i in sorted(range(len(keys)), key=lambda i: (nodes.first_file(keys[i]), keys[i])):
        groups.setdefault((nodes.first_file(keys[i]), clt_of[i]), []).append(i)
    units = []
    for idx in groups.values():
        for a in range(0, len(idx), unit_graphs):
            part = idx[a:a + unit_graphs]
            ks = [keys[i] for i in part]
            units.append(Unit(nodes.subset(ks), edges.subset(ks), ks, part, [code[clt_of[i]] for i in part]))
    return units, keys, clts, models


def run_unit(unit: Unit, top_paths: int = 10, max_hops: int = 4, supernodes: dict | None = None) -> Partials | None:
    """Read one unit's rows and reduce them (the per-file work: runs in a Ray task as well as here)."""
    t0 = time.perf_counter()
    nodes = unit.nodes.read_table(unit.keys, NODE_COLS)
    edges = unit.edges.read_table(unit.keys, EDGE_COLS)
    t1 = time.perf_counter()
    if not nodes.num_rows:
        return None
    p = st.unit_partials(nodes, edges, unit.keys, unit.kids, unit.clt_codes, top_paths=top_paths, max_hops=max_hops,
                         supernodes=supernodes)
    p.seconds = {"read": t1 - t0, "reduce": time.perf_counter() - t1}
    return p


def finish(p: Partials, keys: list[str], clts: list[str], top_logits: int = TOP_LOGITS):
    """The merged partials as rows of `feature_stats`, `circuit_paths` and (when grouped) `supernodes`: graph-level
    rows, then the sweep's consensus groups (codes turned back into names)."""
    n_ok = len(keys)
    f = p.features.sort_by("fcode")
    fcode = f.column("fcode").to_numpy()
    ccode, layer, feat = st.decode_feature(fcode)
    key_arr, clt_arr = pa.array(keys, pa.string()), pa.array(clts, pa.string())
    keys_l, keys_v = _lists(p.top_keys, "kid", "inf", TOP_KEYS, fcode)
    keys_l = pa.ListArray.from_arrays(keys_l.offsets, key_arr.take(keys_l.values))
    tok = p.tokens.sort_by("token").combine_chunks()
    logit_l, logit_v = _lists(p.logits, "token", "weight", top_logits, fcode, absolute=True)
    at = np.searchsorted(tok.column("token").to_numpy(), logit_l.values.to_numpy(zero_copy_only=False))
    logit_l = pa.ListArray.from_arrays(logit_l.offsets, tok.column("token_str").combine_chunks().take(pa.array(at)))
    n_pr = f.column("n_prompts").to_numpy()
    stats = pa.table({
        "clt": clt_arr.take(pa.array(ccode)), "layer": pa.array(layer, pa.int32()), "feature": pa.array(feat, pa.int32()),
        "node_prefix": [f"{a}_{b}_" for a, b in zip(layer.tolist(), feat.tolist())],
        "n_prompts": pa.array(n_pr, pa.int32()), "n_prompts_kept": pc.cast(f.column("n_prompts_kept"), pa.int32()),
        "frac_prompts": pa.array(n_pr / max(n_ok, 1), pa.float32()), "n_nodes": f.column("n_nodes"),
        "activation_mean": pa.array(f.column("act_sum").to_numpy() / np.maximum(f.column("n_nodes").to_numpy(), 1),
                                    pa.float32()),
        "activation_max": f.column("act_max"), "influence_sum": f.column("inf_sum"),
        "influence_mean": pa.array(f.column("inf_sum").to_numpy() / np.maximum(n_pr, 1), pa.float32()),
        "influence_max": f.column("inf_max"),
        "top_logits": logit_l, "top_logit_weights": logit_v, "top_keys": keys_l, "top_key_influence": keys_v,
        "schema_version": pa.array(np.full(f.num_rows, TABLES_SCHEMA_VERSION, np.int16))})
    paths = p.paths
    if paths.num_rows:  # recurrence: graphs whose strongest paths include the same signature (once per graph)
        sig = pc.binary_join_element_wise(pc.cast(paths.column("ccode"), pa.string()), paths.column("path"), "\x00")
        idx = pc.dictionary_encode(sig).combine_chunks().indices.to_numpy(zero_copy_only=False)
        del sig
        n_sup = np.bincount(idx)
        mean = np.bincount(idx, weights=paths.column("score").to_numpy(zero_copy_only=False)) / n_sup
        paths = paths.append_column("support", pa.array(n_sup[idx], pa.int32()))
        paths = paths.append_column("support_frac", pa.array(n_sup[idx] / max(n_ok, 1), pa.float32()))
        paths = paths.append_column("mean_score", pa.array(mean[idx], pa.float32()))
    else:
        paths = paths.append_column("support", pa.array([], pa.int32())).append_column(
            "support_frac", pa.array([], pa.float32())).append_column("mean_score", pa.array([], pa.float32()))
    groups = None
    if p.supernodes is not None:
        from .sweep_supernodes import label_from_lists, sweep_groups

        sweep = sweep_groups(p.pairs, fcode, n_pr, f.column("inf_sum").to_numpy(), st.decode_feature, clts,
                             label_from_lists(logit_l))
        groups = pa.concat_tables([p.supernodes.cast(sweep.schema), sweep])
    return stats, paths.drop_columns(["ccode"]), groups


def _lists(t: pa.Table, name: str, value: str, k: int, fcode: np.ndarray, absolute: bool = False):
    """The k largest (|value|) `name`s and `value`s per feature, largest first, as two list columns aligned with the
    sorted feature codes `fcode` (empty lists where `t` has none)."""
    t = st.top_per_feature(t, value, k, absolute=absolute)  # sorted by feature, largest first
    counts = np.zeros(len(fcode), np.int64)
    np.add.at(counts, np.searchsorted(fcode, t.column("fcode").to_numpy()), 1)
    offs = pa.array(np.r_[0, np.cumsum(counts)].astype(np.int32))
    return (pa.ListArray.from_arrays(offs, t.column(name).combine_chunks()),
            pa.ListArray.from_arrays(offs, pc.cast(t.column(value), pa.float32()).combine_chunks()))


AUTO_RAY_GRAPHS = 20_000  # from this many graphs, `workers=None` fans out over Ray (its start-up then pays off)


def analyze(store, sweep_id: str, *, top_paths: int = 10, max_hops: int = 4, workers: int | None = None,
            unit_graphs: int = UNIT_GRAPHS, progress: bool = False, write: bool = True, supernodes: bool = False,
            supernodes_clt: bool = True) -> dict:
    """feature_stats + circuit_paths of `sweep_id`, committed (replacing the sweep's partitions) unless `write`
    is False. `workers`: Ray tasks in flight (1: this process; None: every CPU for sweeps of AUTO_RAY_GRAPHS graphs
    or more, else 1). `supernodes`: also group each graph's features automatically (with its CLT's decoders unless
    not `supernodes_clt`) and the sweep's consensus groups, into the `supernodes` table. Returns counts, timings and
    the tables."""
    from tqdm.auto import tqdm

    from ..executor.tasks import map_unordered
    from ..store.commit import replace_partition

    check_name(sweep_id, "sweep id")
    if not 1 <= top_paths <= 1000 or not 1 <= max_hops <= 16 or (workers is not None and workers < 1):
        raise CTRayError("--top-paths: give 1..1000; --max-hops: give 1..16; --workers: at least 1")
    store.check_exists()
    t0 = time.perf_counter()
    units, keys, clts, models = plan_units(store, sweep_id, unit_graphs)
    sn = {"clts": clts, "models": models, "use_clt": supernodes_clt} if supernodes else None
    n_ok = len(keys)
    t_plan = time.perf_counter() - t0
    if workers is None:
        workers = min(os.cpu_count() or 1, len(units)) if n_ok >= AUTO_RAY_GRAPHS else 1
    acc: Partials | None = None
    pending: list[Partials] = []
    secs = {"read": 0.0, "reduce": 0.0}
    bar = tqdm(total=n_ok, desc=f"analyze {sweep_id}", unit="graph", disable=not progress)
    try:
        kw = {"top_paths": top_paths, "max_hops": max_hops, "supernodes": sn}
        for p in map_unordered(run_unit, units, workers=workers, kwargs=kw):
            if p is None:
                continue
            bar.update(p.n_graphs)
            for k in secs:
                secs[k] += p.seconds.get(k, 0.0)
            pending.append(p)
            if len(pending) >= 8:  # merge in batches: one group_by per batch, not per unit
                acc = st.merge_partials([acc, *pending])
                pending = []
        acc = st.merge_partials([acc, *pending])
    finally:
        bar.close()
    if acc is None:
        raise CTRayError(f"sweep {sweep_id!r}: its 'ok' graphs have no node rows (the tables are inconsistent)")
    stats, paths, groups = finish(acc, keys, clts)
    t_reduce = time.perf_counter() - t0
    if write:
        props = {"ct-ray.sweep": sweep_id, "ct-ray.analysis": "feature_stats+circuit_paths"}
        replace_partition(store, "feature_stats", sweep_id, stats, props)
        replace_partition(store, "circuit_paths", sweep_id, paths, props)
        if groups is not None:
            replace_partition(store, "supernodes", sweep_id, groups, {**props, "ct-ray.analysis": "supernodes"})
    return {"sweep_id": sweep_id, "graphs": acc.n_graphs, "units": len(units), "workers": workers, "features": stats.num_rows,
            "paths": paths.num_rows, "distinct_paths": len(set(paths.column("path").to_pylist())) if paths.num_rows else 0,
            "seconds": {"plan": t_plan, **secs, "total_reduce": t_reduce, "total": time.perf_counter() - t0},
            "feature_stats": stats, "circuit_paths": paths, "supernodes": groups}
