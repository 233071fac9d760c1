"""The table layer without Ray: Iceberg commits in rounds, recovery of a round cut short, schema evolution, the SQL
views (exactly the committed rows), one-line errors, formatting."""

import re
from pathlib import Path

import pyarrow as pa
import pytest

from ct_ray.cli import main as cli_main
from ct_ray.errors import CTRayError
from ct_ray.store.commit import Committer, recover
from ct_ray.store.schemas import SCHEMAS, TABLE_NAMES
from ct_ray.store.sql import format_table, query
from ct_ray.store.tables import Store
from ct_ray.store.writer import RowBuffer, sweep_writer_configs

DOCS = Path(__file__).parent.parent / "docs" / "sql.md"


def sql_blocks(text: str) -> list[str]:
    return re.findall(r"```sql\n(.*?)```", text, flags=re.S)


def report(store, sid, rows: dict[str, str | None]) -> dict:
    """What a worker reports after its buffer of prompts `rows` (key -> graphs status; None: no graphs row)."""
    buf = RowBuffer(sweep_writer_configs(store), sid)
    for key, status in rows.items():
        if status in ("ok", None):  # as a sweep worker: a graph's rows only for an ok prompt
            buf.add("nodes", [{"key": key, "node": 0, "kind": "feature", "kept": True}])
            buf.add("edges", [{"key": key, "source": 0, "target": 0, "weight": 1.0}])
        if status:
            buf.add("graphs", [{"key": key, "status": status}])
            buf.finish("prompts", key, ok=status == "ok")
    return buf.flush()


def test_views_on_an_empty_store(tmp_path):
    for t in TABLE_NAMES:
        r = query(f"SELECT * FROM {t}", str(tmp_path))
        assert r.num_rows == 0 and r.column_names == SCHEMAS[t].names
    assert not list(tmp_path.iterdir())  # reading created nothing
    with pytest.raises(CTRayError, match="no store at"):  # a mistyped path is not an empty store
        query("SELECT * FROM graphs", str(tmp_path / "nothing"))


def test_views_show_exactly_the_committed_rows(tmp_path):
    st = Store(str(tmp_path))
    c = Committer(st, "s")
    assert c.add(report(st, "s", {"a": "ok", "b": "error"}))
    c.commit()
    report(st, "s", {"c": "ok"})  # written, never reported nor committed: invisible
    c2 = Committer(st, "007")  # a numeric-looking sweep id stays a string
    assert c2.add(report(st, "007", {"a": "error"}))
    c2.commit()
    assert query("SELECT key FROM nodes ORDER BY key", str(tmp_path)).column("key").to_pylist() == ["a"]
    assert query("SELECT key FROM edges", str(tmp_path)).column("key").to_pylist() == ["a"]
    assert query("SELECT count(*) n FROM raw_nodes", str(tmp_path)).column("n").to_pylist() == [1]
    r = query("SELECT sweep_id, count(*) n FROM graphs GROUP BY 1 ORDER BY 1", str(tmp_path))
    assert r.to_pylist() == [{"sweep_id": "007", "n": 1}, {"sweep_id": "s", "n": 2}]
    assert r.schema.field("sweep_id").type == pa.string()
    assert sorted(st.committed("s").column("key").to_pylist()) == ["a", "b"]
    assert st.sweeps() == ["007", "s"]
    # a report that would put a key in twice is refused (the caller re-runs its keys)
    assert not c.add(report(st, "s", {"a": "ok"}))


def test_a_round_cut_between_two_commits_is_recovered(tmp_path, monkeypatch):
    """The driver dies after committing nodes and edges but before graphs: the re-run's recovery removes those
    files, so the keys' rows are there once after it."""
    from ._helpers import cut_round

    st = Store(str(tmp_path))
    c = Committer(st, "s")
    c.add(report(st, "s", {"a": "ok"}))
    c.commit()
    cut_round(st, "s", ["b", "c"], monkeypatch, committed={"a"})
    assert query("SELECT count(*) n FROM raw_nodes", str(tmp_path)).column("n").to_pylist() == [3]
    # readers hide the round's files (its graphs commit is missing), in SQL and through Store.read
    assert query("SELECT key FROM nodes", str(tmp_path)).column("key").to_pylist() == ["a"]
    assert query("SELECT count(*) n FROM edges", str(tmp_path)).column("n").to_pylist() == [1]
    assert Store(str(tmp_path)).read("edges", "s").column("key").to_pylist() == ["a"]
    assert recover(st, "s", older_than_s=3600) == 0  # too recent: could be a live driver's round
    assert recover(st, "s") == 2  # one nodes file, one edges file
    assert query("SELECT key FROM raw_nodes", str(tmp_path)).column("key").to_pylist() == ["a"]
    c = Committer(st, "s", {"a"})  # the re-run
    c.add(report(st, "s", {"b": "ok", "c": "ok"}))
    c.commit()
    r = query("SELECT key, count(*) n FROM raw_edges GROUP BY 1 ORDER BY 1", str(tmp_path)).to_pylist()
    assert r == [{"key": k, "n": 1} for k in "abc"]
    assert recover(st, "s") == 0


