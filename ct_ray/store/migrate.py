"""Importing a store of the old per-file layout (one Parquet file per prompt and table, hive directories) into the
Iceberg tables.

The old layout, under a store root:

    {root}/graphs/sweep_id={id}/{key}.parquet                  one row per prompt: the commit record of the key
    {root}/nodes/sweep_id={id}/{key}.parquet                   the prompt's graph nodes
    {root}/edges/sweep_id={id}/{key}.parquet                   the prompt's graph edges
    {root}/perturbations/sweep_id={id}/{key}.{plan}[.{chunk}].parquet
    {root}/features/clt_id={cid}/{job}.{layer}.parquet         feature dashboards, per features job
    {root}/_features/{cid}/job.json                            the commit record: the CLT's current job
    {root}/tables/train_metrics/run={run}/part-0.parquet       a training run's metrics (written whole)

Only what the old readers showed is imported: the graphs rows; the nodes, edges and perturbations of keys whose
graphs row is 'ok' (files of keys without a graphs row belong to attempts that never committed; a key with an
error row has no graph: its stray files are of a dead attempt and would duplicate the rows of a later retry); the
features of the job named in job.json (files of other jobs were being replaced); train_metrics as they are.

Sweep rows go through the sweep's commit protocol (commit.Committer): per round of `batch_prompts` keys, the rows
are written as data files (writer.RowBuffer, bounded memory) and committed nodes, edges, graphs, perturbations, so an
import cut short is finished (and its half-committed round repaired by `recover`) by running it again. Features and
train_metrics are committed per partition, replacing it whole.

Idempotent: keys already in the Iceberg graphs table (imported before, or swept again since) are skipped, and so
are features/train_metrics partitions the tables already hold. The old files are not deleted (`remove_old=True`
removes the old table directories once everything is imported); the Iceberg tables live apart from them
(`{root}/warehouse/`, `{root}/catalog.db`), so both coexist. Do not import into a sweep id that a sweep is
running at the same time (the import repairs interrupted rounds of the sweeps it imports).
"""

from __future__ import annotations

import logging
import sys
import time

import pyarrow as pa

from ..errors import StorageError, one_line
from .commit import Committer, commit_files, live_files, recover, replace_partition
from .fs import filesystem, is_local
from .names import check_name
from .schemas import PARTITIONS, SCHEMAS, SWEEP_TABLES, conform
from .writer import FLUSH_BYTES, RowBuffer, TableWriter, sweep_writer_configs

log = logging.getLogger(__name__)

FEATURES_DIR = "_features"
SWEEPS_DIR = "_sweeps"
LEGACY_TABLES = ("graphs", "nodes", "edges", "perturbations", "features", "train_metrics")  # what the old layout had
METRICS_DIR = "tables/train_metrics"  # where the old `train` wrote its metrics table by default
LEGACY_SCHEMA_VERSION = 1  # the per-file layout's rows: version 1 of the table schemas
_READ_ROWS = 1 << 16  # rows gathered from the old files before they are handed to a writer


