"""SQL over the sweep tables: DuckDB in-process, locally and on object storage (through the fsspec filesystem,
since DuckDB's httpfs cannot be installed offline).

Views: `graphs` (every committed prompt row, ok or error), `nodes`, `edges`, `perturbations` (rows of graphs whose
status is 'ok' only, so rows of uncommitted or failed attempts never show), plus `raw_nodes`, `raw_edges`,
`raw_perturbations` (every committed file). All carry the partition column `sweep_id`; `features` (feature
dashboards, see ct_ray/features) carries `clt_id` instead. See docs/sql.md.
"""

from __future__ import annotations

import pyarrow as pa

from ..errors import CTRayError, StorageError
from .tables import ALL_SCHEMAS, DEFAULT_STORE, PARTITION, PARTITIONS, SCHEMAS, TABLE_NAMES, Store, _with_meta


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def connect(url: str = DEFAULT_STORE, *, store: Store | None = None, **storage_options):
    """A DuckDB connection with the views registered over the store at `url`."""
    import duckdb

    store = store or Store(url, **storage_options)
    fs = store.fs
    con = duckdb.connect()
    if store.local:
        prefix = store.root
    else:
        try:
            fs.invalidate_cache()
        except Exception:
            pass
        con.register_filesystem(fs)
        proto = store.url.split("://", 1)[0]
        prefix = f"{proto}://{store.root}"
    for t in (*TABLE_NAMES, *PARTITIONS):
        part = PARTITIONS.get(t, PARTITION)
        glob = f"{store.root}/{t}/{part}=*/*.parquet"
        try:
            has_files = bool(fs.glob(glob))
        except FileNotFoundError:
            has_files = False
        except Exception as e:
            raise StorageError(f"cannot list {store.url}/{t}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        if has_files:
            src = (f"read_parquet({_sql_str(f'{prefix}/{t}/{part}=*/*.parquet')}, hive_partitioning=true, "
                   f"union_by_name=true, hive_types={{'{part}': 'VARCHAR'}})")
        else:
            empty = _with_meta(ALL_SCHEMAS[t], t).empty_table().append_column(part, pa.array([], pa.string()))
            con.register(f"_empty_{t}", empty)
            src = f"_empty_{t}"
        name = t if t in ("graphs", *PARTITIONS) else f"raw_{t}"
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM {src}")
    for t in ("nodes", "edges", "perturbations"):
        con.execute(f"CREATE VIEW {t} AS SELECT r.* FROM raw_{t} r SEMI JOIN graphs g "
                    f"ON r.{PARTITION} = g.{PARTITION} AND r.key = g.key AND g.status = 'ok'")
    return con


def query(sql: str, url: str = DEFAULT_STORE, **storage_options) -> pa.Table:
    """Run one SQL statement over the store's views; the result as an Arrow table."""
    import duckdb

    con = connect(url, **storage_options)
    try:
        rel = con.sql(sql)
        return rel.to_arrow_table() if rel is not None else pa.table({})
    except duckdb.Error as e:
        raise CTRayError(f"SQL error: {str(e).strip().splitlines()[0]}") from e
    finally:
        con.close()


def format_table(t: pa.Table, fmt: str = "table", max_rows: int = 100, max_width: int = 60) -> str:
    """Render a result for the terminal: an aligned text table, CSV or JSON lines."""
    import csv
    import io
    import json

    rows = t.slice(0, max_rows).to_pylist() if fmt == "table" else t.to_pylist()
    cols = t.column_names
    if fmt == "json":
        return "\n".join(json.dumps(r, default=str) for r in rows)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(cols)
        for r in rows:
            w.writerow([r[c] for c in cols])
        return buf.getvalue().rstrip("\n")

    def cell(v) -> str:
        if v is None:
            return "NULL"
        if isinstance(v, float):
            s = f"{v:.6g}"
        else:
            s = str(v)
        if not s.isprintable():
            s = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in s)
        return s if len(s) <= max_width else s[: max_width - 1] + "…"

    body = [[cell(r[c]) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(b[i]) for b in body]) for i, c in enumerate(cols)]
    numeric = [pa.types.is_integer(f.type) or pa.types.is_floating(f.type) for f in t.schema]
    fmt_row = lambda vals: "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(vals, widths, numeric)).rstrip()
    lines = [fmt_row(cols), "  ".join("-" * w for w in widths)]
    lines += [fmt_row(b) for b in body]
    more = t.num_rows - len(rows)
    lines.append(f"({t.num_rows} row{'s' if t.num_rows != 1 else ''}{f', {more} not shown' if more > 0 else ''})")
    return "\n".join(lines)