def test_schema_evolution_adds_a_column(tmp_path, monkeypatch):
    """A newer ct_ray adds a column: the table evolves in place, older files read it as null, every reader agrees."""
    import ct_ray.store.catalog as catalog
    import ct_ray.store.schemas as schemas

    st = Store(str(tmp_path))
    c = Committer(st, "s")
    c.add(report(st, "s", {"a": "ok"}))
    c.commit()
    wider = {**schemas.SCHEMAS, "graphs": schemas.SCHEMAS["graphs"].append(pa.field("note", pa.string()))}
    monkeypatch.setattr(schemas, "SCHEMAS", wider)
    monkeypatch.setattr(catalog, "SCHEMAS", wider)
    import ct_ray.store.sql as sql
    import ct_ray.store.tables as tables
    import ct_ray.store.writer as writer

    for m in (sql, tables, writer):
        monkeypatch.setattr(m, "SCHEMAS", wider, raising=False)
    st2 = Store(str(tmp_path))
    assert "note" in {f.name for f in st2.table("graphs").schema().fields}
    buf = RowBuffer(sweep_writer_configs(st2), "s")
    buf.add("graphs", pa.table({"key": ["b"], "status": ["ok"]}).append_column("note", pa.array(["new"])))
    buf.finish("prompts", "b", ok=True)
    c = Committer(st2, "s", {"a"})
    c.add(buf.flush())
    c.commit()
    r = query("SELECT key, note FROM graphs ORDER BY key", store=st2).to_pylist()
    assert r == [{"key": "a", "note": None}, {"key": "b", "note": "new"}]
    assert st2.read("graphs", "s", columns=["key", "note"]).sort_by("key").column("note").to_pylist() == [None, "new"]


def test_perturbations_table_of_version_1_evolves_to_version_2(tmp_path, monkeypatch):
    """A store written before perturbations rows carried `ct-ray perturb`'s columns: the table gains them in place,
    the old rows read them as null, new rows fill them."""
    import ct_ray.store.catalog as catalog
    import ct_ray.store.schemas as schemas

    v2 = SCHEMAS["perturbations"]
    v1_cols = [f for f in v2 if f.name not in ("supernode", "interventions", "layer_start", "layer_end",
                                               "freeze_attention", "target_str", "logit_before", "logit_after",
                                               "prob_before", "prob_after", "predicted_direct", "kl")]
    v1 = pa.schema(v1_cols, metadata=v2.metadata)
    with monkeypatch.context() as m:
        old = {**SCHEMAS, "perturbations": v1}
        for mod in (schemas, catalog):
            m.setattr(mod, "SCHEMAS", old)
        st = Store(str(tmp_path))
        assert "kl" not in {f.name for f in st.table("perturbations").schema().fields}
        buf = RowBuffer(sweep_writer_configs(st), "s")
        buf.add("perturbations", pa.Table.from_pylist([{"key": "a", "node": 1, "status": "ok"}],
                                                      schema=pa.schema(v1_cols[:-1])))
        buf.add("graphs", pa.table({"key": ["a"], "status": ["ok"]}))
        buf.finish("prompts", "a", ok=True)
        buf.finish("perturbations", "a")
        c = Committer(st, "s")
        c.add(buf.flush())
        c.commit()
    st2 = Store(str(tmp_path))
    assert "kl" in {f.name for f in st2.table("perturbations").schema().fields}
    assert st2.table("perturbations").properties["ct_ray.schema_version"] == str(schemas.TABLES_SCHEMA_VERSION)
    buf = RowBuffer(sweep_writer_configs(st2), "s")
    buf.add("perturbations", [{"key": "b", "node": 2, "status": "ok", "kl": 0.5, "supernode": None}])
    buf.add("graphs", pa.table({"key": ["b"], "status": ["ok"]}))
    buf.finish("prompts", "b", ok=True)
    buf.finish("perturbations", "b")
    c = Committer(st2, "s", {"a"})
    c.add(buf.flush())
    c.commit()
    r = query("SELECT key, node, kl FROM perturbations ORDER BY key", store=st2).to_pylist()
    assert r == [{"key": "a", "node": 1, "kl": None}, {"key": "b", "node": 2, "kl": 0.5}]