class _Legacy:
    """Read access to an old-layout store root."""

    def __init__(self, fs, root: str, url: str):
        self.fs, self.root, self.url = fs, root.rstrip("/"), url.rstrip("/")
        self.local = is_local(fs)

    def _ls(self, path: str) -> list[str]:
        try:
            if not self.local:
                self.fs.invalidate_cache(path)
            if not self.fs.exists(path):
                return []
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []
        except Exception as e:
            raise StorageError(f"cannot list {self.url_of(path)}: {one_line(e)}") from e

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, path: str) -> str:
        return path if self.local else f"{self.url.split('://', 1)[0]}://{path}"

    def partitions(self, rel: str, col: str) -> list[str]:
        """Values of the hive partitions `{rel}/{col}=*`."""
        return [b.split("=", 1)[1] for b in self._ls(self.path(rel)) if b.startswith(f"{col}=")]

    def names(self, rel: str) -> list[str]:
        """Committed file names (without .parquet) in a directory: hidden temporary files are skipped."""
        return [b[: -len(".parquet")] for b in self._ls(self.path(rel))
                if b.endswith(".parquet") and not b.startswith(".")]

    def batches(self, rel: str, names: list[str], schema: pa.Schema, max_rows: int = _READ_ROWS):
        """The rows of files `rel/{name}.parquet`, as tables of about `max_rows` rows (bounded memory). Columns the
        files lack (older schema versions) read as null."""
        import pyarrow.dataset as pads

        if not names:
            return
        paths = [f"{self.root}/{rel}/{n}.parquet" for n in names]
        try:
            ds = pads.dataset(paths, format="parquet", schema=schema, filesystem=None if self.local else self.fs)
            acc, n = [], 0
            for b in ds.to_batches(batch_size=max_rows):
                if b.num_rows:
                    acc.append(b)
                    n += b.num_rows
                if n >= max_rows:
                    yield pa.Table.from_batches(acc, schema=schema)
                    acc, n = [], 0
            if acc:
                yield pa.Table.from_batches(acc, schema=schema)
        except StorageError:
            raise
        except Exception as e:
            raise StorageError(f"cannot read the old files under {self.url_of(f'{self.root}/{rel}')}: "
                               f"{one_line(e)}") from e

    def read_bytes(self, rel: str) -> bytes | None:
        path = self.path(rel)
        try:
            with self.fs.open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except Exception as e:
            raise StorageError(f"cannot read {self.url_of(path)}: {one_line(e)}") from e

    def rm_dir(self, rel: str) -> None:
        path = self.path(rel)
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except Exception as e:
            raise StorageError(f"cannot remove {self.url_of(path)}: {one_line(e)}") from e


def _file_schema(name: str) -> pa.Schema:
    """What the old files of a table hold: the table's columns without the partition column (it was in the path)."""
    part = PARTITIONS[name]
    return pa.schema([f for f in SCHEMAS[name] if f.name != part])


def _say(progress: bool, msg: str) -> None:
    log.info(msg)
    if progress:
        print(f"[ct_ray import] {msg}", file=sys.stderr, flush=True)


def _pert_key_plan(name: str) -> tuple[str, str | None]:
    parts = name.split(".")
    return parts[0], (parts[1] if len(parts) > 1 else None)


