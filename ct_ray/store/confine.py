"""A store reads and writes only its own files (issue 21, item 2; docs/security.md).

- Table locations: with the embedded catalog (a SQLite file in the store, or the local cache for a remote store)
  every table must live at `{store}/warehouse/{table}`. A catalog that names another location was copied with the
  store (`cp -r store1 store2`: store2's catalog still names store1's tables, so a sweep into store2 wrote into
  store1); such a store is refused, with how to move a store (docs/tables.md). A catalog the operator configured
  (`--catalog`, PostgreSQL/REST/Glue) decides locations itself.
- Data files: a file a table's metadata names must lie inside that table's location (a manifest entry naming another
  store's Parquet file is refused), and a local one must be a regular file (a FIFO named there used to hang every
  reader).
"""

from __future__ import annotations

import os
import stat

from ..errors import StorageError


def _norm(url: str) -> str:
    u = str(url)
    if u.startswith("file://"):
        u = u[len("file://"):]
    return u.rstrip("/")


def check_table_location(store, name: str, table) -> None:
    """Refuse a table of the embedded catalog that lives outside this store's warehouse."""
    if store.catalog_uri is not None:
        return
    want, have = _norm(store.table_location(name)), _norm(table.metadata.location)
    if have != want:
        raise StorageError(f"table {name} of {store.url} lives at {have}, not in this store: its catalog came from "
                           f"another store (copied or moved?). Move it back, or see 'Moving a store' in docs/tables.md")


def check_data_files(name: str, table_location: str, paths) -> None:
    """Refuse data files outside the table's location, and local ones that are not regular files."""
    root = _norm(table_location) + "/"
    for p in paths:
        q = _norm(p)
        if not q.startswith(root) or "/../" in q[len(root) - 1:]:
            raise StorageError(f"table {name}: its metadata names the data file {p}, outside the table's location "
                               f"{root[:-1]}: refused")
        if "://" not in q:
            try:
                mode = os.stat(q).st_mode
            except FileNotFoundError:
                continue  # the reader's own error names it
            except OSError as e:
                raise StorageError(f"table {name}: cannot stat its data file {q}: {e.strerror}") from None
            if not stat.S_ISREG(mode):
                raise StorageError(f"table {name}: its data file {q} is not a regular file: refused")
            real = os.path.realpath(q)
            if not real.startswith(os.path.realpath(root[:-1]) + os.sep):
                raise StorageError(f"table {name}: its data file {q} resolves to {real}, outside the table's "
                                   f"location: refused")
