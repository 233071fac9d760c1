"""Graph JSON files for the circuit-tracer / Neuronpedia viewers: a sweep's committed graphs, rebuilt from the
tables alone (`export_sweep`), or one in-memory graph (`write_graph`).

`DIR/{slug}.json` per graph (a sweep's: `{sweep_id}-{key}`, committed 'ok' graphs only) and `DIR/graph-metadata.json`,
the index that circuit-tracer's local server lists (`circuit_tracer.frontend.local_server.serve(data_dir=DIR)`).
No model or CLT is loaded for a sweep: nodes, edges and the graphs row hold everything. Files are written atomically
and only when their bytes change, so re-running is idempotent and cheap. See docs/export.md.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from ..errors import CTRayError, StorageError, one_line
from ..store.keyed import KeyedRows
from ..store.names import check_name
from ..store.schemas import QK_ATTRIBUTIONS_SCHEMA
from ..store.tables import SWEEPS_DIR, Store
from .export import NODE_COLUMNS, add_attention, build_graph_json, cumulative_influence, graph_json, index_entry, merge_index

INDEX = "graph-metadata.json"
_GRAPH_COLS = ["key", "prompt_index", "prompt", "status", "error", "model", "clt", "params", "token_strs",
               "logit_tokens", "graph_rows", "created_at"]


def slug_of(sweep_id: str, key: str) -> str:
    """The file name stem of a sweep's graph: both parts checked, since keys come from the store (untrusted)."""
    return f"{check_name(sweep_id, 'sweep id')}-{check_name(key, f'graph key of sweep {sweep_id!r}', StorageError)}"


def _select(graphs: pa.Table, sweep_id: str, keys: list[str] | None, store: Store) -> list[dict]:
    rows = {r["key"]: r for r in graphs.to_pylist()}
    if not rows:
        have = store.partitions("graphs")
        raise CTRayError(f"no committed graphs in sweep {sweep_id!r} of {store.url}"
                         + (f"; sweeps there: {', '.join(have[:10])}" if have else " (the store has no graphs)"))
    if keys is None:
        sel = [r for r in rows.values() if r["status"] == "ok"]
        if not sel:
            raise CTRayError(f"sweep {sweep_id!r} has no committed ('ok') graphs to export ({len(rows)} error rows)")
        for r in sel:  # every file name checked before the first is written
            slug_of(sweep_id, r["key"])
        return sorted(sel, key=lambda r: (r["prompt_index"] is None, r["prompt_index"] or 0, r["key"]))
    out = []
    for k in dict.fromkeys(keys):
        check_name(k, "--keys: key")
        r = rows.get(k)
        if r is None:
            raise CTRayError(f"key {k!r} is not a committed graph of sweep {sweep_id!r}")
        if r["status"] != "ok":
            raise CTRayError(f"graph {k} of sweep {sweep_id!r} failed ({r['error']}): only 'ok' graphs export")
        out.append(r)
    return out


