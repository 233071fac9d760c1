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
        buf.add("nodes", [{"key": key, "node": 0, "kind": "feature", "kept": True}])
        buf.add("edges", [{"key": key, "source": 0, "target": 0, "weight": 1.0}])
        if status:
            buf.add("graphs", [{"key": key, "status": status}])
            buf.finish("prompts", key, ok=status == "ok")
    return buf.flush()


def test_views_on_an_empty_store(tmp_path):
    for t in TABLE_NAMES:
        r = query(f"SELECT * FROM {t}", str(tmp_path / "nothing"))
        assert r.num_rows == 0 and r.column_names == SCHEMAS[t].names


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
    assert query("SELECT count(*) n FROM raw_nodes", str(tmp_path)).column("n").to_pylist() == [3]
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
    import ct_ray.store.commit as commit

    st = Store(str(tmp_path))
    c = Committer(st, "s")
    c.add(report(st, "s", {"a": "ok"}))
    c.commit()
    real = commit.commit_files

    def dies_at_graphs(store, name, *a, **kw):
        if name == "graphs":
            raise KeyboardInterrupt
        return real(store, name, *a, **kw)

    monkeypatch.setattr(commit, "commit_files", dies_at_graphs)
    c = Committer(st, "s", {"a"})
    c.add(report(st, "s", {"b": "ok", "c": "ok"}))
    with pytest.raises(KeyboardInterrupt):
        c.commit()
    monkeypatch.setattr(commit, "commit_files", real)
    assert query("SELECT count(*) n FROM raw_nodes", str(tmp_path)).column("n").to_pylist() == [3]
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


def test_sql_errors_are_one_line(tmp_path):
    with pytest.raises(CTRayError, match="SQL error: .*nope") as e:
        query("SELECT nope FROM graphs", str(tmp_path))
    assert "\n" not in str(e.value)
    assert cli_main(["sql", "--store", str(tmp_path), "SELEC 1"]) == 2


def test_format_table():
    t = pa.table({"a": [1, 22], "s": ["x", None], "f": [0.5, 1 / 3]})
    out = format_table(t)
    assert out.splitlines()[0].split() == ["a", "s", "f"] and "NULL" in out and "(2 rows)" in out
    assert format_table(t, "csv").splitlines() == ["a,s,f", "1,x,0.5", "22,,0.3333333333333333"]
    assert format_table(t, "json").splitlines()[0] == '{"a": 1, "s": "x", "f": 0.5}'
    assert "1 not shown" in format_table(t, max_rows=1)


def test_rest_catalog_settings_come_from_the_environment():
    from ct_ray.store.catalog import env_properties

    env = {"PYICEBERG_CATALOG__CT_RAY__TOKEN": "t0k", "PYICEBERG_CATALOG__CT_RAY__WAREHOUSE": "wh",
           "PYICEBERG_CATALOG__CT_RAY__S3__ENDPOINT": "http://x", "PYICEBERG_CATALOG__OTHER__TOKEN": "no"}
    assert env_properties(env) == {"token": "t0k", "warehouse": "wh", "s3.endpoint": "http://x"}
