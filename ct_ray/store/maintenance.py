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
import time
from datetime import datetime, timezone

from ..errors import StorageError, one_line
from .commit import recover
from .compact import compact  # noqa: F401  (the maintenance commands in one place)
from .tablenames import human_bytes, table_names  # noqa: F401

log = logging.getLogger(__name__)

MIN_EXPIRE_AGE_S = 3600.0  # the youngest snapshot `expire` may drop: a live sweep's round must outlive it
# graphs last (recover)
EXPIRE_ORDER = ("nodes", "edges", "edge_heads", "qk_attributions", "perturbations", "features", "train_metrics", "graphs")
_METADATA_SUFFIXES = (".metadata.json", ".avro", ".puffin", ".stats")  # what Iceberg writes under metadata/
_COMMIT_RETRIES = 5


# --- list ----------------------------------------------------------------------------------------------------------
def table_stats(store, tables=None) -> list[dict]:
    """Per table: snapshots, live data files, rows, bytes, partitions and row-level delete files of its current
    snapshot (from its metadata only). Tables the catalog does not have yet show `exists: False` and zeros."""
    out = []
    for name in table_names(tables):
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
    names = table_names(tables, order=EXPIRE_ORDER)
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
    for name in table_names(tables):
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
