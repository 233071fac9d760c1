"""The SQL layer without Ray: views over an empty / hand-written store, DDL for other engines, formatting."""

import re
from pathlib import Path

import pyarrow as pa
import pytest

from ct_ray.cli import main as cli_main
from ct_ray.errors import CTRayError
from ct_ray.store.sql import ENGINES, external_table_ddl, format_table, query
from ct_ray.store.tables import SCHEMAS, TABLE_NAMES, Store

DOCS = Path(__file__).parent.parent / "docs" / "sql.md"


def sql_blocks(text: str) -> list[str]:
    return re.findall(r"```sql\n(.*?)```", text, flags=re.S)


def test_views_on_an_empty_store(tmp_path):
    for t in TABLE_NAMES:
        r = query(f"SELECT * FROM {t}", str(tmp_path / "nothing"))
        assert r.num_rows == 0 and r.column_names == SCHEMAS[t].names + ["sweep_id"]


def test_views_hide_uncommitted_and_failed_keys(tmp_path):
    st = Store(str(tmp_path))
    node = lambda key: [{"key": key, "node": 0, "kind": "feature", "kept": True}]
    for key, status in (("a", "ok"), ("b", "error"), ("c", None)):  # c: nodes written, graphs row never committed
        st.write_table("nodes", "s", key, pa.Table.from_pylist(node(key)))
        st.write_table("edges", "s", key, pa.Table.from_pylist([{"key": key, "source": 0, "target": 0, "weight": 1.0}]))
        if status:
            st.write_table("graphs", "s", key, pa.Table.from_pylist([{"key": key, "status": status}]))
    st.write_table("graphs", "other", "a", pa.Table.from_pylist([{"key": "a", "status": "error"}]))
    assert query("SELECT key FROM nodes ORDER BY key", str(tmp_path)).column("key").to_pylist() == ["a"]
    assert query("SELECT key FROM edges", str(tmp_path)).column("key").to_pylist() == ["a"]
    assert query("SELECT count(*) n FROM raw_nodes", str(tmp_path)).column("n").to_pylist() == [3]
    r = query("SELECT sweep_id, count(*) n FROM graphs GROUP BY 1 ORDER BY 1", str(tmp_path)).to_pylist()
    assert r == [{"sweep_id": "other", "n": 1}, {"sweep_id": "s", "n": 2}]
    # no temporary or partial file is ever listed
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    assert st.list_names("nodes", "s") == ["a", "b", "c"]


def test_sql_errors_are_one_line(tmp_path):
    with pytest.raises(CTRayError, match="SQL error: .*nope") as e:
        query("SELECT nope FROM graphs", str(tmp_path))
    assert "\n" not in str(e.value)
    assert cli_main(["sql", "--store", str(tmp_path), "SELEC 1"]) == 2


@pytest.mark.parametrize("engine", ENGINES)
def test_ddl_covers_every_column_and_matches_docs(engine):
    ddl = external_table_ddl(engine, "s3://my-bucket/ct_ray")
    for t, schema in SCHEMAS.items():
        for f in schema:
            assert re.search(rf"\n  {f.name} ", ddl), (t, f.name)
    assert ddl.count("CREATE VIEW") == 3 and ddl.count("sweep_id") > 4
    blocks = [b for b in sql_blocks(DOCS.read_text()) if b.lstrip().startswith("CREATE") and
              (("hive." in b) == (engine == "trino")) and (("s3a://" in b) == (engine == "spark"))]
    assert blocks, engine
    for b in blocks:
        for stmt in b.strip().split("\n\n"):
            assert stmt in ddl


def test_format_table():
    t = pa.table({"a": [1, 22], "s": ["x", None], "f": [0.5, 1 / 3]})
    out = format_table(t)
    assert out.splitlines()[0].split() == ["a", "s", "f"] and "NULL" in out and "(2 rows)" in out
    assert format_table(t, "csv").splitlines() == ["a,s,f", "1,x,0.5", "22,,0.3333333333333333"]
    assert format_table(t, "json").splitlines()[0] == '{"a": 1, "s": "x", "f": 0.5}'
    assert "1 not shown" in format_table(t, max_rows=1)