def _import_sweep(store, old: _Legacy, sid: str, batch_prompts: int, counts: dict, progress: bool) -> None:
    part = f"sweep_id={sid}"
    graph_keys = old.names(f"graphs/{part}")
    if not graph_keys:
        return
    have_nodes = set(old.names(f"nodes/{part}"))
    have_edges = set(old.names(f"edges/{part}"))
    pert_files: dict[str, list[tuple[str, str | None]]] = {}
    for n in old.names(f"perturbations/{part}"):
        k, plan = _pert_key_plan(n)
        pert_files.setdefault(k, []).append((n, plan))
    gset = set(graph_keys)
    counts["dropped_files"] += (len(have_nodes - gset) + len(have_edges - gset)
                                + sum(len(v) for k, v in pert_files.items() if k not in gset))

    # the Iceberg side: repair a round of an earlier import (or sweep) cut between its commits, then what is in
    done = store.committed(sid)
    ok_now = {k for k, s in zip(done.column("key").to_pylist(), done.column("status").to_pylist()) if s == "ok"}
    recover(store, sid, {sid: ok_now})
    in_iceberg = set(done.column("key").to_pylist())
    todo = [k for k in graph_keys if k not in in_iceberg]
    counts["skipped_keys"] += len(graph_keys) - len(todo)
    have_pert: set = set()
    if any(k in ok_now for k in pert_files):  # perturbation jobs already committed for keys already in
        p = store.read("perturbations", sid, columns=["key", "plan"])
        have_pert = set(zip(p.column("key").to_pylist(), p.column("plan").to_pylist()))
        have_pert |= {(k, None) for k, _ in have_pert}

    def missing(k: str, plan: str | None) -> bool:  # (plan None: a file name without its plan)
        return (k, plan) not in have_pert

    # keys imported before whose perturbation files are not in yet (an import cut after its graphs commit); only
    # when the old graphs row was ok too (it is the same graph: keys are deterministic)
    old_ok_before = _ok_keys(old, part, [k for k in pert_files if k in ok_now])
    late_pert = sorted(k for k in old_ok_before if any(missing(k, plan) for _, plan in pert_files[k]))
    _say(progress, f"sweep {sid}: {len(graph_keys)} committed keys in the old files, {len(todo)} to import"
                   + (f", {len(late_pert)} with perturbations to import" if late_pert else ""))
    if not todo and not late_pert:
        return

    committer = Committer(store, sid, committed_keys=in_iceberg)
    configs = sweep_writer_configs(store)
    work = [("prompts", todo[i : i + batch_prompts]) for i in range(0, len(todo), batch_prompts)]
    work += [("perturbations", late_pert[i : i + batch_prompts]) for i in range(0, len(late_pert), batch_prompts)]
    t0, n_done = time.perf_counter(), 0
    for kind, keys in work:
        buf = RowBuffer(configs, sid, flush_bytes=FLUSH_BYTES)
        if kind == "prompts":
            ok = []
            for t in old.batches(f"graphs/{part}", keys, _file_schema("graphs")):
                ok += [k for k, s in zip(t.column("key").to_pylist(), t.column("status").to_pylist()) if s == "ok"]
                buf.add("graphs", t)
                counts["graphs"] += t.num_rows
            ok_set = set(ok)
            for name, have in (("nodes", have_nodes), ("edges", have_edges)):
                for t in old.batches(f"{name}/{part}", [k for k in keys if k in ok_set and k in have],
                                     _file_schema(name)):
                    buf.add(name, t)
                    counts[name] += t.num_rows
            for k in keys:
                buf.finish("prompts", k, ok=k in ok_set)
            pert_keys = [k for k in keys if k in ok_set and k in pert_files]
            counts["dropped_files"] += sum(len(pert_files[k]) for k in keys if k not in ok_set and k in pert_files)
            counts["dropped_files"] += sum(1 for k in keys if k not in ok_set and k in have_nodes)
            counts["dropped_files"] += sum(1 for k in keys if k not in ok_set and k in have_edges)
        else:
            pert_keys = keys
        names = [n for k in pert_keys for n, plan in pert_files[k] if missing(k, plan)]
        for t in old.batches(f"perturbations/{part}", names, _file_schema("perturbations")):
            buf.add("perturbations", t)
            counts["perturbations"] += t.num_rows
        for k in pert_keys:
            buf.finish("perturbations", k)
        report = buf.flush()
        counts["files"] += sum(len(f) for f in report["files"].values())
        if not committer.add(report):
            raise StorageError(f"sweep {sid}: the import's round would put rows of a key in twice (was the sweep "
                               f"running during the import?)")
        committer.commit()
        n_done += len(keys)
        _say(progress, f"sweep {sid}: {n_done}/{len(todo) + len(late_pert)} keys committed "
                       f"({n_done / max(1e-9, time.perf_counter() - t0):.0f} keys/s)")


def _ok_keys(old: _Legacy, part: str, keys: list[str]) -> set[str]:
    out = set()
    schema = pa.schema([_file_schema("graphs").field("key"), _file_schema("graphs").field("status")])
    for t in old.batches(f"graphs/{part}", keys, schema):
        out.update(k for k, s in zip(t.column("key").to_pylist(), t.column("status").to_pylist()) if s == "ok")
    return out