def graph_from_rows(row: dict, nodes: pa.Table | None, edges: pa.Table | None, *, slug: str, scan: str | None = None,
                    feature_details: dict | None = None, supernodes=None, title_prefix: str | None = None) -> dict:
    """One graph's JSON from its graphs row and its node / edge rows (with `kept`). When the rows hold the full
    graph (`graph_rows: full`), the kept part is exported and influence is cumulative over the full graph, exactly
    as circuit-tracer writes it; pruned rows: cumulative over the pruned graph."""
    if nodes is None or not nodes.num_rows:
        raise CTRayError(f"graph {row['key']}: no node rows committed (the tables are inconsistent)")
    if edges is None:
        edges = pa.table({"source": pa.array([], pa.int32()), "target": pa.array([], pa.int32()),
                          "weight": pa.array([], pa.float32()), "kept": pa.array([], pa.bool_())})
    nodes = nodes.sort_by("node")
    cum = cumulative_influence(nodes.column("influence").to_numpy(zero_copy_only=False))
    kept = np.asarray(nodes.column("kept").fill_null(True).to_numpy(zero_copy_only=False), dtype=bool)
    if not kept.all():
        nodes = nodes.filter(pa.array(kept))
        cum = cum[kept] if cum is not None else None
        edges = edges.filter(edges.column("kept").fill_null(True))
    kinds = nodes.column("kind").to_pylist()
    layers = nodes.column("layer").to_pylist()
    n_layers = max([l for k, l in zip(kinds, layers) if k == "logit"] or [max(layers) + 1])
    try:
        params = json.loads(row["params"] or "{}")
    except ValueError:  # settings are informative only: a row without readable ones still exports
        params = {}
    params = params if isinstance(params, dict) else {}
    created = row.get("created_at")
    # a sweep's params nest them ({"attribution": {...}, "pruning": {"node_threshold", "edge_threshold"}}); other
    # writers' rows may hold them flat
    nested = {k: params[k] for k in ("attribution", "pruning") if isinstance(params.get(k), dict)}
    meta = {**nested.get("attribution", params), "pruning": nested.get("pruning", params),
            "prompt": row["prompt"], "token_strs": row["token_strs"] or [], "n_layers": n_layers,
            "logit_tokens": row["logit_tokens"] or [], "model": row["model"], "clt": row["clt"],
            "created_at_ms": int(created.timestamp() * 1000) if created is not None else None}
    return build_graph_json(nodes.select(NODE_COLUMNS), edges, meta, slug=slug, influence=cum, scan=scan,
                            feature_details=feature_details, supernodes=supernodes, title_prefix=title_prefix,
                            kept_set=not kept.all())


def _dumps(data: dict, what: str) -> bytes:
    try:
        return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
    except ValueError as e:
        raise CTRayError(f"{what}: not exportable as JSON ({e})") from None


def _same(dest: Store, path: str, data: bytes) -> bool:
    try:
        return dest.fs.size(path) == len(data) and dest.fs.cat_file(path) == data
    except FileNotFoundError:
        return False
    except Exception as e:
        raise StorageError(f"cannot read {path}: {one_line(e)}") from e


def _put(dest: Store, name: str, data: bytes) -> bool:
    """Write DIR/name atomically unless it holds these bytes already; True when written."""
    path = f"{dest.root}/{name}"
    if _same(dest, path, data):
        return False
    dest.put_bytes(path, data)
    return True


def _old_index(dest: Store) -> dict | None:
    try:
        old = dest.read_json(INDEX)
    except StorageError as e:
        raise CTRayError(f"{dest.url}/{INDEX} is not a graph-metadata.json index: {e}") from None
    if old is not None and not (isinstance(old, dict) and isinstance(old.get("graphs", []), list)):
        raise CTRayError(f"{dest.url}/{INDEX} is not a graph-metadata.json index (no 'graphs' list)")
    return old


def _auto_supernodes(store: Store, sweep_id: str, keys: set[str]) -> dict[str, list[dict]]:
    """{key: [{name, nodes}]} of the automatic supernodes (`supernodes` table, method auto-v1) of `keys`."""
    t = store.read("supernodes", sweep_id, columns=["key", "method", "supernode", "node_ids"])
    out: dict[str, list[dict]] = {}
    for r in t.to_pylist():
        if r["key"] in keys and r["method"] == "auto-v1" and r["node_ids"]:
            out.setdefault(r["key"], []).append({"name": r["supernode"], "nodes": r["node_ids"]})
    return out


