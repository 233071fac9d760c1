"""Other engines read the result tables through the Iceberg catalog alone: pyiceberg, Polars and Ray Data see exactly
the rows ct_ray's own DuckDB views see (per table, per sweep, per key), `sweep_id` is a string in every one of them,
and a data file that was written but never committed is invisible to all of them. Locally and on S3 (moto)."""

import uuid
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ct_ray.store.catalog import CATALOG_NAME, NAMESPACE
from ct_ray.store.commit import Committer
from ct_ray.store.schemas import SWEEP_TABLES as _ALL
from ct_ray.store.sql import FILTERED, query
from ct_ray.store.tables import Store
from ct_ray.store.writer import RowBuffer

from .test_sql import report

# the tables report() fills (edge_heads / qk_attributions take the same commit path as nodes and edges)
SWEEP_TABLES = tuple(t for t in _ALL if t not in ("edge_heads", "qk_attributions"))

# sweep id -> key -> graphs status; "007" must stay the string "007" in every engine
SWEEPS = {"s1": {"a": "ok", "b": "error", "c": "ok"}, "007": {"a": "ok", "d": "error"}}
PERTURBED = {"s1": ["a", "c"], "007": ["a"]}  # keys with perturbation rows (2 interventions each)
GHOST = "zz-never-committed"  # a key whose files are written but never committed


def perturbation_report(store, sid, keys) -> dict:
    """What a worker reports after the perturbation jobs of `keys` (two interventions each)."""
    buf = RowBuffer({"perturbations": store.writer_config("perturbations")}, sid)
    for key in keys:
        buf.add("perturbations", [{"key": key, "plan": "p", "intervention": i, "node": 0, "op": "scale", "value": 0.0,
                                   "mode": "constrained", "status": "ok"} for i in range(2)])
        buf.finish("perturbations", key)
    return buf.flush()


def build(store) -> dict:
    """Two sweeps committed through the real path (worker RowBuffers, driver Committer), then files of a worker
    that never reported. Returns table -> Counter((sweep_id, key)) of the committed rows."""
    for sid, keys in SWEEPS.items():
        c = Committer(store, sid)
        assert c.add(report(store, sid, keys))
        assert c.add(perturbation_report(store, sid, PERTURBED[sid]))
        assert c.commit() == {"prompts": len(keys), "perturbations": len(PERTURBED[sid])}
    report(store, "s1", {GHOST: "ok"})  # data files written, never reported nor committed
    perturbation_report(store, "s1", [GHOST])
    # rows per key that report() writes: a graphs row each, nodes and edges of the ok keys
    want = {t: Counter({(sid, k): 1 for sid, keys in SWEEPS.items() for k, st in keys.items() if t == "graphs" or st == "ok"})
            for t in ("graphs", "nodes", "edges")}
    want["perturbations"] = Counter({(sid, k): 2 for sid, keys in PERTURBED.items() for k in keys})
    return want


def is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def rows_of(t: pa.Table) -> Counter:
    return Counter(zip(t.column("sweep_id").to_pylist(), t.column("key").to_pylist()))


def read_duckdb(store, name) -> pa.Table:
    """ct_ray's own reader (the raw views: every committed row, as the other engines see them)."""
    return query(f"SELECT * FROM {'raw_' + name if name in FILTERED else name}", store=store)


def plain_catalog(props: dict):
    """A pyiceberg catalog opened without ct_ray's code: what any other Python process would do."""
    from pyiceberg.catalog import load_catalog

    return load_catalog(CATALOG_NAME, **props)


def check_reader(label: str, got: dict, want: dict) -> None:
    """got: table -> (Arrow table read, type of its sweep_id column)."""
    for name in SWEEP_TABLES:
        t, typ = got[name]
        assert is_string(typ), f"{label}: {name}.sweep_id is {typ}"
        assert all(isinstance(v, str) for v in t.column("sweep_id").to_pylist()), f"{label}: {name}"
        rows = rows_of(t)
        assert rows == want[name], f"{label}: {name} rows differ"
        assert not any(k == GHOST for _, k in rows), f"{label}: {name} shows an uncommitted file"
        per_sweep = Counter(t.column("sweep_id").to_pylist())
        assert per_sweep == Counter({s: sum(n for (sid, _), n in want[name].items() if sid == s) for s in SWEEPS})
        assert "007" in per_sweep, f"{label}: {name}"


def check_ghost_files_exist(store, want) -> None:
    """The control: the uncommitted files are really in the warehouse, next to the committed ones."""
    for name in SWEEP_TABLES:
        paths = [p for p in store.fs.find(f"{store.root}/warehouse/{name}/data") if p.endswith(".parquet")]
        live = {task.file.file_path.split("://", 1)[-1].lstrip("/") for task in store.table(name).scan().plan_files()}
        assert live < {p.lstrip("/") for p in paths}, name
        on_disk = pa.concat_tables([pq.read_table(p, filesystem=store.fs, columns=["sweep_id", "key"]) for p in paths])
        assert rows_of(on_disk)[("s1", GHOST)] >= 1 and sum(rows_of(on_disk).values()) > sum(want[name].values())


