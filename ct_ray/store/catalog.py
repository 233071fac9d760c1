"""Which Iceberg catalog holds a store's tables, and how a table is created or evolved in it.

A catalog is named by one URI (spec `storage.catalog`, or the CT_RAY_CATALOG environment variable):

    sqlite:///path/catalog.db          embedded default (pyiceberg SqlCatalog on SQLite)
    postgresql://user@host:5432/db     SqlCatalog on PostgreSQL (the Iceberg JDBC catalog layout: Spark/Trino read it)
    rest:https://host/path             an Iceberg REST catalog (Polaris, Nessie, Gravitino, Tabular, ...)
    glue  |  glue:REGION               AWS Glue (what Athena reads)

Credentials never appear in a URI or a spec: PostgreSQL takes PGPASSWORD / ~/.pgpass, REST the environment
(PYICEBERG_CATALOG__CT_RAY__TOKEN, __CREDENTIAL, __WAREHOUSE: see `env_properties`), Glue and S3 the AWS chain.
Without a URI the catalog is a SQLite file under a local store (`{store}/catalog.db`); for an object-storage
store it is a SQLite file in the local cache (`$CT_RAY_CATALOG_DIR`, default ~/.cache/ct_ray/catalogs, one per
store URL), so a cluster should name a shared catalog.
"""

from __future__ import annotations

import hashlib
import os
import re
import time

from ..errors import StorageError, one_line
from .schemas import PARTITIONS, SCHEMAS, TABLES_SCHEMA_VERSION

NAMESPACE = "ct_ray"
CATALOG_ENV = "CT_RAY_CATALOG"
CATALOG_DIR_ENV = "CT_RAY_CATALOG_DIR"  # where the embedded catalogs of object-storage stores live
CATALOG_NAME = "ct_ray"
WAREHOUSE_DIR = "warehouse"
TARGET_FILE_BYTES = 128 * 2**20
# every table's properties: v2, zstd, 128 MB files, old metadata files removed as new ones are written, commit
# retries for sweeps that commit to the same table at once (appends never conflict), manifests merged on append (a
# sweep's thousands of rounds plan from a few manifests), row groups of 128k rows (a key's rows in key-sorted files
# are found from row-group statistics and read with little else)
TABLE_PROPERTIES = {
    "format-version": "2",
    "write.parquet.compression-codec": "zstd",
    "write.target-file-size-bytes": str(TARGET_FILE_BYTES),
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "20",
    "commit.retry.num-retries": "20",
    "commit.retry.min-wait-ms": "50",
    "commit.retry.max-wait-ms": "2000",
    "commit.manifest-merge.enabled": "true",
    "commit.manifest.min-count-to-merge": "16",
    "write.parquet.row-group-limit": "131072",
}
_PASSWORD_RE = re.compile(r"^[a-z0-9+]+://[^/@:]*:[^/@]*@", re.I)


def default_catalog_uri(store_url: str, local_root: str | None) -> str:
    """The embedded catalog of a store: a SQLite file in the store when it is local, else in the local cache."""
    if local_root is not None:
        return f"sqlite:///{local_root}/catalog.db"
    d = os.environ.get(CATALOG_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "ct_ray", "catalogs")
    digest = hashlib.sha256(store_url.encode()).hexdigest()[:16]
    return f"sqlite:///{os.path.join(os.path.abspath(d), digest + '.db')}"


def check_catalog_uri(uri: str) -> str:
    """A catalog URI as given, or a one-line ValueError (unknown kind, or a password in it)."""
    uri = str(uri).strip()
    if _PASSWORD_RE.match(uri):
        raise ValueError("the catalog URI holds a password: give it through PGPASSWORD or ~/.pgpass instead")
    kind = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if kind not in ("sqlite", "postgresql", "postgres", "rest", "glue"):
        raise ValueError(f"unknown catalog {uri!r}: use sqlite:///FILE, postgresql://USER@HOST/DB, rest:URL or glue")
    return uri


def catalog_properties(uri: str, io_properties: dict) -> dict:
    """pyiceberg `load_catalog` properties for a catalog URI (plus the FileIO properties of the warehouse)."""
    uri = check_catalog_uri(uri)
    kind = uri.split(":", 1)[0].split("+", 1)[0].lower()
    props = dict(io_properties)
    if kind == "sqlite":
        path = uri.split(":///", 1)[1] if ":///" in uri else ""
        if not path:
            raise ValueError(f"bad SQLite catalog {uri!r}: use sqlite:///path/to/catalog.db")
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        props.update(type="sql", uri=f"sqlite:///{path}")
    elif kind in ("postgresql", "postgres"):
        rest = uri.split("://", 1)[1] if "://" in uri else ""
        if "connect_timeout=" not in rest:  # libpq waits for an unanswering host as long as TCP does (minutes)
            rest += ("&" if "?" in rest else "?") + "connect_timeout=10"
        props.update(type="sql", uri=f"postgresql+psycopg2://{rest}")
    elif kind == "rest":
        props.update(type="rest", uri=uri.split(":", 1)[1])
    else:  # glue
        props["type"] = "glue"
        if ":" in uri:
            props["glue.region"] = uri.split(":", 1)[1]
    return props


