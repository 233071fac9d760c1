"""SQL over the result tables: DuckDB in-process, reading exactly the data files of each Iceberg table's current
snapshot (planned by pyiceberg), locally and on object storage (through the fsspec filesystem, since DuckDB's httpfs
and iceberg extensions cannot be installed offline).

Views: `graphs` (every committed prompt row, ok or error), `nodes`, `edges`, `edge_heads`, `qk_attributions`
(without the data files of sweep rounds whose graphs commit is missing, see visibility.py: a key's rows show only
with its ok graphs row, and the views are plain scans), `perturbations`, their `raw_` twins (every committed file),
`features`, `train_metrics` and the analysis tables (`feature_stats`, `circuit_paths`, `supernodes`,
`graph_diffs`). Every view has every column of the current schema (older files read as null). See docs/sql.md.

The SQL text is untrusted: `query` runs exactly one read-only statement (checked on DuckDB's own parse, not by
pattern), in a connection whose file access is limited to the planned data files (`allowed_paths`, external access
off, configuration locked, no extension installs or loads). See docs/security.md.
"""

from __future__ import annotations

import os

import pyarrow as pa

from ..errors import CTRayError, StorageError, one_line
from .confine import check_data_files
from .schemas import SCHEMAS, TABLE_NAMES, empty_table
from .tables import DEFAULT_STORE, Store
from .visibility import GRAPH_PARTS

FILTERED = ("nodes", "edges", "perturbations", "edge_heads", "qk_attributions")  # tables with a raw_ view too


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _views(sql: str | None) -> set[str]:
    """The views a statement reads (all when it cannot tell): only those are bound to their files (binding opens
    every file's footer)."""
    every = set(TABLE_NAMES) | {f"raw_{t}" for t in FILTERED}
    if sql is None:
        return every
    import duckdb

    try:
        names = {n.lower() for n in duckdb.get_table_names(sql)}
    except Exception:
        return every
    return names & every



def check_statement(sql: str) -> str:
    """`sql` if it is exactly one read-only statement (SELECT, WITH, VALUES, DESCRIBE, SHOW, SUMMARIZE, or EXPLAIN
    of one of them), else a one-line CTRayError. DuckDB parses it: its statement types decide, not a pattern."""
    import duckdb

    try:
        stmts = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise CTRayError(f"SQL error: {_user_error(e)}") from e
    if len(stmts) != 1:
        raise CTRayError(f"give exactly one SQL statement (got {len(stmts)})")
    st = stmts[0]
    if st.type == duckdb.StatementType.EXPLAIN:  # EXPLAIN ANALYZE runs its statement: check that one too
        inner = _explained(st.query)
        if inner is None or len(inner) != 1 or inner[0].type != duckdb.StatementType.SELECT:
            raise CTRayError("only EXPLAIN of a read-only statement (SELECT ...) runs here")
    elif st.type != duckdb.StatementType.SELECT:
        raise CTRayError(f"only read-only statements run here (SELECT, WITH, DESCRIBE, SHOW, EXPLAIN), not "
                         f"{st.type.name}")
    return sql


def _explained(text: str):
    """The statements after `EXPLAIN [ANALYZE] [(options)]`, found with DuckDB's tokenizer (None if unparsable)."""
    import duckdb

    every = duckdb.tokenize(text)
    ends = [p for p, _ in every[1:]] + [len(text)]
    toks = [(p, e) for (p, kind), e in zip(every, ends) if kind != duckdb.token_type.comment]
    words = [text[p:e].strip().upper() for p, e in toks]
    if not words or words[0] != "EXPLAIN":
        return None
    i = 1
    if i < len(words) and words[i] in ("ANALYZE", "ANALYSE"):
        i += 1
    if i < len(words) and words[i] == "(":
        depth = 0
        while i < len(words):
            depth += (words[i] == "(") - (words[i] == ")")
            i += 1
            if depth == 0:
                break
    if i >= len(words):
        return None
    try:
        return duckdb.extract_statements(text[toks[i][0]:])
    except duckdb.Error:
        return None