def export_sweep(store: Store, sweep_id: str, out: str, *, keys: list[str] | None = None, scan: str | None = None,
                 feature_details: dict | None = None, progress: bool = False, **out_options) -> dict:
    """Export the committed graphs of `sweep_id` (all 'ok' ones, or `keys`) to the directory URL `out`."""
    from tqdm.auto import tqdm

    check_name(sweep_id, "sweep id")
    rows = _select(store.read("graphs", sweep_id, columns=_GRAPH_COLS), sweep_id, keys, store)
    dest = Store(out, **out_options)  # only its atomic file writes and reads are used (no catalog)
    if dest.local and dest.fs.isfile(dest.root):
        raise CTRayError(f"--out {out} is a file, not a directory")
    old = _old_index(dest)
    want = {r["key"] for r in rows}
    nodes, edges = KeyedRows(store, "nodes", sweep_id, want), KeyedRows(store, "edges", sweep_id, want)
    heads, qk = KeyedRows(store, "edge_heads", sweep_id, want), KeyedRows(store, "qk_attributions", sweep_id, want)
    # graphs grouped by the edges file that holds them: each edges file is read once (memory: one file's rows)
    first = {k: edges.first_file(k) for k in want}
    todo = sorted(rows, key=lambda r: first.get(r["key"], -1))
    auto = _auto_supernodes(store, sweep_id, want)
    entries, written = {}, 0
    bar = tqdm(total=len(rows), desc=f"export {sweep_id}", unit="graph", disable=not progress)
    try:
        i = 0
        while i < len(todo):
            f = first.get(todo[i]["key"], -1)
            batch = [todo[i]]
            while i + len(batch) < len(todo) and first.get(todo[i + len(batch)]["key"], -1) == f:
                batch.append(todo[i + len(batch)])
            i += len(batch)
            ks = [r["key"] for r in batch]
            n_by = nodes.read(ks, ["key", *NODE_COLUMNS, "kept"])
            e_by = edges.read(ks, ["key", "source", "target", "weight", "kept"])
            h_by = heads.read(ks, ["key", "source", "target", "layer", "head", "weight"]) if heads.tasks else {}
            q_by = qk.read(ks, QK_ATTRIBUTIONS_SCHEMA.names) if qk.tasks else {}
            for r in batch:
                slug = slug_of(sweep_id, r["key"])
                # groupings saved from the explorer win; else `ct-ray analyze --supernodes`'s automatic ones
                sn = (store.read_json(f"{SWEEPS_DIR}/{sweep_id}/supernodes/{r['key']}.json") or {}).get("supernodes") \
                    or auto.get(r["key"])
                data = graph_from_rows(r, n_by.get(r["key"]), e_by.get(r["key"]), slug=slug, scan=scan,
                                       feature_details=feature_details, supernodes=sn, title_prefix=sweep_id)
                if r["key"] in h_by or r["key"] in q_by:
                    add_attention(data, n_by[r["key"]], h_by.get(r["key"]), q_by.get(r["key"]))
                written += _put(dest, f"{slug}.json", _dumps(data, f"graph {r['key']}"))
                entries[r["key"]] = index_entry(data)
                bar.update()
    finally:
        bar.close()
    index = merge_index(old, [entries[r["key"]] for r in rows])  # in prompt order, whatever the file order
    index_written = _put(dest, INDEX, json.dumps(index, indent=1).encode())
    return {"sweep_id": sweep_id, "out": dest.url, "graphs": len(rows), "written": written,
            "unchanged": len(rows) - written, "index": f"{dest.url}/{INDEX}", "index_graphs": len(index["graphs"]),
            "index_written": index_written}


def write_graph(graph, out: str, slug: str, *, full=None, attention=None, **out_options) -> dict:
    """Write `graph` (a pruned one; `full`: the graph it was pruned from; `attention`: its attention attribution) as
    DIR/{slug}.json and list it in DIR/graph-metadata.json. Returns the JSON dict."""
    check_name(slug, "slug")
    dest = Store(out, **out_options)
    old = _old_index(dest)
    data = graph_json(graph, slug, full=full, attention=attention)
    _put(dest, f"{slug}.json", _dumps(data, f"graph {slug}"))
    _put(dest, INDEX, json.dumps(merge_index(old, [index_entry(data)]), indent=1).encode())
    return data
