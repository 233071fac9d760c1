"""The result tables of a store: Apache Iceberg tables in a catalog, data files under the store's warehouse.

A store is a root URL (any fsspec URL; default `./ct_ray_data`) plus a catalog (see catalog.py):

    {root}/catalog.db                             the embedded catalog (SQLite), for a local store
    {root}/warehouse/{table}/data/{part}={v}/     Iceberg data files (Parquet), identity-partitioned
    {root}/warehouse/{table}/metadata/            Iceberg metadata (snapshots, manifests)
    {root}/_sweeps/{id}/plan.json                 what a sweep was asked to do (for `sweep status`)
    {root}/_sweeps/{id}/supernodes/{key}.json     supernode groupings saved from the explorer
    {root}/_features/{clt_id}/job.json            what the CLT's committed features job was

Tables: graphs, nodes, edges, perturbations (partitioned by sweep_id), features (clt_id), train_metrics (run).
Rows become visible only through an Iceberg commit (an atomic swap of the table's metadata in the catalog), so
every engine reading the catalog sees exactly the committed rows; data files no commit names are invisible and
`ct-ray tables vacuum` removes them. Workers write data files (writer.py); the driver commits them (commit.py).
See docs/tables.md.
"""

from __future__ import annotations

import json
import os
import uuid

import pyarrow as pa

from ..errors import StorageError, one_line
from .catalog import CATALOG_ENV, WAREHOUSE_DIR, check_catalog_uri, default_catalog_uri, ensure_table, identifier, open_catalog
from .confine import check_data_files, check_table_location
from .fs import filesystem, is_local, s3_config_kwargs
from .keyed import as_schema
from .names import check_rel, confined, is_name
from .options import DEFAULT_STORE
from .schemas import PARTITIONS, SCHEMAS, SWEEP_TABLES, TABLE_NAMES, TABLES_SCHEMA_VERSION, conform, empty_table  # noqa: F401

SWEEPS_DIR = "_sweeps"
PARTITION = "sweep_id"
_TMP_TAG = ".tmp-"