def _point_keys(sql: str | None) -> tuple[str, list[str]] | None:
    """(view, keys) when the statement is one SELECT from one view whose WHERE is a conjunction holding
    `key = 'K'` or `key IN ('K', ...)`: then only the files whose key statistics can hold those keys are planned
    (the WHERE still filters the rows, so this only skips files that cannot match). Read from DuckDB's own parse
    tree; anything else (joins, CTEs, set operations, OR) plans every file."""
    import json

    import duckdb

    if sql is None:
        return None
    try:
        tree = json.loads(duckdb.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0])
        (stmt,) = tree["statements"]
        node = stmt["node"]
        src = node["from_table"]
        if (node["type"] != "SELECT_NODE" or node.get("cte_map", {}).get("map") or src["type"] != "BASE_TABLE"
                or src.get("schema_name") or src.get("catalog_name") or _reads_more(node)):
            return None
        view = src["table_name"].lower()
        names = {view, (src.get("alias") or "").lower()} - {""}

        def is_key(e) -> bool:
            cols = [c.lower() for c in e.get("column_names", [])] if e.get("class") == "COLUMN_REF" else []
            return bool(cols) and cols[-1] == "key" and (len(cols) == 1 or len(cols) == 2 and cols[0] in names)

        def text(e):
            lit = e.get("literal") if e.get("class") == "CONSTANT" else None
            return lit["text"] if isinstance(lit, dict) and lit.get("kind") == "STRING" else None

        todo, conj = [node.get("where_clause")], []
        while todo:
            e = todo.pop()
            if isinstance(e, dict) and e.get("type") == "CONJUNCTION_AND":
                todo += e["children"]
            elif isinstance(e, dict):
                conj.append(e)
        for e in conj:
            if e.get("type") == "COMPARE_EQUAL":
                for a, b in ((e["left"], e["right"]), (e["right"], e["left"])):
                    if is_key(a) and text(b) is not None:
                        return view, [text(b)]
            if e.get("type") == "COMPARE_IN" and e.get("children") and is_key(e["children"][0]):
                keys = [text(c) for c in e["children"][1:]]
                if keys and None not in keys:
                    return view, keys
    except Exception:
        return None
    return None


def _reads_more(tree) -> bool:
    """Does the parse tree read a table besides its one FROM table, or hold a subquery (which could read the same
    view unfiltered: pruning its files would change that subquery's answer)?"""
    tables, todo = 0, [tree]
    while todo:
        e = todo.pop()
        if isinstance(e, dict):
            if e.get("type") == "BASE_TABLE":
                tables += 1
            if e.get("class") == "SUBQUERY" or e.get("type") == "SUBQUERY":
                return True
            todo += e.values()
        elif isinstance(e, list):
            todo += e
    return tables != 1


def data_files(store: Store, name: str, keys: list[str] | None = None) -> tuple[list[str], list[str], set[str]]:
    """URLs of the data files of a table's current snapshot, as (shown, hidden, partial): hidden are the files of
    sweep rounds whose graphs commit is missing (visibility.py; only graph-part tables have them), partial those
    whose statistics do not show every column of the code's schema (written before a column was added, or by an
    engine that keeps no column statistics). Empty when nothing is committed. Load graph-part tables before `graphs`
    (the reader's view of a round is then complete). `keys`: only the files whose key statistics may hold them."""
    from pyiceberg.expressions import AlwaysTrue, In

    t = store.existing_table(name)
    if t is None or t.current_snapshot() is None:
        return [], [], set()
    try:
        tasks = list(t.scan(row_filter=In("key", keys) if keys else AlwaysTrue()).plan_files())
        shown = store.visible(name, t, tasks)
        partial = _partial(t, name, tasks)
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(f"cannot plan table {name} of {store.url}: {one_line(e, 300)}") from e
    if any(task.delete_files for task in tasks):  # row-level deletes of another engine: not applied by read_parquet
        raise CTRayError(f"table {name} has row-level delete files (written by another engine): run "
                         f"'ct-ray tables compact' first")
    keep = {task.file.file_path for task in shown}
    paths = [task.file.file_path.removeprefix("file://") for task in tasks if task.file.file_path in keep]
    hidden = [task.file.file_path.removeprefix("file://") for task in tasks if task.file.file_path not in keep]
    check_data_files(name, t.metadata.location, paths + hidden)
    return paths, hidden, {p.removeprefix("file://") for p in partial}


