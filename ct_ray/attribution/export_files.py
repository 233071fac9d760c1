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
from ..store.names import check_name
from ..store.schemas import SCHEMAS
from ..store.tables import SWEEPS_DIR, Store
from .export import NODE_COLUMNS, build_graph_json, cumulative_influence, graph_json, index_entry, merge_index

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


def _by_key(t: pa.Table) -> dict[str, pa.Table]:
    if not t.num_rows:
        return {}
    t = t.sort_by("key")
    keys = t.column("key").to_numpy(zero_copy_only=False)
    uniq, start = np.unique(keys, return_index=True)
    ends = list(start[1:]) + [t.num_rows]
    return {k: t.slice(s, e - s) for k, s, e in zip(uniq.tolist(), start.tolist(), ends)}


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
    created = row.get("created_at")
    meta = {**(params.get("attribution") or params), "pruning": params.get("pruning") or params,  # nested or flat
            "prompt": row["prompt"], "token_strs": row["token_strs"] or [], "n_layers": n_layers,
            "logit_tokens": row["logit_tokens"] or [], "model": row["model"], "clt": row["clt"],
            "created_at_ms": int(created.timestamp() * 1000) if created is not None else None}
    return build_graph_json(nodes.select(NODE_COLUMNS), edges, meta, slug=slug, influence=cum, scan=scan,
                            feature_details=feature_details, supernodes=supernodes, title_prefix=title_prefix)


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


class _KeyedRows:
    """A sweep partition's rows of one table, read data file by data file for the keys asked.

    Keys are hashes, so file statistics cannot prune a scan filtered by key: each `Store.read(keys=...)` reads the
    whole partition, and exporting a sweep batch by batch would read it once per batch. Instead the files are
    planned once, each file's `key` column says which keys it holds, and every file is read once, when its keys
    are exported (a key's rows are written by one worker flush, so they sit in one file)."""

    def __init__(self, store: Store, name: str, sweep_id: str, keys: set[str]):
        from pyiceberg.expressions import AlwaysTrue, EqualTo
        from pyiceberg.io.pyarrow import ArrowScan

        self.table, self.name = store.existing_table(name), name
        self.tasks, self.files_of = [], {}
        if self.table is None or self.table.current_snapshot() is None:
            return
        try:
            self.tasks = list(self.table.scan(row_filter=EqualTo("sweep_id", sweep_id)).plan_files())
            scan = ArrowScan(self.table.metadata, self.table.io, self.table.schema().select("key"), AlwaysTrue())
            for i, task in enumerate(self.tasks):
                for k in scan.to_table([task]).column("key").unique().to_pylist():
                    if k in keys:
                        self.files_of.setdefault(k, []).append(i)
        except Exception as e:
            raise StorageError(f"cannot read table {name} of {store.url}: {one_line(e)}") from e

    def read(self, keys: list[str], columns: list[str]) -> dict[str, pa.Table]:
        """{key: its rows} of `keys`, reading only the files that hold them."""
        from pyiceberg.expressions import In
        from pyiceberg.io.pyarrow import ArrowScan

        tasks = sorted({i for k in keys for i in self.files_of.get(k, [])})
        schema = pa.schema([SCHEMAS[self.name].field(c) for c in columns])
        if not tasks:
            return {}
        have = {f.name for f in self.table.schema().fields}
        try:
            scan = ArrowScan(self.table.metadata, self.table.io, self.table.schema().select(*[c for c in columns if c in have]),
                             In("key", list(keys)))
            t = scan.to_table([self.tasks[i] for i in tasks])
        except Exception as e:
            raise StorageError(f"cannot read table {self.name}: {one_line(e)}") from e
        t = pa.Table.from_arrays([t.column(c).cast(f.type) if c in t.column_names else pa.nulls(t.num_rows, f.type)
                                  for c, f in zip(columns, schema)], schema=schema)
        return _by_key(t)


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
    nodes, edges = _KeyedRows(store, "nodes", sweep_id, want), _KeyedRows(store, "edges", sweep_id, want)
    # graphs grouped by the edges file that holds them: each edges file is read once (memory: one file's rows)
    first = {k: min(v) for k, v in edges.files_of.items()}
    todo = sorted(rows, key=lambda r: first.get(r["key"], -1))
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
            for r in batch:
                slug = slug_of(sweep_id, r["key"])
                sn = (store.read_json(f"{SWEEPS_DIR}/{sweep_id}/supernodes/{r['key']}.json") or {}).get("supernodes")
                data = graph_from_rows(r, n_by.get(r["key"]), e_by.get(r["key"]), slug=slug, scan=scan,
                                       feature_details=feature_details, supernodes=sn, title_prefix=sweep_id)
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


def write_graph(graph, out: str, slug: str, *, full=None, **out_options) -> dict:
    """Write `graph` (a pruned one; `full`: the graph it was pruned from) as DIR/{slug}.json and list it in
    DIR/graph-metadata.json. Returns the JSON dict."""
    check_name(slug, "slug")
    dest = Store(out, **out_options)
    old = _old_index(dest)
    data = graph_json(graph, slug, full=full)
    _put(dest, f"{slug}.json", _dumps(data, f"graph {slug}"))
    _put(dest, INDEX, json.dumps(merge_index(old, [index_entry(data)]), indent=1).encode())
    return data