def test_opening_a_store_that_another_process_just_created(tmp_path, monkeypatch):
    """Two processes opening a new store at once both create the namespace; the slower one's insert fails (SQLite
    raises an IntegrityError, not NamespaceAlreadyExistsError). The namespace exists then: opening goes on."""
    from pyiceberg.catalog.sql import SqlCatalog

    Store(str(tmp_path)).table("graphs")  # the other process won

    def lost_the_race(self, namespace, properties=None):
        raise RuntimeError("(sqlite3.IntegrityError) UNIQUE constraint failed: iceberg_namespace_properties")

    monkeypatch.setattr(SqlCatalog, "create_namespace_if_not_exists", lost_the_race)
    assert Store(str(tmp_path)).table("graphs") is not None
    monkeypatch.setattr(SqlCatalog, "namespace_exists", lambda self, ns: False)  # a real failure still fails
    with pytest.raises(CTRayError, match="cannot open the table catalog"):
        Store(str(tmp_path)).table("graphs")


def test_opening_a_new_sqlite_catalog_that_another_process_is_creating(tmp_path, monkeypatch):
    """Two processes opening a new store at once both create the SQLite catalog's own tables; the slower one fails
    with "table iceberg_tables already exists" (seen with two `ct-ray sweep` at once). Opened again, it finds them."""
    from pyiceberg import catalog as pyi  # open_catalog imports load_catalog from here at each call

    load, calls = pyi.load_catalog, []

    def lost_the_race(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("(sqlite3.OperationalError) table iceberg_tables already exists")
        return load(*a, **kw)

    monkeypatch.setattr(pyi, "load_catalog", lost_the_race)
    assert Store(str(tmp_path)).table("graphs") is not None and len(calls) == 2


def test_sql_errors_lead_with_one_line(tmp_path):
    """The error is its first line; what follows is DuckDB's own help for a mistake in the SQL text."""
    with pytest.raises(CTRayError, match="SQL error: .*nope") as e:
        query("SELECT nope FROM graphs", str(tmp_path))
    assert str(e.value).splitlines()[1].startswith("Candidate bindings:")
    assert cli_main(["sql", "--store", str(tmp_path), "SELEC 1"]) == 2


def test_format_table():
    t = pa.table({"a": [1, 22], "s": ["x", None], "f": [0.5, 1 / 3]})
    out = format_table(t)
    assert out.splitlines()[0].split() == ["a", "s", "f"] and "NULL" in out and "(2 rows)" in out
    assert format_table(t, "csv").splitlines() == ["a,s,f", "1,x,0.5", "22,,0.3333333333333333"]
    assert format_table(t, "json").splitlines()[0] == '{"a": 1, "s": "x", "f": 0.5}'
    assert "1 not shown" in format_table(t, max_rows=1)
    # lists and timestamps: JSON text in CSV (not Python reprs), ISO 8601; JSON Lines; a Markdown table
    import datetime as dt

    t = pa.table({"l": [[1, 2], None], "s": ["x|y", "z"], "ts": [dt.datetime(2026, 1, 1), None]})
    assert format_table(t, "csv").splitlines()[1] == '"[1, 2]",x|y,2026-01-01T00:00:00'
    assert format_table(t, "jsonl").splitlines()[0] == '{"l": [1, 2], "s": "x|y", "ts": "2026-01-01T00:00:00"}'
    assert format_table(t, "json") == format_table(t, "jsonl")
    md = format_table(t, "markdown").splitlines()
    assert md[0] == "| l | s | ts |" and md[1] == "|---|---|---|" and md[2] == "| [1, 2] | x\\|y | 2026-01-01T00:00:00 |"


def test_rest_catalog_settings_come_from_the_environment():
    from ct_ray.store.catalog import env_properties

    env = {"PYICEBERG_CATALOG__CT_RAY__TOKEN": "t0k", "PYICEBERG_CATALOG__CT_RAY__WAREHOUSE": "wh",
           "PYICEBERG_CATALOG__CT_RAY__S3__ENDPOINT": "http://x", "PYICEBERG_CATALOG__OTHER__TOKEN": "no"}
    assert env_properties(env) == {"token": "t0k", "warehouse": "wh", "s3.endpoint": "http://x"}


def _committed_store(tmp_path, sid="s"):
    st = Store(str(tmp_path))
    c = Committer(st, sid)
    assert c.add(report(st, sid, {"a": "ok", "b": "error"}))
    c.commit()
    return st


@pytest.mark.parametrize("sql, msg", [
    ("SELECT * FROM read_csv('/etc/passwd')", "Permission Error"),
    ("SELECT * FROM read_text('{root}/catalog.db')", "Permission Error"),  # the store, but no data file
    ("SELECT * FROM glob('/*')", "Permission Error"),
    ("COPY graphs TO '{root}/forged.csv'", "not COPY"),
    ("EXPLAIN ANALYZE COPY graphs TO '{root}/forged.parquet'", "only EXPLAIN of a read-only"),
    ("EXPLAIN /* c */ ANALYZE (FORMAT json) COPY graphs TO '{root}/f.parquet' (USE_TMP_FILE false)", "only EXPLAIN"),
    ("ATTACH '{root}/x.db' AS x", "not ATTACH"),
    ("INSTALL httpfs", "read-only"),
    ("LOAD httpfs", "read-only"),
    ("SET enable_external_access = true", "not SET"),
    ("PRAGMA database_list", "not PRAGMA"),
    ("CREATE TABLE t AS SELECT 1", "not CREATE"),
    ("SELECT 1; SELECT 2", "exactly one SQL statement"),
    ("SELECT 1; COPY graphs TO '{root}/forged.csv'", "exactly one SQL statement"),
])
def test_sql_is_sandboxed(tmp_path, sql, msg):
    st = _committed_store(tmp_path)
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(CTRayError, match=msg) as e:
        query(sql.format(root=tmp_path), store=st)
    assert "\n" not in str(e.value)
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written


def test_read_only_statements_still_run(tmp_path):
    st = _committed_store(tmp_path)
    assert query("WITH k AS (SELECT key FROM graphs) SELECT count(*) n FROM k", store=st).column("n").to_pylist() == [2]
    assert query("EXPLAIN ANALYZE SELECT count(*) FROM nodes", store=st).num_rows == 1
    assert query("-- c\nEXPLAIN ANALYZE /* c */ (FORMAT json) SELECT 1", store=st).num_rows == 1
    assert "graphs" in query("SHOW TABLES", store=st).column("name").to_pylist()
    assert query("DESCRIBE graphs", store=st).num_rows == len(SCHEMAS["graphs"])


def test_corrupt_data_file_is_one_line(tmp_path):
    st = _committed_store(tmp_path)
    for f in (tmp_path / "warehouse" / "graphs" / "data").rglob("*.parquet"):
        f.write_bytes(b"PAR1 not really")
    with pytest.raises(CTRayError, match="cannot read table graphs") as e:
        query("SELECT * FROM graphs", store=st)
    assert "\n" not in str(e.value)


def test_store_urls_with_glob_characters_are_refused(tmp_path):
    _committed_store(tmp_path / "a1")
    with pytest.raises(CTRayError, match="glob characters"):
        query("SELECT * FROM graphs", str(tmp_path / "a*"))


def test_sql_on_s3_is_sandboxed(s3, tmp_path):
    url = f"s3://{s3['bucket']}/sandboxed"
    st = Store(url)
    c = Committer(st, "s")
    assert c.add(report(st, "s", {"a": "ok"}))
    c.commit()
    assert query("SELECT key FROM nodes", url).column("key").to_pylist() == ["a"]
    with pytest.raises(CTRayError, match="Permission Error"):
        query(f"SELECT * FROM read_parquet('{url}/warehouse/*/data/*/*.parquet')", url)
    st.fs.pipe_file(f"{s3['bucket']}/secret.csv", b"a,b\n1,2\n")  # another object of the same bucket
    for sql in (f"SELECT * FROM read_csv('s3://{s3['bucket']}/secret.csv')",
                f"COPY (SELECT 1) TO 's3://{s3['bucket']}/forged.csv'"):
        with pytest.raises(CTRayError, match="Permission Error|not COPY"):
            query(sql, url)
    assert not st.fs.exists(f"{s3['bucket']}/forged.csv")
    with pytest.raises(CTRayError, match="no store at"):
        query("SELECT * FROM graphs", f"s3://{s3['bucket']}/not-there")


def test_sql_mistakes_keep_duckdbs_hints(tmp_path):
    """A mistyped column or table keeps DuckDB's help: the candidates, the suggestion, the caret."""
    with pytest.raises(CTRayError) as e:
        query("SELECT promt FROM graphs", str(tmp_path))
    assert 'Candidate bindings: "prompt"' in str(e.value)
    with pytest.raises(CTRayError) as e:
        query("SELECT prompt FROM graph", str(tmp_path))
    assert 'Did you mean "graphs"' in str(e.value)
    with pytest.raises(CTRayError) as e:
        query("SELEC 1", str(tmp_path))
    assert "LINE 1: SELEC 1" in str(e.value) and "^" in str(e.value)