def _partial(table, name: str, tasks) -> set[str]:
    """Paths of the files that may lack a column of the code's schema: a file's column statistics (value counts,
    by field id) name every column it holds, a nested column by its leaves."""
    from pyiceberg.schema import index_name_by_id

    names = index_name_by_id(table.schema())
    ids: dict[str, set[int]] = {}
    for fid, full in names.items():
        ids.setdefault(full.split(".", 1)[0], set()).add(fid)
    want = [ids.get(f.name, set()) for f in SCHEMAS[name]]
    out = set()
    for task in tasks:
        have = set(task.file.value_counts or ()) | set(task.file.column_sizes or ())
        if not all(w & have for w in want):
            out.add(task.file.file_path)
    return out


MEMORY_ENV = "CT_RAY_SQL_MEMORY"  # DuckDB's memory limit for `ct-ray sql` (e.g. '4GB'); default MEMORY_FRACTION of RAM
MEMORY_FRACTION = 0.25


def default_memory_limit() -> str:
    env = os.environ.get(MEMORY_ENV)
    if env:
        return env
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return "4GB"
    return f"{max(256, int(ram * MEMORY_FRACTION / 2**20))}MB"


def connect(url: str = DEFAULT_STORE, *, store: Store | None = None, sql: str | None = None,
            memory_limit: str | None = None, **storage_options):
    """A DuckDB connection with the views registered over the store at `url` (only those `sql` needs, if given).
    `memory_limit`: DuckDB's (default `default_memory_limit()`, a quarter of RAM; DuckDB's own is 80%)."""
    import duckdb

    store = store or Store(url, **storage_options)
    store.check_exists()
    # no extension is installed or loaded behind the statement's back (views read through the fsspec filesystem)
    try:
        con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False,
                                     "allow_community_extensions": False,
                                     "memory_limit": memory_limit or default_memory_limit()})
    except duckdb.Error as e:
        raise CTRayError(f"bad memory limit {memory_limit or default_memory_limit()!r}: {one_line(e)}") from None
    if not store.local:
        con.register_filesystem(store.fs)
    views = _views(sql)
    need = {n.removeprefix("raw_") for n in views}
    point = _point_keys(sql)  # a point read of one view: its table planned for those keys only
    point = point if point and point[0] in views and "key" in SCHEMAS[point[0].removeprefix("raw_")].names else None
    keys_of = {point[0].removeprefix("raw_"): point[1]} if point else {}
    allowed: list[str] = []
    order = [t for t in TABLE_NAMES if t in GRAPH_PARTS] + [t for t in TABLE_NAMES if t not in GRAPH_PARTS]
    planned = {t: data_files(store, t, keys_of.get(t)) if t in need else ([], [], set()) for t in order}  # parts first
    for t in TABLE_NAMES:
        con.register(f"_empty_{t}", empty_table(SCHEMAS[t]))
        shown, hidden, partial = planned[t]
        allowed += shown + hidden
        cols = ", ".join(f'"{f.name}"' for f in SCHEMAS[t])
        made = {t: shown}
        if t in FILTERED:
            made[f"raw_{t}"] = shown + hidden
        try:  # binding a view opens its files: a corrupt or unreachable one fails here
            for name, files in made.items():
                src = _source(t, files if name in views else [], partial)
                con.execute(f"CREATE VIEW {name} AS SELECT {cols} FROM {src}")
        except (duckdb.Error, OSError) as e:
            con.close()
            raise StorageError(f"cannot read table {t} of {store.url}: {one_line(e)}") from e
    _sandbox(con, allowed)
    return con


def _source(t: str, files: list[str], partial: set[str]) -> str:
    """A relation over `files` with every column of table `t`'s current schema. Files that hold every column are
    read as they are (DuckDB then answers count(*) from the footers and pushes filters down: 5x faster on a 10^6
    prompt store); files of an older schema (`partial`) are matched by name, the missing columns as nulls."""
    full = [f for f in files if f not in partial]
    part = [f for f in files if f in partial]
    lst = lambda fs: "[" + ", ".join(_sql_str(f) for f in fs) + "]"
    if not files:
        return f"_empty_{t}"
    if not part:
        return f"read_parquet({lst(full)})"
    # by name: files written before a column was added lack it; the empty relation brings every column
    older = f"SELECT * FROM read_parquet({lst(part)}, union_by_name=true) UNION ALL BY NAME SELECT * FROM _empty_{t}"
    return f"({older}{f' UNION ALL BY NAME SELECT * FROM read_parquet({lst(full)})' if full else ''})"