def io_properties(url: str, storage_options: dict) -> dict:
    """pyiceberg FileIO properties for the warehouse: endpoint, region and timeouts, never credentials (the AWS
    chain supplies those)."""
    if not url.startswith("s3://"):
        return {}
    props = {}
    endpoint = storage_options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        props["s3.endpoint"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    props["s3.region"] = region or "us-east-1"
    ck = s3_config_kwargs(storage_options)  # the same bounded timeouts as the store's own filesystem
    props["s3.connect-timeout"] = str(float(ck["connect_timeout"]))
    props["s3.request-timeout"] = str(float(ck["read_timeout"]))
    return props


class Store:
    """A store root (fsspec URL) and its table catalog. Picklable: ships to actors by URL + options + catalog URI."""

    def __init__(self, url: str = DEFAULT_STORE, *, catalog: str | None = None, **storage_options):
        url = str(url)
        if "://" not in url:
            url = os.path.abspath(os.path.expanduser(url))
        elif url.startswith("file://"):
            url = os.path.abspath(url.removeprefix("file://"))
        self.url = url.rstrip("/")
        if any(c in self.url.split("://", 1)[-1] for c in "*?[]"):  # DuckDB and fsspec would expand them: other stores' files
            raise StorageError(f"store URL {self.url!r} has glob characters (* ? [ ]): name a plain folder")
        self.storage_options = dict(storage_options)
        catalog = catalog or os.environ.get(CATALOG_ENV)
        self.catalog_uri = check_catalog_uri(catalog) if catalog else None
        self._fs = None
        self._catalog = None
        self._tables: dict = {}
        self._ensured: set = set()

    def __getstate__(self):
        return {"url": self.url, "storage_options": self.storage_options, "catalog_uri": self.catalog_uri,
                "_fs": None, "_catalog": None, "_tables": {}, "_ensured": set()}

    def __repr__(self):
        return f"Store({self.url!r})"

    @property
    def fs(self):
        if self._fs is None:
            self._fs, self._root = filesystem(self.url, **dict(self.storage_options))
        return self._fs

    @property
    def root(self) -> str:
        self.fs  # noqa: B018 (resolves _root)
        return self._root

    @property
    def local(self) -> bool:
        return is_local(self.fs)

    def check_exists(self) -> None:
        """For readers: a store that is not there is an error (a mistyped path must not read as an empty store)."""
        try:
            if self.local:
                found = os.path.isdir(self.root)
            else:  # one listing request (exists() may take two, each with its timeouts)
                self.fs.invalidate_cache(self.root)
                found = bool(self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            found = False
        except Exception as e:
            raise StorageError(f"cannot reach the store {self.url}: {one_line(e)}") from e
        if not found:
            raise StorageError(f"no store at {self.url} (check --store; a store appears with its first write)")

    # --- the catalog and its tables --------------------------------------------------------------------
    @property
    def catalog(self):
        if self._catalog is None:
            uri = self.catalog_uri or default_catalog_uri(self.url, self.root if self.local else None)
            self._catalog = open_catalog(uri, self.io_properties())
        return self._catalog

    def io_properties(self) -> dict:
        return io_properties(self.url, self.storage_options)

    def table_location(self, name: str) -> str:
        return f"file://{self.root}/{WAREHOUSE_DIR}/{name}" if self.local else f"{self.url}/{WAREHOUSE_DIR}/{name}"

    def table(self, name: str, refresh: bool = True):
        """The Iceberg table `name`, created (or evolved to the code's schema) on first use by this Store."""
        try:
            if name not in self._ensured:  # created or evolved once per Store (readers only load: existing_table)
                t = ensure_table(self.catalog, name, self.table_location(name))
                check_table_location(self, name, t)  # a copied store's catalog would write into the original
                self._tables[name] = t
                self._ensured.add(name)
            elif refresh:
                self._tables[name] = self._tables[name].refresh()
            return self._tables[name]
        except (StorageError, ValueError):
            raise
        except Exception as e:
            raise StorageError(f"cannot open table {name} of {self.url}: {one_line(e)}") from e

    def existing_table(self, name: str):
        """The table if the catalog has it (readers never create tables), else None."""
        from pyiceberg.exceptions import NoSuchTableError

        if name in self._tables:
            self._tables[name] = self._tables[name].refresh()
            return self._tables[name]
        if self.catalog_uri is None and self.local and not os.path.exists(f"{self.root}/catalog.db"):
            return None  # no embedded catalog yet: nothing committed (and reading creates nothing)
        try:
            t = self.catalog.load_table(identifier(name))
        except NoSuchTableError:
            return None
        except StorageError:
            raise
        except Exception as e:
            raise StorageError(f"cannot open table {name} of {self.url}: {one_line(e)}") from e
        check_table_location(self, name, t)
        self._tables[name] = t
        return t

    def writer_config(self, name: str) -> dict:
        """What a worker needs to write data files of `name` without the catalog (see writer.TableWriter)."""
        t = self.table(name)
        return {"name": name, "metadata": t.metadata.model_dump_json(), "io": self.io_properties()}

    # --- reading ---------------------------------------------------------------------------------------
    def read(self, name: str, partition: str | None = None, columns: list[str] | None = None,
             keys: list[str] | None = None, where=None) -> pa.Table:
        """Committed rows of a table (the current snapshot), optionally of one partition, some keys, some columns.
        The partition column is dropped when one partition is asked for."""
        from pyiceberg.expressions import AlwaysTrue, And, EqualTo, In

        part = PARTITIONS[name]
        want = list(columns) if columns else [f.name for f in SCHEMAS[name] if partition is None or f.name != part]
        schema = pa.schema([SCHEMAS[name].field(c) for c in want])
        t = self.existing_table(name)
        if t is None or t.current_snapshot() is None:
            return empty_table(schema)
        expr = where if where is not None else AlwaysTrue()
        if partition is not None:
            expr = And(expr, EqualTo(part, str(partition)))
        if keys is not None:
            if not keys:
                return empty_table(schema)
            expr = And(expr, In("key", list(keys)))
        have = {f.name for f in t.schema().fields}
        try:
            scan = t.scan(row_filter=expr, selected_fields=tuple(c for c in want if c in have))
            tasks = self.visible(name, t, scan.plan_files(), partition)
            check_data_files(name, t.metadata.location, (task.file.file_path for task in tasks))
            if self.local and where is None and not any(task.delete_files for task in tasks):
                out = _read_files(name, [task.file.file_path for task in tasks], want, keys)
            else:
                from pyiceberg.io.pyarrow import ArrowScan

                out = ArrowScan(t.metadata, t.io, scan.projection(), scan.row_filter, limit=scan.limit).to_table(tasks)
        except StorageError:
            raise
        except Exception as e:
            raise StorageError(f"cannot read table {name} of {self.url}: {one_line(e)}") from e
        return as_schema(out, schema)

    def visible(self, name: str, table, tasks, partition: str | None = None) -> list:
        """The planned `tasks` of `table` a reader may see: for a graph-part table, without the files of rounds
        whose graphs commit is missing (visibility.py; `graphs` is loaded after `table`)."""
        from .visibility import GRAPH_PARTS, hidden_files

        tasks = list(tasks)
        if name not in GRAPH_PARTS or not tasks:
            return tasks
        hidden = hidden_files(table, self.existing_table("graphs"), partition)
        return [task for task in tasks if task.file.file_path not in hidden] if hidden else tasks

    def partitions(self, name: str) -> list[str]:
        """Partition values with committed rows (from the table's metadata only)."""
        t = self.existing_table(name)
        if t is None or t.current_snapshot() is None:
            return []
        try:
            return sorted({str(task.file.partition[0]) for task in t.scan().plan_files()})
        except Exception as e:
            raise StorageError(f"cannot read table {name} of {self.url}: {one_line(e)}") from e

    def sweeps(self) -> list[str]:
        """Sweep ids with committed graphs rows or a plan."""
        ids = set(self.partitions("graphs"))
        d = f"{self.root}/{SWEEPS_DIR}"
        try:
            if not self.local:
                self.fs.invalidate_cache(d)
            if self.fs.exists(d):
                ids.update(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(d, detail=False))
        except FileNotFoundError:
            pass
        except Exception as e:
            raise StorageError(f"cannot list {self._url_of(d)}: {one_line(e)}") from e
        return sorted(i for i in ids if is_name(i))  # a folder named otherwise is no sweep (and never a path)

    def committed(self, sweep_id: str) -> pa.Table:
        """key, status, error_kind of a sweep's committed graphs rows: resume planning (one column scan)."""
        return self.read("graphs", sweep_id, columns=["key", "status", "error_kind"])

    # --- blobs: plans, run logs, supernodes, registry records ------------------------------------------
    # --- writes ---------------------------------------------------------------------------------------
    def put_bytes(self, path: str, data: bytes) -> None:
        """Write `data` at `path` (below the root) atomically: readers see the old object, or the new one whole."""
        fs = self.fs
        if not path.startswith(self.root.rstrip("/") + "/"):
            raise StorageError(f"cannot write {self._url_of(path)}: outside the folder {self.url}")
        check_rel(path[len(self.root.rstrip("/")) + 1:], StorageError)
        try:
            if self.local:
                parent = os.path.dirname(path)
                confined(self.root, parent, StorageError)  # a symlinked folder inside must not lead out of it
                os.makedirs(parent, exist_ok=True)
                tmp = os.path.join(parent, f".{os.path.basename(path)}{_TMP_TAG}{uuid.uuid4().hex[:8]}")
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            else:
                fs.pipe_file(path, data)  # a single PUT: the object appears whole or not at all
        except Exception as e:
            raise StorageError(f"cannot write {self._url_of(path)}: {one_line(e)}") from e

    def _url_of(self, path: str) -> str:
        if self.local:
            return path
        return f"{self.url.split('://', 1)[0]}://{path}"

    def write_json(self, rel: str, obj) -> None:
        self.put_bytes(f"{self.root}/{check_rel(rel, StorageError)}", json.dumps(obj, indent=1, default=str).encode())

    def read_json(self, rel: str):
        path = f"{self.root}/{check_rel(rel, StorageError)}"
        try:
            if not self.local:
                self.fs.invalidate_cache(path.rsplit("/", 1)[0])
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except Exception as e:
            raise StorageError(f"cannot read {self._url_of(path)}: {one_line(e)}") from e

    def check_writable(self) -> None:
        """Fail early, with a clear message, when the store cannot be written."""
        probe = f"{self.root}/{SWEEPS_DIR}/.probe-{uuid.uuid4().hex[:8]}"
        self.put_bytes(probe, b"ok")
        try:
            self.fs.rm_file(probe)
        except Exception:
            pass


def _read_files(name: str, paths: list[str], columns: list[str], keys: list[str] | None) -> pa.Table:
    """`columns` of local data files of table `name` (rows of `keys` only): one multi-threaded Arrow dataset scan
    under the table's schema (columns a file lacks, from an older schema version, read as null; ct_ray never renames
    a column), with row-group statistics pruning the key filter. pyiceberg's scan opens the files one task at a time
    (a few ms each: seconds for a sweep's thousands of files)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    cols = list(dict.fromkeys(columns + (["key"] if keys is not None else [])))
    schema = pa.schema([SCHEMAS[name].field(c) for c in cols])
    ds = pads.dataset([p.removeprefix("file://") for p in paths], format="parquet", schema=schema)
    flt = pc.field("key").isin(pa.array(sorted(set(keys)), pa.string())) if keys is not None else None
    return ds.to_table(columns=columns, filter=flt)


def sweep_counts(store: Store, sweep_id: str) -> dict:
    """Progress of a sweep from storage alone: planned keys, committed ok/error rows, perturbed graphs."""
    plan = store.read_json(f"{SWEEPS_DIR}/{sweep_id}/plan.json")
    g = store.committed(sweep_id)
    status = g.column("status").to_pylist()
    kinds = g.column("error_kind").to_pylist()
    keys = set(g.column("key").to_pylist())
    twice = len(status) - len(keys)  # rows of keys committed more than once (two drivers at once)
    errors: dict[str, int] = {}
    for s, k in zip(status, kinds):
        if s != "ok":
            errors[k or "unknown"] = errors.get(k or "unknown", 0) + 1
    planned = len(plan["keys"]) if plan and "keys" in plan else None
    done_of_plan = len(keys & set(plan["keys"])) if planned is not None else len(keys)
    n_pert = len(set(store.read("perturbations", sweep_id, columns=["key"]).column("key").to_pylist()))
    return {
        "sweep_id": sweep_id,
        "planned": planned,
        "committed": len(keys),
        "duplicate_rows": twice,
        "ok": status.count("ok"),
        "error": len(status) - status.count("ok"),
        "errors_by_kind": errors,
        "pending": (planned - done_of_plan) if planned is not None else None,
        "perturbed": n_pert,
        "plan": {k: v for k, v in (plan or {}).items() if k != "keys"},
    }
