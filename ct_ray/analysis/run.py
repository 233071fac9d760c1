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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import CTRayError
from ..store.names import check_name
from ..store.schemas import TABLES_SCHEMA_VERSION
from .stats import EDGE_COLS, NODE_COLS, TOP_KEYS, TOP_LOGITS, Partials, _top_per_feature, merge_partials, unit_partials

UNIT_GRAPHS = 2000


def plan_units(store, sweep_id: str, unit_graphs: int = UNIT_GRAPHS):
    """(units, n_ok): each unit (nodes KeyedRows, edges KeyedRows, {key: clt}) small enough to ship to a task."""
    from ..store.keyed import KeyedRows

    g = store.read("graphs", sweep_id, columns=["key", "status", "clt", "prompt_index"])
    ok = g.filter(pc.equal(g.column("status"), "ok"))
    if not g.num_rows:
        have = store.partitions("graphs")
        raise CTRayError(f"no committed graphs in sweep {sweep_id!r} of {store.url}"
                         + (f"; sweeps there: {', '.join(have[:10])}" if have else ""))
    if not ok.num_rows:
        raise CTRayError(f"sweep {sweep_id!r} has no 'ok' graphs to analyse ({g.num_rows} error rows)")
    clt_of = dict(zip(ok.column("key").to_pylist(), (c or "" for c in ok.column("clt").to_pylist())))
    nodes = KeyedRows(store, "nodes", sweep_id, set(clt_of))
    edges = KeyedRows(store, "edges", sweep_id, set(clt_of))
    groups: dict[tuple, list[str]] = {}
    for k in sorted(clt_of, key=lambda k: (nodes.first_file(k), k)):
        groups.setdefault((nodes.first_file(k), clt_of[k]), []).append(k)
    units = []
    for keys in groups.values():
        for i in range(0, len(keys), unit_graphs):
            part = keys[i:i + unit_graphs]
            units.append((nodes.subset(part), edges.subset(part), {k: clt_of[k] for k in part}))
    return units, ok.num_rows


def run_unit(unit, top_paths: int = 10, max_hops: int = 4) -> Partials:
    """Read one unit's rows and reduce them (the per-file work: runs in a Ray task as well as here)."""
    nodes_rows, edges_rows, clt_of = unit
    keys = list(clt_of)
    t0 = time.perf_counter()
    nodes = nodes_rows.read_table(keys, NODE_COLS)
    edges = edges_rows.read_table(keys, EDGE_COLS)
    t1 = time.perf_counter()
    held = set(pc.unique(nodes.column("key")).to_pylist())
    have = {k: clt_of[k] for k in keys if k in held}
    if not have:
        return None
    p = unit_partials(nodes, edges, have, top_paths=top_paths, max_hops=max_hops)
    p.seconds = {"read": t1 - t0, "reduce": time.perf_counter() - t1}
    return p