def _sandbox(con, files: list[str]) -> None:
    """From here on the connection reads only `files` (the views' data files), writes nothing outside memory and
    cannot change these settings back."""
    con.execute("SET allowed_paths = [" + ", ".join(_sql_str(f) for f in files) + "]")
    con.execute("SET allowed_directories = []")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def _user_error(e) -> str:
    """DuckDB's message for a mistake in the SQL text itself, whole: its hints ('Candidate bindings', 'Did you mean')
    and the caret under the offending token are the help; any other error keeps to its first line."""
    import duckdb

    if isinstance(e, (duckdb.ParserException, duckdb.BinderException, duckdb.CatalogException)):
        return "\n".join(line.rstrip() for line in str(e).strip().splitlines() if line.strip())[:2000]
    return one_line(e)


def query(sql: str, url: str = DEFAULT_STORE, *, store: Store | None = None, timeout_s: float | None = None,
          memory_limit: str | None = None, **storage_options) -> pa.Table:
    """Run one read-only SQL statement over the store's views (sandboxed: see the module doc); an Arrow table.
    `timeout_s`: interrupt the statement after that long (None: no limit); `memory_limit`: see `connect`."""
    import threading

    import duckdb

    check_statement(sql)
    con = connect(url, store=store, sql=sql, memory_limit=memory_limit, **storage_options)
    timer = threading.Timer(timeout_s, con.interrupt) if timeout_s else None
    try:
        if timer is not None:
            timer.daemon = True
            timer.start()
        rel = con.sql(sql)
        return rel.to_arrow_table() if rel is not None else pa.table({})
    except duckdb.InterruptException:
        raise CTRayError(f"SQL stopped after {timeout_s:g} s (--timeout; 0 for none)") from None
    except duckdb.OutOfMemoryException as e:
        raise CTRayError(f"SQL needs more memory than its limit ({one_line(e)}; --memory-limit or "
                         f"{MEMORY_ENV})") from None
    except duckdb.Error as e:  # a corrupt data file, a type error, a path outside the store: all one line
        raise CTRayError(f"SQL error: {_user_error(e)}") from e
    except OSError as e:  # the store's filesystem (s3fs) failing under DuckDB
        raise StorageError(f"cannot read {store.url if store else url}: {one_line(e)}") from e
    finally:
        if timer is not None:
            timer.cancel()
        con.close()


FORMATS = {
    "table": "an aligned text table (--max-rows rows)",
    "csv": "CSV with a header row; lists and structs as JSON text, timestamps in ISO 8601",
    "jsonl": "JSON Lines: one JSON object per row",
    "json": "the same as jsonl (JSON Lines)",
    "markdown": "a Markdown (GitHub) table for pasting (--max-rows rows)",
}


def _plain(v):
    """A value as JSON can hold it (timestamps as ISO 8601, bytes as hex, nested values recursively)."""
    import datetime as _dt

    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time)):
        return v.isoformat()
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, float) and v != v:
        return None  # NaN: JSON has no such number
    return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)


def format_table(t: pa.Table, fmt: str = "table", max_rows: int = 100, max_width: int = 60) -> str:
    """Render a result for the terminal in one of FORMATS."""
    import csv
    import io
    import json

    rows = t.slice(0, max_rows).to_pylist() if fmt in ("table", "markdown") else t.to_pylist()
    cols = t.column_names
    if fmt in ("json", "jsonl"):
        return "\n".join(json.dumps(_plain(r), ensure_ascii=False) for r in rows)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(cols)
        for r in rows:
            w.writerow([json.dumps(_plain(v), ensure_ascii=False) if isinstance(v, (list, tuple, dict))
                        else _plain(v) for v in (r[c] for c in cols)])
        return buf.getvalue().rstrip("\n")
    if fmt == "markdown":
        def md(v) -> str:
            v = _plain(v)
            text = "" if v is None else json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else str(v)
            return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

        lines = ["| " + " | ".join(md(c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(md(r[c]) for c in cols) + " |" for r in rows]
        if t.num_rows > len(rows):
            lines.append(f"\n({t.num_rows - len(rows)} more rows not shown: --max-rows)")
        return "\n".join(lines)
    if fmt != "table":
        raise CTRayError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")

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
