"""`ct-ray tables compact`: merge each partition's small data files into files of about the target size.

One commit per partition removes the old files and adds the new: readers see the old files or the new, never both,
and older snapshots still read the old files until they are expired (maintenance.py: expire, vacuum). Rounds of a
sweep cut short and older than the cutoff are repaired first (`recover`); nothing younger is touched.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import uuid
from collections import defaultdict

import pyarrow as pa

from ..errors import StorageError, one_line
from .catalog import TARGET_FILE_BYTES
from .commit import commit_files, recover
from .tablenames import human_bytes, table_names

log = logging.getLogger(__name__)

SMALL_FRACTION = 0.75  # a data file under this fraction of the target size is merged by `compact`
ROW_GROUP_BYTES = 32 * 2**20  # Arrow bytes buffered per Parquet row group while compacting


def _added_ms(t) -> dict[str, int | None]:
    """Data file path -> commit time (ms) of the snapshot that added it, for the live files of the current snapshot;
    None when that snapshot was expired."""
    from pyiceberg.manifest import ManifestContent

    ts = {s.snapshot_id: s.timestamp_ms for s in t.metadata.snapshots}
    out: dict[str, int | None] = {}
    for m in t.current_snapshot().manifests(t.io):
        if m.content != ManifestContent.DATA:
            continue
        for e in m.fetch_manifest_entry(t.io, discard_deleted=True):
            out[e.data_file.file_path] = ts.get(e.snapshot_id)
    return out


class _OutputFile:
    """An Iceberg OutputFile that keeps the stream it opens, so the writer can tell how many bytes a file has."""

    def __init__(self, out):
        self.out, self.stream = out, None
        self.location = out.location

    def create(self, overwrite: bool = False):
        self.stream = self.out.create(overwrite=overwrite)
        return self.stream

    def exists(self) -> bool:
        return self.out.exists()

    def to_input_file(self):
        return self.out.to_input_file()

    def __len__(self) -> int:
        return len(self.out)


class _RollingWriter:
    """Writes the rows of one partition as Parquet data files of about `target_bytes` on disk (the table's schema,
    Iceberg field ids, column statistics), holding at most one row group of rows in memory.

    pyiceberg's own writer (`_dataframe_to_data_files`, TableWriter) bin-packs by in-memory Arrow bytes (the
    `write.target-file-size-bytes` property), which gives files several times smaller than the target once
    compressed: a later `compact` would then find them small again. This writer rolls over to a new file when the
    bytes written reach the target, so what it writes is not merged again."""

    def __init__(self, table, partition, target_bytes: int):
        from pyiceberg.io.pyarrow import FileFormatFactory, sanitize_column_names
        from pyiceberg.manifest import FileFormat
        from pyiceberg.partitioning import PartitionFieldValue, PartitionKey
        from pyiceberg.table.locations import load_location_provider

        meta = table.metadata
        self.meta, self.io, self.partition, self.target = meta, table.io, partition, int(target_bytes)
        self.schema = meta.schema()
        self.file_schema = sanitize_column_names(self.schema)
        self.model = FileFormatFactory.get(FileFormat.PARQUET)
        self.locations = load_location_provider(table_location=meta.location, table_properties=meta.properties)
        spec = meta.spec()
        self.key = PartitionKey(field_values=[PartitionFieldValue(f, v) for f, v in zip(spec.fields, partition)],
                                partition_spec=spec, schema=self.schema)
        self.rg_bytes = max(1, min(ROW_GROUP_BYTES, self.target // 4))
        self.write_uuid, self.n = uuid.uuid4(), 0
        self.files: list = []
        self.rows_in = 0
        self._buf: list[pa.RecordBatch] = []
        self._buf_bytes = 0
        self._task_schema = None
        self._writer = self._out = None
        self._row_groups = 0  # row groups in the file being written

    def add(self, batch: pa.RecordBatch) -> None:
        """Buffer a batch, writing a row group each time about rg_bytes (Arrow) are buffered: the batch is cut in
        zero-copy slices (sizes estimated from the whole batch's bytes per row, slices' own nbytes count the
        buffers they share)."""
        n = batch.num_rows
        if not n:
            return
        self.rows_in += n
        per_row = max(batch.nbytes / n, 1e-9)
        off = 0
        while off < n:
            room = max(1, math.ceil((self.rg_bytes - self._buf_bytes) / per_row))
            piece = batch.slice(off, room)
            off += piece.num_rows
            self._buf.append(piece)
            self._buf_bytes += piece.num_rows * per_row
            if self._buf_bytes >= self.rg_bytes:
                self._write_row_group()

    def _write_row_group(self) -> None:
        from pyiceberg.io.pyarrow import _to_requested_schema, pyarrow_to_schema
        from pyiceberg.table import DOWNCAST_NS_TIMESTAMP_TO_US_ON_WRITE
        from pyiceberg.utils.config import Config

        if not self._buf:
            return
        downcast = Config().get_bool(DOWNCAST_NS_TIMESTAMP_TO_US_ON_WRITE) or False
        if self._task_schema is None:  # as pyiceberg's own writer: the batches' schema, ids by the name mapping
            self._task_schema = pyarrow_to_schema(self._buf[0].schema, name_mapping=self.schema.name_mapping,
                                                  downcast_ns_timestamp_to_us=downcast,
                                                  format_version=self.meta.format_version)
        batches = [_to_requested_schema(requested_schema=self.file_schema, file_schema=self._task_schema, batch=b,
                                        downcast_ns_timestamp_to_us=downcast, include_field_ids=True,
                                        format_model=self.model) for b in self._buf]
        self._buf, self._buf_bytes = [], 0
        if self._writer is None:
            name = f"00000-{self.n}-{self.write_uuid}.{self.model.file_extension()}"
            self.n += 1
            path = self.locations.new_data_location(data_file_name=name, partition_key=self.key)
            self._out = _OutputFile(self.io.new_output(path))
            self._writer = self.model.create_writer(self._out, self.file_schema, self.meta.properties)
            self._row_groups = 0
        self._writer.write(pa.Table.from_batches(batches))
        self._row_groups += 1
        size = self._out.stream.tell()
        # full when one more row group (of the file's average size) would overshoot the target by more than the file
        # would fall short of it
        if size + size / self._row_groups / 2 >= self.target:
            self._close_file()

    def _close_file(self) -> None:
        from pyiceberg.manifest import DataFile, DataFileContent, FileFormat

        if self._writer is None:
            return
        writer, out = self._writer, self._out
        self._writer = self._out = None
        with writer:
            pass  # closes the Parquet file (its footer) and computes the column statistics
        stats = writer.result()
        self.files.append(DataFile.from_args(
            content=DataFileContent.DATA, file_path=out.location, file_format=FileFormat.PARQUET,
            partition=self.partition, file_size_in_bytes=len(out), sort_order_id=None,
            spec_id=self.meta.default_spec_id, equality_ids=None, key_metadata=None, **stats.to_serialized_dict()))

    def finish(self) -> list:
        self._write_row_group()
        self._close_file()
        return self.files

    def abort(self) -> None:
        """Delete what was written (files never committed)."""
        paths = [f.file_path for f in self.files] + ([self._out.location] if self._out is not None else [])
        self._writer = self._out = None
        for p in paths:
            try:
                self.io.delete(p)
            except Exception:
                pass


def _task_batches(table, task):
    """The rows of one data file (row-level deletes applied, in the table's current schema), batch by batch."""
    from pyiceberg.expressions import AlwaysTrue
    from pyiceberg.io.pyarrow import ArrowScan

    scan = ArrowScan(table.metadata, table.io, table.schema(), AlwaysTrue())
    try:  # streams the file's batches (the public to_record_batches holds a whole file's batches in memory)
        from pyiceberg.io.pyarrow import _read_all_delete_files

        deletes = _read_all_delete_files(table.io, [task])
        return scan._record_batches_from_scan_tasks_and_deletes([task], deletes)
    except (ImportError, AttributeError):
        return scan.to_record_batches([task])


def key_order(table):
    """Sort key of a scan task: its file's lower bound of `key`. Workers write files sorted by key and a sweep runs
    its prompts in key order, so files merged in this order give files (and row groups) of narrow, mostly disjoint
    key ranges: a point read is pruned by their statistics without sorting a row here."""
    try:
        fid = table.schema().find_field("key").field_id
    except ValueError:
        return lambda task: b""
    return lambda task: (task.file.lower_bounds or {}).get(fid) or b""


def _rewrite(table, tasks: list, target_bytes: int) -> tuple[list, int]:
    """Write the rows of `tasks` (one partition) as new data files; returns (DataFiles, rows read)."""
    w = _RollingWriter(table, tasks[0].file.partition, target_bytes)
    try:
        for task in tasks:
            for batch in _task_batches(table, task):
                w.add(batch)
        return w.finish(), w.rows_in
    except BaseException:
        w.abort()
        raise


def _delete_files(t, files) -> None:
    """Best effort: files written by a compaction that is not committed (vacuum takes any left)."""
    for f in files:
        try:
            t.io.delete(f.file_path)
        except Exception:
            pass


def compact(store, tables=None, target_bytes: int = TARGET_FILE_BYTES, older_than_s: float = 3600.0,
            progress: bool = False) -> dict:
    """Merge each partition's small data files (under 3/4 of `target_bytes`, added by a snapshot older than
    `older_than_s`) into files of about `target_bytes`, one atomic commit per partition (old files out, new in).
    A file with row-level deletes (written by another engine) is rewritten with the deletes applied.

    First repairs the rounds cut short older than `older_than_s` (`recover`). Returns counts: `partitions`
    compacted, `files_before`/`bytes_before` (the files merged), `files_after`/`bytes_after` (the files written),
    `rows` (rewritten, unchanged), `recovered` (files of cut rounds removed) and `failed` (partitions whose commit
    lost to a concurrent change: 'table/partition: reason'; their new files are left to `vacuum`)."""
    if target_bytes < 1:
        raise ValueError(f"target_bytes must be positive, got {target_bytes}")
    if older_than_s < 0 or math.isnan(older_than_s):
        raise ValueError(f"older_than_s must be 0 or more, got {older_than_s}")
    names = table_names(tables)
    # The cutoff is taken before `recover` runs: every file old enough to be merged was then old enough for recover
    # to judge, so no file of a round cut short is merged (a merged file no longer belongs to its round's snapshot,
    # and recover could never remove it).
    cutoff_ms = (time.time() - older_than_s) * 1000
    out = {"tables": 0, "partitions": 0, "files_before": 0, "files_after": 0, "bytes_before": 0, "bytes_after": 0,
           "rows": 0, "recovered": recover(store, older_than_s=older_than_s), "failed": []}
    small = target_bytes * SMALL_FRACTION
    for name in names:
        t = store.existing_table(name)
        if t is None or t.current_snapshot() is None:
            continue
        out["tables"] += 1
        try:
            added = _added_ms(t)
            tasks = list(t.scan().plan_files())
        except Exception as e:
            raise StorageError(f"cannot read table {name} of {store.url}: {one_line(e)}") from e
        by_part: dict[tuple, list] = defaultdict(list)
        for task in tasks:
            if task.file.spec_id == t.metadata.default_spec_id:
                by_part[tuple(task.file.partition)].append(task)

        # A file's age is the commit time of the snapshot that added it (its manifest entry's snapshot_id), not the
        # file's modification time: a worker writes a file well before the driver commits it, so a file can be old
        # while its round is still between the nodes/edges and the graphs commit. A file whose adding snapshot was
        # expired is old: `expire` drops nothing younger than an hour and repairs the cut rounds it would hide first.
        old = {p for p, ms in added.items() if ms is None or ms < cutoff_ms}
        for part, ptasks in sorted(by_part.items(), key=lambda kv: str(kv[0])):
            pick = [task for task in ptasks
                    if (task.file.file_size_in_bytes < small or task.delete_files) and task.file.file_path in old]
            deletes = any(task.delete_files for task in pick)
            if len(pick) < 2 and not deletes:
                continue
            pick.sort(key=key_order(t))
            label = f"{name}/{'/'.join(str(v) for v in part)}"
            try:
                new, rows = _rewrite(t, pick, target_bytes)
            except StorageError:
                raise
            except Exception as e:
                raise StorageError(f"cannot compact {label} of {store.url}: {one_line(e)}") from e
            before = sum(task.file.record_count for task in pick)
            written = sum(f.record_count for f in new)
            if written != rows or (not deletes and rows != before):
                _delete_files(t, new)
                raise StorageError(f"compacting {label}: {before} rows in the old files, {rows} read, {written} "
                                   f"written: nothing committed")
            try:
                commit_files(store, name, new, {"ct-ray.compact": "/".join(str(v) for v in part)},
                             delete=[task.file for task in pick])
            except StorageError as e:
                log.warning("compact %s: not committed (%s)", label, e)
                out["failed"].append(f"{label}: {e}")
                continue
            out["partitions"] += 1
            out["files_before"] += len(pick)
            out["files_after"] += len(new)
            out["bytes_before"] += sum(task.file.file_size_in_bytes for task in pick)
            out["bytes_after"] += sum(f.file_size_in_bytes for f in new)
            out["rows"] += rows
            if progress:
                print(f"compacted {label}: {len(pick)} files ({human_bytes(sum(x.file.file_size_in_bytes for x in pick))}) "
                      f"-> {len(new)} ({human_bytes(sum(f.file_size_in_bytes for f in new))}), {rows} rows",
                      file=sys.stderr, flush=True)
    return out