def _import_features(store, old: _Legacy, cid: str, counts: dict, progress: bool) -> None:
    import json

    raw = old.read_bytes(f"{FEATURES_DIR}/{cid}/job.json")
    names = old.names(f"features/clt_id={cid}")
    job = json.loads(raw).get("job") if raw else None
    keep = [n for n in names if job and n.startswith(f"{job}.")]
    counts["dropped_files"] += len(names) - len(keep)
    if not keep:  # no commit record (the job never finished): nothing of it was visible
        return
    if store.url.rstrip("/") != old.url and store.read_json(f"{FEATURES_DIR}/{cid}/job.json") is None:
        store.put_bytes(f"{store.root}/{FEATURES_DIR}/{cid}/job.json", raw)  # what the explorer shows
    writer = TableWriter(store.writer_config("features"))
    files, n = [], 0
    for t in old.batches(f"features/clt_id={cid}", keep, _file_schema("features"), max_rows=4096):
        files += writer.write(conform(t, "features", cid))
        n += t.num_rows
    # one commit: the partition's rows appear whole (replacing nothing: the import skips partitions already there)
    commit_files(store, "features", files, {"ct-ray.job": job, "ct-ray.import": "legacy"},
                 delete=live_files(store, "features", cid))
    counts["features"] += n
    counts["files"] += len(files)
    _say(progress, f"features {cid}: job {job}, {n} rows")


def _import_metrics(store, old: _Legacy, run: str, counts: dict, progress: bool) -> None:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rel = f"run={run}"
    names = old.names(rel)
    if not names:
        return
    cols = set(SCHEMAS["train_metrics"].names) - {PARTITIONS["train_metrics"]}
    parts = []
    for n in names:  # one small file per run: read as written (its columns are the history's keys)
        path = f"{old.root}/{rel}/{n}.parquet"
        try:
            with old.fs.open(path, "rb") as f:
                t = pq.read_table(f)
        except Exception as e:
            raise StorageError(f"cannot read {old.url_of(path)}: {one_line(e)}") from e
        t = t.select([c for c in t.column_names if c in cols])
        if "schema_version" not in t.column_names:
            t = t.append_column("schema_version", pa.array([LEGACY_SCHEMA_VERSION] * t.num_rows, pa.int16()))
        parts.append(conform(t, "train_metrics", run))
    rows = pa.concat_tables(parts)
    if "step" in rows.column_names and rows.num_rows:
        rows = rows.take(pc.sort_indices(rows, [("step", "ascending")]))
    replace_partition(store, "train_metrics", run, rows, {"ct-ray.run": run, "ct-ray.import": "legacy"})
    counts["train_metrics"] += rows.num_rows
    counts["files"] += 1
    _say(progress, f"train_metrics {run}: {rows.num_rows} rows")


def _copy_blobs(store, old: _Legacy, sid: str) -> None:
    """A sweep's plan and run records (what `sweep status` and the explorer read), when importing from another
    root and the store lacks them."""
    base = f"{old.root}/{SWEEPS_DIR}/{sid}"
    try:
        paths = [p for p in old.fs.find(base) if not p.rsplit("/", 1)[-1].startswith(".")]
    except FileNotFoundError:
        return
    except Exception as e:
        raise StorageError(f"cannot list {old.url_of(base)}: {one_line(e)}") from e
    for p in paths:
        rel = f"{SWEEPS_DIR}/{sid}/{p[len(base) + 1:]}"
        if store.fs.exists(f"{store.root}/{rel}"):
            continue
        data = old.read_bytes(p[len(old.root) + 1:])
        if data is not None:
            store.put_bytes(f"{store.root}/{rel}", data)


