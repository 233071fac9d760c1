"""Maintenance of the result tables (`ct-ray tables compact|expire|vacuum|list`): merging small data files, dropping
old snapshots, deleting files no snapshot names.

- `compact` merges a partition's small data files (under 3/4 of the 128 MB target) into files of about the target
  size, in ONE commit per partition that removes the old files and adds the new: readers see the old files or the
  new, never both, and older snapshots still read the old files until they are expired.
- `expire` drops snapshots older than a cutoff (never the current one, never younger than an hour). It deletes no
  file: `vacuum` does.
- `vacuum` deletes the files under a table's location (`data/`, `metadata/`) that nothing the table still holds
  names (its retained snapshots, their manifest lists and manifests, its metadata files, its statistics files) and
  that are older than a grace period: data files of workers that died before their report, files of expired
  snapshots, leftovers of failed commits.

All three respect the commit protocol of commit.py: a round of a sweep commits `nodes`/`edges` first and `graphs`
after, so a round younger than the grace period may be a live driver's, between its two commits. `compact` and
`expire` first repair rounds cut short (`recover`) that are older than their cutoff, and touch nothing younger.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import uuid
from collections import defaultdict
from datetime import datetime, timezone

import pyarrow as pa

from ..errors import StorageError, one_line
from .catalog import TARGET_FILE_BYTES
from .commit import commit_files, recover
from .schemas import TABLE_NAMES

log = logging.getLogger(__name__)

MIN_EXPIRE_AGE_S = 3600.0  # the youngest snapshot `expire` may drop: a live sweep's round must outlive it
SMALL_FRACTION = 0.75  # a data file under this fraction of the target size is merged by `compact`
ROW_GROUP_BYTES = 32 * 2**20  # Arrow bytes buffered per Parquet row group while compacting
EXPIRE_ORDER = ("nodes", "edges", "perturbations", "features", "train_metrics", "graphs")  # graphs last (recover)
_METADATA_SUFFIXES = (".metadata.json", ".avro", ".puffin", ".stats")  # what Iceberg writes under metadata/
_COMMIT_RETRIES = 5


def _names(tables, order=TABLE_NAMES) -> list[str]:
    """The tables asked for (names, or one comma-separated string), in `order`; a one-line ValueError if unknown."""
    if tables is None:
        return list(order)
    if isinstance(tables, str):
        tables = [tables]
    want = {n.strip() for t in tables for n in str(t).split(",") if n.strip()}
    unknown = sorted(want - set(TABLE_NAMES))
    if unknown:
        raise ValueError(f"unknown table(s) {', '.join(unknown)}: the tables are {', '.join(TABLE_NAMES)}")
    return [n for n in order if n in want]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


# --- list ----------------------------------------------------------------------------------------------------------
def table_stats(store, tables=None) -> list[dict]:
    """Per table: snapshots, live data files, rows, bytes, partitions and row-level delete files of its current
    snapshot (from its metadata only). Tables the catalog does not have yet show `exists: False` and zeros."""
    out = []
    for name in _names(tables):
        t = store.existing_table(name)
        row = {"table": name, "exists": t is not None, "snapshots": 0, "files": 0, "rows": 0, "bytes": 0,
               "partitions": 0, "delete_files": 0}
        if t is not None:
            row["snapshots"] = len(t.metadata.snapshots)
            if t.current_snapshot() is not None:
                try:
                    tasks = list(t.scan().plan_files())
                except Exception as e:
                    raise StorageError(f"cannot read table {name} of {store.url}: {one_line(e)}") from e
                row["files"] = len(tasks)
                row["rows"] = sum(task.file.record_count for task in tasks)
                row["bytes"] = sum(task.file.file_size_in_bytes for task in tasks)
                row["partitions"] = len({tuple(task.file.partition) for task in tasks})
                row["delete_files"] = len({d.file_path for task in tasks for d in task.delete_files})
        out.append(row)
    return out


# --- compact -------------------------------------------------------------------------------------------------------
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
    names = _names(tables)
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


def _delete_files(t, files) -> None:
    for f in files:
        try:
            t.io.delete(f.file_path)
        except Exception:
            pass


# --- expire --------------------------------------------------------------------------------------------------------
def _fmt_age(s: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n and s % n == 0:
            return f"{int(s // n)}{unit}"
    return f"{s:g}s"


def _expire_cutoff(meta, cutoff_ms: float, retain_last: int) -> float:
    """The expiry cutoff (ms), moved back so that the `retain_last` newest snapshots of the current lineage stay."""
    ancestors, sid = [], meta.current_snapshot_id
    by_id = {s.snapshot_id: s for s in meta.snapshots}
    while sid is not None and sid in by_id and len(ancestors) < retain_last:
        ancestors.append(by_id[sid])
        sid = by_id[sid].parent_snapshot_id
    return min([cutoff_ms] + [s.timestamp_ms for s in ancestors])


def expire(store, older_than_s: float = 7 * 86400, retain_last: int = 1, tables=None, *,
           _floor_s: float = MIN_EXPIRE_AGE_S) -> dict:
    """Drop the snapshots older than `older_than_s` of each table (`nodes`, `edges`, `perturbations` before `graphs`),
    keeping the `retain_last` newest of the current lineage (the current one always). No file is deleted (`vacuum`
    deletes those no snapshot names any more). A cutoff under an hour is refused: a sweep's round is between two
    commits for a moment, and `recover` needs the snapshots of a round cut short. First repairs the rounds cut
    short older than the cutoff (`recover`), whose files would otherwise stay once their snapshot is gone.

    Returns counts: `tables`, `snapshots_before`, `expired`, `snapshots_after`, `recovered`."""
    if math.isnan(older_than_s) or older_than_s < _floor_s:
        asked = _fmt_age(max(older_than_s, 0)) if not math.isnan(older_than_s) else "nan"
        raise ValueError(f"refusing to expire snapshots younger than {_fmt_age(_floor_s)} (asked {asked}): a running "
                         f"sweep's commit round needs its snapshots")
    if retain_last < 1:
        raise ValueError(f"retain_last must be at least 1 (the current snapshot), got {retain_last}")
    names = _names(tables, order=EXPIRE_ORDER)
    cutoff_ms = (time.time() - older_than_s) * 1000  # before recover: it sees every round expire may drop
    out = {"tables": 0, "snapshots_before": 0, "expired": 0, "snapshots_after": 0,
           "recovered": recover(store, older_than_s=max(older_than_s, _floor_s))}
    from pyiceberg.exceptions import CommitFailedException

    for name in names:
        t = store.existing_table(name)
        if t is None:
            continue
        out["tables"] += 1
        n0 = len(t.metadata.snapshots)
        for attempt in range(_COMMIT_RETRIES):
            cut = _expire_cutoff(t.metadata, cutoff_ms, retain_last)
            protected = {r.snapshot_id for r in t.metadata.refs.values()}
            old = [s for s in t.metadata.snapshots if s.timestamp_ms < cut and s.snapshot_id not in protected]
            if not old:
                break
            try:
                t.maintenance.expire_snapshots().older_than(datetime.fromtimestamp(cut / 1000, tz=timezone.utc)).commit()
                break
            except CommitFailedException as e:  # another commit landed meanwhile: plan again on the new metadata
                if attempt == _COMMIT_RETRIES - 1:
                    raise StorageError(f"cannot expire snapshots of table {name} of {store.url}: {one_line(e)}") from e
                time.sleep(0.1 * 2**attempt)
                t = t.refresh()
            except Exception as e:
                raise StorageError(f"cannot expire snapshots of table {name} of {store.url}: {one_line(e)}") from e
        t = store.existing_table(name)
        n1 = len(t.metadata.snapshots)
        out["snapshots_before"] += n0
        out["snapshots_after"] += n1
        out["expired"] += max(n0 - n1, 0)
    return out


# --- vacuum --------------------------------------------------------------------------------------------------------
def _mtime(fs, path: str, info: dict) -> float | None:
    """Modification time (epoch s) of a listed file, None when unknown (then it is never deleted)."""
    for k in ("mtime", "LastModified", "last_modified", "updated", "modified"):
        v = info.get(k)
        if v is None:
            continue
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, datetime):
            return (v if v.tzinfo else v.replace(tzinfo=timezone.utc)).timestamp()
        try:
            return datetime.fromisoformat(str(v).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
    try:
        v = fs.modified(path)
        return (v if v.tzinfo else v.replace(tzinfo=timezone.utc)).timestamp()
    except Exception:
        return None


def _referenced(t) -> set[str]:
    """Every file the table's metadata names: the current metadata file and those of its log, statistics files,
    and for each retained snapshot its manifest list, manifests and their live data and delete files."""
    md = t.metadata
    refs = {t.metadata_location} | {e.metadata_file for e in md.metadata_log}
    refs |= {s.statistics_path for s in md.statistics} | {s.statistics_path for s in md.partition_statistics}
    seen: set[str] = set()
    for snap in md.snapshots:
        refs.add(snap.manifest_list)
        for m in snap.manifests(t.io):
            if m.manifest_path in seen:
                continue
            seen.add(m.manifest_path)
            refs.add(m.manifest_path)
            # DELETED entries record what the snapshot removed: readers of a retained snapshot never read them
            # (a retained parent that still holds such a file names it as a live entry of its own manifests)
            for e in m.fetch_manifest_entry(t.io, discard_deleted=True):
                refs.add(e.data_file.file_path)
    return refs


def _list(fs, local: bool, path: str) -> dict[str, dict]:
    try:
        if not local:
            fs.invalidate_cache(path)
        if not fs.exists(path):
            return {}
        found = fs.find(path, detail=True)
    except FileNotFoundError:
        return {}
    return {p: info for p, info in found.items() if info.get("type", "file") != "directory"}


def _plan_vacuum(store, name: str, cutoff_s: float) -> list[tuple[str, int]]:
    """(path, bytes) of the orphan files of one table, or a one-line StorageError when it cannot tell safely."""
    fs, local = store.fs, store.local
    strip = type(fs)._strip_protocol
    t = store.existing_table(name)
    if t is None:
        return []
    root = strip(t.metadata.location).rstrip("/")
    if root != strip(store.table_location(name)).rstrip("/"):
        raise StorageError(f"table {name} lives at {t.metadata.location}, not under {store.url}: vacuum it with "
                           f"--store naming that location")
    # list first, then read the metadata: a file committed meanwhile is in the (newer) metadata, a file written
    # after the listing is not a candidate
    listed = {**_list(fs, local, f"{root}/data"), **_list(fs, local, f"{root}/metadata")}
    t = store.existing_table(name)
    try:
        refs = {strip(r).rstrip("/") for r in _referenced(t)}
    except Exception as e:  # a manifest that cannot be read: then nobody can tell what is referenced
        raise StorageError(f"cannot read the metadata of table {name} of {store.url} (nothing deleted): "
                           f"{one_line(e)}") from e
    orphans = []
    for path, info in sorted(listed.items()):
        p = strip(path).rstrip("/")
        if p in refs or not p.startswith(root + "/"):
            continue
        rel = p[len(root) + 1:]
        if not (rel.startswith("data/") or rel.startswith("metadata/") and rel.endswith(_METADATA_SUFFIXES)):
            continue
        if rel.endswith(".metadata.json"):
            _check_same_table(fs, name, t, p)
        m = _mtime(fs, path, info)
        if m is None or m >= cutoff_s:
            continue
        orphans.append((path, int(info.get("size") or 0)))
    return orphans


def _check_same_table(fs, name: str, t, path: str) -> None:
    """A metadata file of another table (another catalog created a table at this location): its files would look
    like orphans here. Refuse, rather than delete another catalog's rows."""
    try:
        with fs.open(path, "rb") as f:
            other = json.loads(f.read()).get("table-uuid")
    except Exception:
        return  # unreadable: a torn write of a failed commit of this table
    if other and str(other) != str(t.metadata.table_uuid):
        raise StorageError(f"table {name}: {path} is the metadata of another table (uuid {other}) at the same location,"
                           f" written through another catalog: nothing deleted; vacuum with that catalog, or remove "
                           f"that table's files")


