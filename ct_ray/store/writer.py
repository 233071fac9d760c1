"""Writing data files of the Iceberg tables where the rows are made (workers), without touching the catalog.

A worker gets each table's metadata from the driver once (`Store.writer_config`), buffers rows, and writes them as
a few large Parquet data files (Iceberg field ids, column statistics) when its buffer is full or the driver asks.
It reports the files (`DataFile` records, small) with the keys they hold; only the driver's commit makes them
visible. Files of a worker that dies before its report are never committed: `ct-ray tables vacuum` removes them.
"""

from __future__ import annotations

import pyarrow as pa

from ..errors import StorageError, one_line
from .schemas import SWEEP_TABLES, conform

FLUSH_BYTES = 64 * 2**20  # Arrow bytes buffered per table before a worker writes a data file on its own


class TableWriter:
    """Writes rows of one table as Iceberg data files (partitioned like the table), from its metadata alone."""

    def __init__(self, config: dict):
        from pyiceberg.io import load_file_io
        from pyiceberg.table.metadata import TableMetadataUtil

        self.name = config["name"]
        self.metadata = TableMetadataUtil.parse_raw(config["metadata"])
        self.io = load_file_io(properties=config["io"], location=self.metadata.location)

    def write(self, rows: pa.Table, partition: str | None = None) -> list:
        """Data files of `rows`; `partition`: the value every row has in the table's (identity) partition column,
        which spares splitting the rows by partition (a filter pass over them per file written)."""
        from pyiceberg.io.pyarrow import _dataframe_to_data_files

        if not rows.num_rows:
            return []
        try:
            if partition is not None and self._one_field():
                return list(self._write_partition(rows, partition))
            return list(_dataframe_to_data_files(self.metadata, rows, self.io))
        except Exception as e:
            msg = one_line(e, 300)
            raise StorageError(f"cannot write a data file of {self.name} under {self.metadata.location}: {msg}") from e

    def _one_field(self) -> bool:
        from pyiceberg.transforms import IdentityTransform

        fields = self.metadata.spec().fields
        return len(fields) == 1 and isinstance(fields[0].transform, IdentityTransform)

    def _write_partition(self, rows: pa.Table, value: str):
        """pyiceberg's writer (field ids, statistics, target size) for rows of one partition."""
        import itertools
        import uuid

        from pyiceberg.io.pyarrow import bin_pack_arrow_table, pyarrow_to_schema, write_file
        from pyiceberg.partitioning import PartitionFieldValue, PartitionKey
        from pyiceberg.table import DOWNCAST_NS_TIMESTAMP_TO_US_ON_WRITE, TableProperties, WriteTask
        from pyiceberg.utils.config import Config
        from pyiceberg.utils.properties import property_as_int

        meta, spec = self.metadata, self.metadata.spec()
        schema = meta.schema()
        target = property_as_int(meta.properties, TableProperties.WRITE_TARGET_FILE_SIZE_BYTES,
                                 TableProperties.WRITE_TARGET_FILE_SIZE_BYTES_DEFAULT)
        task_schema = pyarrow_to_schema(rows.schema, name_mapping=schema.name_mapping,
                                        downcast_ns_timestamp_to_us=Config().get_bool(DOWNCAST_NS_TIMESTAMP_TO_US_ON_WRITE)
                                        or False, format_version=meta.format_version)
        key = PartitionKey(field_values=[PartitionFieldValue(field=spec.fields[0], value=value)], partition_spec=spec,
                           schema=schema)
        write_uuid, counter = uuid.uuid4(), itertools.count(0)
        return write_file(self.io, meta, (
            WriteTask(write_uuid=write_uuid, task_id=next(counter), record_batches=batches, partition_key=key,
                      schema=task_schema)
            for batches in bin_pack_arrow_table(rows.combine_chunks(), target)))


def sorted_by_key(parts: list[pa.Table]) -> pa.Table:
    """The parts as one table sorted by `key` (stable: a key's rows keep their order), so a data file's row groups
    hold narrow key ranges and a point read skips the others by their statistics. Parts of one key each (what a
    worker adds per prompt) are ordered whole, without sorting rows."""
    import pyarrow.compute as pc

    if not parts or "key" not in parts[0].column_names:
        return pa.concat_tables(parts)
    ranges = [pc.min_max(p.column("key")) for p in parts]
    if all(r["min"] == r["max"] for r in ranges):
        order = sorted(range(len(parts)), key=lambda i: ranges[i]["min"].as_py() or "")
        return pa.concat_tables([parts[i] for i in order])
    return pa.concat_tables(parts).sort_by("key")


class RowBuffer:
    """A sweep worker's rows not yet reported to the driver, per table, with the keys they complete.

    `add` buffers conformed rows (a table's buffer past FLUSH_BYTES is written out at once, keeping memory bounded);
    `flush` writes what is left and hands over every file written since the last flush with its keys."""

    def __init__(self, configs: dict[str, dict], partition: str, flush_bytes: int = FLUSH_BYTES):
        self.writers = {name: TableWriter(cfg) for name, cfg in configs.items()}
        self.partition, self.flush_bytes = partition, flush_bytes
        self.rows: dict[str, list[pa.Table]] = {t: [] for t in configs}
        self.nbytes: dict[str, int] = dict.fromkeys(configs, 0)
        self.files: dict[str, list] = {t: [] for t in configs}
        self.done: dict[str, list[str]] = {"prompts": [], "perturbations": [], "ok": []}
        self.round_bytes = 0  # Arrow bytes added since the last flush (the driver sizes its commit rounds by them)

    def add(self, name: str, rows: pa.Table | list[dict]) -> None:
        t = conform(rows, name, self.partition)
        self.rows[name].append(t)
        self.nbytes[name] += t.nbytes
        self.round_bytes += t.nbytes
        if self.nbytes[name] >= self.flush_bytes:
            self._write(name)

    def finish(self, kind: str, key: str, ok: bool = False) -> None:
        """The rows of `key` for `kind` ('prompts' | 'perturbations') are all in the buffer; `ok`: a graph's rows
        (nodes and edges), not an error row."""
        self.done[kind].append(key)
        if ok:
            self.done["ok"].append(key)

    @property
    def pending(self) -> int:
        return len(self.done["prompts"]) + len(self.done["perturbations"])

    def _write(self, name: str) -> None:
        parts, self.rows[name], self.nbytes[name] = self.rows[name], [], 0
        if parts:
            self.files[name] += self.writers[name].write(sorted_by_key(parts), self.partition)

    def flush(self) -> dict:
        """Write every buffered row; return {'files': {table: [DataFile]}, 'prompts': keys, 'perturbations': keys}."""
        for name in self.rows:
            self._write(name)
        out = {"files": {t: f for t, f in self.files.items() if f}, **self.done}
        self.files = {t: [] for t in self.files}
        self.done = {"prompts": [], "perturbations": [], "ok": []}
        self.round_bytes = 0
        return out


def sweep_writer_configs(store) -> dict[str, dict]:
    """The writer configs of the four sweep tables (created in the catalog if missing)."""
    return {t: store.writer_config(t) for t in SWEEP_TABLES}