def finish(p: Partials, n_ok: int, top_logits: int = TOP_LOGITS) -> tuple[pa.Table, pa.Table]:
    """The merged partials as rows of `feature_stats` and `circuit_paths`."""
    f = p.features.sort_by([("clt", "ascending"), ("layer", "ascending"), ("feature", "ascending")])
    keys_l, keys_v = _lists(p.top_keys, "key", "inf", TOP_KEYS, f)
    logit_l, logit_v = _lists(p.logits, "logit_str", "weight", top_logits, f, absolute=True)
    n_pr = f.column("n_prompts").to_numpy()
    layer, feat = f.column("layer").to_numpy(), f.column("feature").to_numpy()
    stats = pa.table({
        "clt": f.column("clt"), "layer": pa.array(layer, pa.int32()), "feature": pa.array(feat, pa.int32()),
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
        sig = pc.binary_join_element_wise(pc.fill_null(paths.column("clt"), ""), paths.column("path"), "\x00")
        idx = pc.dictionary_encode(sig).combine_chunks().indices.to_numpy(zero_copy_only=False)
        n_sup = np.bincount(idx)
        mean = np.bincount(idx, weights=paths.column("score").to_numpy(zero_copy_only=False)) / n_sup
        paths = paths.append_column("support", pa.array(n_sup[idx], pa.int32()))
        paths = paths.append_column("support_frac", pa.array(n_sup[idx] / max(n_ok, 1), pa.float32()))
        paths = paths.append_column("mean_score", pa.array(mean[idx], pa.float32()))
    else:
        paths = paths.append_column("support", pa.array([], pa.int32())).append_column(
            "support_frac", pa.array([], pa.float32())).append_column("mean_score", pa.array([], pa.float32()))
    paths = paths.drop_columns(["clt"]) if "clt" in paths.column_names else paths
    return stats, paths


def _lists(t: pa.Table, name: str, value: str, k: int, at: pa.Table, absolute: bool = False) -> tuple[pa.Array, pa.Array]:
    """The k largest (|value|) `name`s and `value`s per feature of `at` (its clt, layer, feature rows, sorted), as two
    list columns aligned with `at`'s rows (empty lists where `t` has none)."""
    t = _top_per_feature(t, value, k, absolute=absolute)  # sorted by feature, largest first
    clts = pa.array(sorted(set(at.column("clt").to_pylist()) | set(t.column("clt").to_pylist())), pa.string())

    def code(x: pa.Table) -> np.ndarray:
        c = pc.index_in(x.column("clt"), value_set=clts).to_numpy(zero_copy_only=False).astype(np.int64)
        return (c << 44) | (x.column("layer").to_numpy().astype(np.int64) << 28) | x.column("feature").to_numpy()

    ct, ca = code(t), code(at)
    counts = np.zeros(len(ca), np.int64)
    pos = np.searchsorted(ca, ct)  # at is sorted by the same key; every t row's feature is in at
    np.add.at(counts, pos, 1)
    offs = pa.array(np.r_[0, np.cumsum(counts)].astype(np.int32))
    return (pa.ListArray.from_arrays(offs, t.column(name).combine_chunks()),
            pa.ListArray.from_arrays(offs, pc.cast(t.column(value), pa.float32()).combine_chunks()))


AUTO_RAY_GRAPHS = 20_000  # from this many graphs, `workers=None` fans out over Ray (its start-up then pays off)


def analyze(store, sweep_id: str, *, top_paths: int = 10, max_hops: int = 4, workers: int | None = None,
            unit_graphs: int = UNIT_GRAPHS, progress: bool = False, write: bool = True) -> dict:
    """feature_stats + circuit_paths of `sweep_id`, committed (replacing the sweep's partitions) unless `write`
    is False. `workers`: Ray tasks in flight (1: this process; None: every CPU for sweeps of AUTO_RAY_GRAPHS graphs
    or more, else 1). Returns counts, timings and the two tables."""
    from tqdm.auto import tqdm

    from ..executor.tasks import map_unordered
    from ..store.commit import replace_partition

    check_name(sweep_id, "sweep id")
    if not 1 <= top_paths <= 1000 or not 1 <= max_hops <= 16 or (workers is not None and workers < 1):
        raise CTRayError("--top-paths: give 1..1000; --max-hops: give 1..16; --workers: at least 1")
    store.check_exists()
    t0 = time.perf_counter()
    units, n_ok = plan_units(store, sweep_id, unit_graphs)
    t_plan = time.perf_counter() - t0
    if workers is None:
        workers = min(os.cpu_count() or 1, len(units)) if n_ok >= AUTO_RAY_GRAPHS else 1
    acc: Partials | None = None
    pending: list[Partials] = []
    secs = {"read": 0.0, "reduce": 0.0}
    bar = tqdm(total=n_ok, desc=f"analyze {sweep_id}", unit="graph", disable=not progress)
    try:
        for p in map_unordered(run_unit, units, workers=workers, kwargs={"top_paths": top_paths, "max_hops": max_hops}):
            if p is None:
                continue
            bar.update(p.n_graphs)
            for k in secs:
                secs[k] += p.seconds.get(k, 0.0)
            pending.append(p)
            if len(pending) >= 8:  # merge in batches: one group_by per batch, not per unit
                acc = merge_partials([acc, *pending])
                pending = []
        acc = merge_partials([acc, *pending])
    finally:
        bar.close()
    if acc is None:
        raise CTRayError(f"sweep {sweep_id!r}: its 'ok' graphs have no node rows (the tables are inconsistent)")
    stats, paths = finish(acc, n_ok)
    t_reduce = time.perf_counter() - t0
    if write:
        props = {"ct-ray.sweep": sweep_id, "ct-ray.analysis": "feature_stats+circuit_paths"}
        replace_partition(store, "feature_stats", sweep_id, stats, props)
        replace_partition(store, "circuit_paths", sweep_id, paths, props)
    return {"sweep_id": sweep_id, "graphs": acc.n_graphs, "units": len(units), "workers": workers, "features": stats.num_rows,
            "paths": paths.num_rows, "distinct_paths": len(set(paths.column("path").to_pylist())) if paths.num_rows else 0,
            "seconds": {"plan": t_plan, **secs, "total_reduce": t_reduce, "total": time.perf_counter() - t0},
            "feature_stats": stats, "circuit_paths": paths}