def vacuum(store, older_than_s: float = 3 * 86400, dry_run: bool = False, tables=None) -> dict:
    """Delete the orphan files under each table's location (`data/`, `metadata/`): those no retained snapshot,
    manifest list, manifest, metadata file (current and its log) or statistics file names, last modified more than
    `older_than_s` ago. Every table is checked before anything is deleted. Nothing outside the tables' locations is
    touched. Returns `tables`, `files` and `bytes` removed (or that would be, with `dry_run`), `paths` and `dry_run`."""
    if older_than_s < 0 or math.isnan(older_than_s):
        raise ValueError(f"older_than_s must be 0 or more, got {older_than_s}")
    cutoff_s = time.time() - older_than_s
    plans = {}
    for name in _names(tables):
        try:
            plans[name] = _plan_vacuum(store, name, cutoff_s)
        except StorageError:
            raise
        except Exception as e:
            raise StorageError(f"cannot list the files of table {name} of {store.url}: {one_line(e)}") from e
    out = {"tables": len(plans), "files": 0, "bytes": 0, "paths": [], "dry_run": bool(dry_run),
           "per_table": {n: len(p) for n, p in plans.items()}}
    fs = store.fs
    for name, orphans in plans.items():
        paths = [p for p, _ in orphans]
        if paths and not dry_run:
            try:
                if store.local:
                    for p in paths:
                        try:
                            fs.rm_file(p)
                        except FileNotFoundError:
                            pass
                else:
                    for i in range(0, len(paths), 1000):
                        fs.rm(paths[i:i + 1000])
            except Exception as e:
                raise StorageError(f"cannot delete orphan files of table {name} of {store.url}: {one_line(e)}") from e
            log.info("vacuum %s: removed %d file(s)", name, len(paths))
        out["files"] += len(paths)
        out["bytes"] += sum(b for _, b in orphans)
        out["paths"] += [p if store.local else f"{store.url.split('://', 1)[0]}://{p}" for p in paths]
    return out