def import_legacy(store, legacy_url: str | None = None, progress: bool = False, batch_prompts: int = 2000,
                  metrics_url: str | None = None, remove_old: bool = False) -> dict:
    """Import an old per-file store (at `legacy_url`, default the store's own root) into the store's Iceberg tables.

    `metrics_url`: the old train_metrics table (default `{legacy_url}/tables/train_metrics`). Returns the rows
    imported per table, plus `files` (data files written), `skipped_keys` (already in the Iceberg graphs table),
    `skipped_partitions` (features/train_metrics partitions already there), `dropped_files` (old files no reader
    ever saw: of uncommitted keys, of error rows, of replaced features jobs) and `sweeps`. The old files stay
    unless `remove_old` (then the old table directories are deleted once everything is imported)."""
    if batch_prompts < 1:
        raise ValueError("batch_prompts must be at least 1")
    if legacy_url is None:
        old = _Legacy(store.fs, store.root, store.url)
    else:
        url = str(legacy_url).rstrip("/")
        same = url.split("://", 1)[0] == store.url.split("://", 1)[0] if "://" in url else store.local
        fs, root = filesystem(url, **(dict(store.storage_options) if same else {}))
        if is_local(fs):
            import os

            root = os.path.abspath(os.path.expanduser(url.removeprefix("file://")))
            url = root
        old = _Legacy(fs, root, url)
    if metrics_url is None:
        metrics = _Legacy(old.fs, f"{old.root}/{METRICS_DIR}", f"{old.url}/{METRICS_DIR}")
    else:
        mfs, mroot = filesystem(str(metrics_url))
        metrics = _Legacy(mfs, mroot, str(metrics_url).rstrip("/"))
    counts = {t: 0 for t in LEGACY_TABLES}
    counts.update(files=0, skipped_keys=0, skipped_partitions=0, dropped_files=0, sweeps=[])
    t0 = time.perf_counter()
    # sweep and CLT ids name folders of the new store (_sweeps/{id}, _features/{id}): checked before any is used
    sweeps = [check_name(s, f"{old.url}: sweep id", StorageError) for s in old.partitions("graphs", PARTITIONS["graphs"])]
    for sid in sweeps:
        _import_sweep(store, old, sid, batch_prompts, counts, progress)
        if store.url.rstrip("/") != old.url:
            _copy_blobs(store, old, sid)
        counts["sweeps"].append(sid)
    have = set(store.partitions("features"))
    for cid in [check_name(c, f"{old.url}: clt_id", StorageError) for c in old.partitions("features", PARTITIONS["features"])]:
        if cid in have:
            counts["skipped_partitions"] += 1
            continue
        _import_features(store, old, cid, counts, progress)
    have = set(store.partitions("train_metrics"))
    runs = metrics.partitions("", PARTITIONS["train_metrics"])
    for run in runs:
        if run in have:
            counts["skipped_partitions"] += 1
            continue
        _import_metrics(store, metrics, run, counts, progress)
    if remove_old:
        _remove_old(store, old, sweeps, metrics, runs)
    counts["seconds"] = time.perf_counter() - t0
    _say(progress, "imported " + ", ".join(f"{t} {counts[t]}" for t in LEGACY_TABLES)
         + f" ({counts['files']} data files, {counts['skipped_keys']} keys already there)")
    return counts


def _remove_old(store, old: _Legacy, sweeps: list[str], metrics: _Legacy, runs: list[str]) -> None:
    """Delete the old table directories, after checking that every committed old key is in the Iceberg tables."""
    for sid in sweeps:
        have = set(store.committed(sid).column("key").to_pylist())
        missing = [k for k in old.names(f"graphs/sweep_id={sid}") if k not in have]
        if missing:
            raise StorageError(f"sweep {sid}: {len(missing)} old keys are not in the tables; old files kept")
    for sid in sweeps:
        for t in SWEEP_TABLES:
            old.rm_dir(f"{t}/sweep_id={sid}")
    for cid in [check_name(c, f"{old.url}: clt_id", StorageError) for c in old.partitions("features", PARTITIONS["features"])]:
        old.rm_dir(f"features/clt_id={cid}")
    for run in runs:
        metrics.rm_dir(f"run={run}")
