"""A sweep partition's rows of one table, read data file by data file for the keys asked (export, analysis).

Reading a sweep batch by batch through `Store.read(keys=...)` would plan the partition once per batch (and files of
older stores, not sorted by key, are read whole). Instead the files are planned once, each file's `key` column says
which keys it holds, and a file is read only when keys it holds are asked for (a key's rows are written by one
worker flush, so they usually sit in one file). `subset` keeps only what some keys need and
pickles without the catalog, so a Ray task can read its share of a sweep on its own.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..errors import StorageError, one_line
from .confine import check_data_files
from .schemas import SCHEMAS, empty_table


def by_key(t: pa.Table) -> dict[str, pa.Table]:
    """{key: its rows} of a table with a `key` column (one sort, zero-copy slices)."""
    if not t.num_rows:
        return {}
    t = t.sort_by("key")
    keys = t.column("key").to_numpy(zero_copy_only=False)
    uniq, start = np.unique(keys, return_index=True)
    ends = list(start[1:]) + [t.num_rows]
    return {k: t.slice(s, e - s) for k, s, e in zip(uniq.tolist(), start.tolist(), ends)}


class KeyedRows:
    """The data files of table `name`'s partition `sweep_id`, with the keys each holds (only `keys`, if given)."""

    def __init__(self, store, name: str, sweep_id: str, keys: set[str] | None = None):
        from pyiceberg.expressions import AlwaysTrue, EqualTo
        from pyiceberg.io.pyarrow import ArrowScan

        self.name, self.url = name, store.url
        self.tasks: list = []
        self.files_of: dict[str, list[int]] = {}
        self.metadata_json, self.io_props = None, store.io_properties()
        self._meta = self._io = None
        table = store.existing_table(name)
        if table is None or table.current_snapshot() is None:
            return
        self.metadata_json, self._meta, self._io = table.metadata.model_dump_json(), table.metadata, table.io
        try:
            self.tasks = store.visible(name, table, table.scan(row_filter=EqualTo("sweep_id", sweep_id)).plan_files(),
                                       sweep_id)
            check_data_files(name, table.metadata.location, (t.file.file_path for t in self.tasks))
            scan = ArrowScan(table.metadata, table.io, table.schema().select("key"), AlwaysTrue())
            for i, task in enumerate(self.tasks):
                held = self._file_keys(task) if not task.delete_files else \
                    scan.to_table([task]).column("key").unique().to_pylist()
                for k in held:
                    if keys is None or k in keys:
                        self.files_of.setdefault(k, []).append(i)
        except StorageError:
            raise
        except Exception as e:
            raise StorageError(f"cannot read table {name} of {store.url}: {one_line(e)}") from e

    def _open(self, task):
        import pyarrow.parquet as pq

        _, io = self._scan_parts()
        # the key column dictionary-encoded: a file's keys are its dictionaries, no string per row is decoded
        return pq.ParquetFile(io.new_input(task.file.file_path).open(), read_dictionary=["key"])

    def _file_keys(self, task) -> list[str]:
        import pyarrow.compute as pc

        out: set[str] = set()
        for ch in self._open(task).read(columns=["key"]).column("key").chunks:
            out.update(ch.dictionary.take(pc.unique(ch.indices)).to_pylist())
        return sorted(out)

    def __getstate__(self):
        return {**self.__dict__, "_meta": None, "_io": None}

    def _scan_parts(self):
        if self._meta is None:
            from pyiceberg.io import load_file_io
            from pyiceberg.table.metadata import TableMetadataUtil

            self._meta = TableMetadataUtil.parse_raw(self.metadata_json)
            self._io = load_file_io(properties=self.io_props, location=self._meta.location)
        return self._meta, self._io

    @property
    def keys(self) -> list[str]:
        return list(self.files_of)

    def first_file(self, key: str) -> int:
        """The index of the first data file holding `key` (-1: none): keys sharing it are best read together."""
        return min(self.files_of.get(key, [-1]))

    def subset(self, keys) -> KeyedRows:
        """What reading `keys` needs and nothing else (small enough to ship to a Ray task)."""
        want = sorted({i for k in keys for i in self.files_of.get(k, [])})
        new = {i: j for j, i in enumerate(want)}
        out = object.__new__(KeyedRows)
        out.__dict__.update(self.__getstate__())
        out.tasks = [self.tasks[i] for i in want]
        out.files_of = {k: [new[i] for i in self.files_of[k]] for k in keys if k in self.files_of}
        return out

    def read(self, keys: list[str], columns: list[str]) -> dict[str, pa.Table]:
        """{key: its rows} of `keys`, reading only the files that hold them; columns the files lack read as null."""
        return by_key(self.read_table(keys, columns))

    def read_table(self, keys: list[str], columns: list[str]) -> pa.Table:
        """The rows of `keys` as one table (files in plan order, each file's rows in file order)."""
        import pyarrow.compute as pc

        schema = pa.schema([SCHEMAS[self.name].field(c) for c in columns])
        tasks = sorted({i for k in keys for i in self.files_of.get(k, [])})
        want = pa.array(sorted(set(keys)), pa.string())
        parts = []
        try:
            for i in tasks:
                task = self.tasks[i]
                if task.delete_files:  # another engine's row deletes: pyiceberg applies them
                    parts.append(as_schema(self._scan_read(task, keys, columns), schema))
                    continue
                pf = self._open(task)
                have = set(pf.schema_arrow.names)
                t = pf.read(columns=[c for c in columns if c in have])
                t = t.filter(pc.is_in(t.column("key"), value_set=want))
                parts.append(as_schema(t, schema))
        except StorageError:
            raise
        except Exception as e:
            raise StorageError(f"cannot read table {self.name} of {self.url}: {one_line(e)}") from e
        return pa.concat_tables(parts) if parts else empty_table(schema)

    def _scan_read(self, task, keys: list[str], columns: list[str]) -> pa.Table:
        from pyiceberg.expressions import In
        from pyiceberg.io.pyarrow import ArrowScan

        meta, io = self._scan_parts()
        have = {f.name for f in meta.schema().fields}
        return ArrowScan(meta, io, meta.schema().select(*[c for c in columns if c in have]),
                         In("key", list(keys))).to_table([task])


def as_schema(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """`t`'s columns cast to `schema`; columns a file lacks (an older schema version) as nulls."""
    return pa.Table.from_arrays([t.column(f.name).cast(f.type) if f.name in t.column_names
                                 else pa.nulls(t.num_rows, f.type) for f in schema], schema=schema)