def env_properties(environ=None) -> dict:
    """Catalog properties from PYICEBERG_CATALOG__CT_RAY__<NAME> variables (TOKEN, CREDENTIAL, WAREHOUSE, ...).
    pyiceberg's own reading of them turns `_` into `-` in the catalog name (they would configure `ct-ray`), so
    ct_ray reads them itself; `__` inside NAME becomes `.`, `_` becomes `-` (pyiceberg's rule for the rest)."""
    env = os.environ if environ is None else environ
    prefix = "PYICEBERG_CATALOG__CT_RAY__"
    return {k[len(prefix):].lower().replace("__", ".").replace("_", "-"): v
            for k, v in env.items() if k.startswith(prefix) and v}


def open_catalog(uri: str, io_properties: dict):
    from pyiceberg.catalog import load_catalog

    try:
        for attempt in range(3):
            try:
                cat = load_catalog(CATALOG_NAME, **{**env_properties(), **catalog_properties(uri, io_properties)})
                break
            except Exception as e:
                # two processes opening a new SQLite catalog at once both create its tables: the slower one fails
                # with "table ... already exists"; opened again, it finds them
                if attempt == 2 or "already exists" not in str(e):
                    raise
                time.sleep(0.2)
        try:
            cat.create_namespace_if_not_exists(NAMESPACE)
        except Exception:
            # two processes opening a new store at once both see no namespace and both create it: the slower
            # one's insert fails on the other's row (SQLite: an IntegrityError, not NamespaceAlreadyExistsError)
            if not cat.namespace_exists(NAMESPACE):
                raise
    except ValueError:
        raise
    except Exception as e:
        raise StorageError(f"cannot open the table catalog {_redact(uri)}: {one_line(e)}") from e
    return cat


def _redact(uri: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", uri)


def identifier(name: str) -> str:
    return f"{NAMESPACE}.{name}"


def iceberg_schema(name: str):
    """The Iceberg schema of a table (fresh field ids, in the Arrow schema's order)."""
    from pyiceberg.catalog import Catalog
    from pyiceberg.schema import assign_fresh_schema_ids

    # ids assigned here, as create_table will: the partition spec and sort order name their columns by id
    return assign_fresh_schema_ids(Catalog._convert_schema_if_needed(SCHEMAS[name]))


def partition_spec(name: str, schema):
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.transforms import IdentityTransform

    col = PARTITIONS[name]
    return PartitionSpec(PartitionField(source_id=schema.find_field(col).field_id, field_id=1000,
                                        transform=IdentityTransform(), name=col))


def sort_order(schema):
    """Tables with a `key` column are sorted by it; others are unsorted."""
    from pyiceberg.table.sorting import UNSORTED_SORT_ORDER, SortField, SortOrder
    from pyiceberg.transforms import IdentityTransform

    try:
        fid = schema.find_field("key").field_id
    except ValueError:
        return UNSORTED_SORT_ORDER
    return SortOrder(SortField(source_id=fid, transform=IdentityTransform()))


def ensure_table(catalog, name: str, location: str):
    """Load a table, creating it (partitioned by identity on its partition column) when missing and adding any
    column the code's schema has that the table lacks (schema evolution by name: older files read as null)."""
    from pyiceberg.exceptions import NoSuchTableError, TableAlreadyExistsError

    ident = identifier(name)
    try:
        table = catalog.load_table(ident)
    except NoSuchTableError:
        schema = iceberg_schema(name)
        try:
            table = catalog.create_table(ident, schema=schema, location=location, partition_spec=partition_spec(name, schema),
                                         sort_order=sort_order(schema),
                                         properties={**TABLE_PROPERTIES, "ct_ray.schema_version": str(TABLES_SCHEMA_VERSION)})
        except TableAlreadyExistsError:  # created meanwhile by another process
            table = catalog.load_table(ident)
    have = {f.name for f in table.schema().fields}
    if any(f.name not in have for f in SCHEMAS[name]):
        with table.update_schema() as upd:
            upd.union_by_name(SCHEMAS[name])
        with catalog.load_table(ident).transaction() as tx:
            tx.set_properties({"ct_ray.schema_version": str(TABLES_SCHEMA_VERSION)})
        table = catalog.load_table(ident)
    # (format-version is the metadata's own field, not a property)
    missing = {k: v for k, v in TABLE_PROPERTIES.items() if k not in table.properties and k != "format-version"}
    if missing:  # a store made by an older version: the properties it lacks (existing values are the user's)
        with table.transaction() as tx:
            tx.set_properties(missing)
        table = catalog.load_table(ident)
    if "key" in have and table.sort_order().is_unsorted:
        _sort_by_key(table)
        table = catalog.load_table(ident)
    return table


def _sort_by_key(table) -> None:
    """Declare the table sorted by `key` (what ct_ray's writers and `compact` do), so other engines' rewrites keep
    one key's rows together and file statistics prune point reads."""
    from pyiceberg.exceptions import CommitFailedException
    from pyiceberg.transforms import IdentityTransform

    try:
        with table.update_sort_order() as u:
            u.asc("key", IdentityTransform())
    except CommitFailedException:  # set meanwhile by another process
        pass