# --- DDL for other engines over the same files ---------------------------------------------------------------
_TYPES = {  # arrow type -> (trino, spark, athena)
    "string": ("varchar", "string", "string"),
    "int16": ("smallint", "smallint", "smallint"),
    "int32": ("integer", "int", "int"),
    "int64": ("bigint", "bigint", "bigint"),
    "float": ("real", "float", "float"),
    "double": ("double", "double", "double"),
    "bool": ("boolean", "boolean", "boolean"),
    "timestamp[us, tz=UTC]": ("timestamp(6)", "timestamp", "timestamp"),  # UTC instants
}
ENGINES = ("trino", "spark", "athena")


def _sql_type(t: pa.DataType, engine: str) -> str:
    i = ENGINES.index(engine)
    if pa.types.is_list(t):
        inner = _sql_type(t.value_type, engine)
        return f"array({inner})" if engine == "trino" else f"array<{inner}>"
    return _TYPES[str(t)][i]


def external_table_ddl(engine: str, location: str, schema_name: str = "ct_ray") -> str:
    """CREATE statements mounting the four tables (and the committed-rows views) at `location` (the store root,
    e.g. s3://bucket/ct_ray) in Trino (Hive connector), Spark SQL or Athena."""
    if engine not in ENGINES:
        raise CTRayError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    loc = location.rstrip("/")
    if engine == "spark" and loc.startswith("s3://"):
        loc = "s3a://" + loc[5:]
    out = []
    for t in TABLE_NAMES:
        cols = [(f.name, _sql_type(f.type, engine)) for f in SCHEMAS[t]]
        name = t if t == "graphs" else f"raw_{t}"
        if engine == "trino":
            body = ",\n".join(f"  {c} {ty}" for c, ty in cols + [(PARTITION, "varchar")])
            out.append(f"CREATE TABLE hive.{schema_name}.{name} (\n{body}\n) WITH (\n"
                       f"  external_location = '{loc}/{t}',\n  format = 'PARQUET',\n"
                       f"  partitioned_by = ARRAY['{PARTITION}']\n);\n"
                       f"CALL hive.system.sync_partition_metadata('{schema_name}', '{name}', 'FULL');")
        else:
            body = ",\n".join(f"  {c} {ty}" for c, ty in cols)
            ext = "EXTERNAL " if engine == "athena" else ""
            using = "STORED AS PARQUET" if engine == "athena" else "USING PARQUET"
            part = f"PARTITIONED BY ({PARTITION} string)" if engine == "athena" else f"PARTITIONED BY ({PARTITION})"
            cols_sql = body if engine == "athena" else body + f",\n  {PARTITION} string"
            out.append(f"CREATE {ext}TABLE {schema_name}.{name} (\n{cols_sql}\n)\n{using}\n{part}\n"
                       f"LOCATION '{loc}/{t}/';\nMSCK REPAIR TABLE {schema_name}.{name};")
    prefix = f"hive.{schema_name}" if engine == "trino" else schema_name
    for t in ("nodes", "edges", "perturbations"):
        out.append(f"CREATE VIEW {prefix}.{t} AS SELECT r.* FROM {prefix}.raw_{t} r WHERE EXISTS (SELECT 1 FROM "
                   f"{prefix}.graphs g WHERE g.{PARTITION} = r.{PARTITION} AND g.key = r.key AND g.status = 'ok');")
    return "\n\n".join(out) + "\n"