def polars_reads(tables: dict) -> dict:
    import polars as pl

    out = {}
    for name, table in tables.items():
        # polars' own Parquet reader (native), never pyiceberg's: an error rather than a silent fallback
        df = pl.scan_iceberg(table, reader_override="native").collect()
        assert df.schema["sweep_id"] == pl.String, f"polars: {name}.sweep_id is {df.schema['sweep_id']}"
        arrow = df.select("sweep_id", "key").to_arrow()
        out[name] = (arrow, arrow.schema.field("sweep_id").type)
    return out


@pytest.fixture(autouse=True)
def _polars_planner(monkeypatch):
    # plan scans with pyiceberg (the optional polars_iceberg planner plugin is not installed): silences its warning
    monkeypatch.setenv("POLARS_ICEBERG_PLANNER", "pyiceberg")


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    st = Store(str(root))
    want = build(st)
    return st, want, {"type": "sql", "uri": f"sqlite:///{root}/catalog.db"}


def test_local_tables_read_alike_in_duckdb_pyiceberg_polars(local_store):
    import polars as pl

    st, want, props = local_store
    check_ghost_files_exist(st, want)
    duck = {n: (t := read_duckdb(st, n), t.schema.field("sweep_id").type) for n in SWEEP_TABLES}
    check_reader("duckdb", duck, want)
    cat = plain_catalog(props)
    assert sorted(n for _, n in cat.list_tables(NAMESPACE)) == sorted(_ALL)
    tables = {n: cat.load_table(f"{NAMESPACE}.{n}") for n in SWEEP_TABLES}
    check_reader("pyiceberg", {n: (t := tables[n].scan().to_arrow(), t.schema.field("sweep_id").type)
                               for n in SWEEP_TABLES}, want)
    check_reader("polars", polars_reads(tables), want)
    # ct_ray's filtered `nodes` view is a join on graphs.status = 'ok' in any other engine (docs/engines.md)
    g = pl.scan_iceberg(tables["graphs"]).filter(pl.col("status") == "ok").select("sweep_id", "key")
    nodes = pl.scan_iceberg(tables["nodes"]).join(g, on=["sweep_id", "key"], how="semi").collect()
    assert rows_of(nodes.to_arrow()) == rows_of(query("SELECT sweep_id, key FROM nodes", store=st))
    assert sorted(set(nodes["key"].to_list())) == ["a", "c"]
    # a filter on the partition column: '007' is not 7
    assert pl.scan_iceberg(tables["graphs"]).filter(pl.col("sweep_id") == "007").collect().height == 2


def test_local_tables_read_alike_in_ray_data(local_store, ray_local):
    ray = ray_local
    st, want, props = local_store
    got = {}
    for name in SWEEP_TABLES:
        # what a Ray job elsewhere would write: the pyiceberg catalog by name (the catalog name is a key of the
        # SQL catalog's rows: it must be "ct_ray"), type and URI
        ds = ray.data.read_iceberg(table_identifier=f"{NAMESPACE}.{name}", catalog_kwargs={"name": "ct_ray", **props})
        assert ds.count() == sum(want[name].values())
        t = pa.concat_tables(ray.get(ds.to_arrow_refs()))
        assert is_string(ds.schema().base_schema.field("sweep_id").type)
        got[name] = (t, t.schema.field("sweep_id").type)
    check_reader("ray", got, want)


def test_a_differently_named_catalog_sees_no_tables(local_store):
    """The SQL catalog keys its rows by catalog name: an engine must name its catalog `ct_ray` (docs/engines.md)."""
    _, _, props = local_store
    from pyiceberg.catalog import load_catalog

    other = load_catalog("default", **props)
    assert NAMESPACE not in {ns[0] for ns in other.list_namespaces()}


def test_s3_tables_read_alike_in_duckdb_pyiceberg_polars(s3, tmp_path):
    st = Store(f"s3://{s3['bucket']}/engines-{uuid.uuid4().hex[:8]}", catalog=f"sqlite:///{tmp_path}/catalog.db")
    want = build(st)
    check_ghost_files_exist(st, want)
    duck = {n: (t := read_duckdb(st, n), t.schema.field("sweep_id").type) for n in SWEEP_TABLES}
    check_reader("duckdb/s3", duck, want)
    # endpoint and region as any pyiceberg client gives them; the keys come from the AWS environment
    cat = plain_catalog({"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db", "s3.endpoint": s3["endpoint"],
                         "s3.region": "us-east-1"})
    tables = {n: cat.load_table(f"{NAMESPACE}.{n}") for n in SWEEP_TABLES}
    assert all(t.metadata.location == f"{st.url}/warehouse/{n}" for n, t in tables.items())
    check_reader("pyiceberg/s3", {n: (t := tables[n].scan().to_arrow(), t.schema.field("sweep_id").type)
                                  for n in SWEEP_TABLES}, want)
    check_reader("polars/s3", polars_reads(tables), want)
