"""Committing data files to the Iceberg tables: batched, ordered and idempotent (the driver's side of writer.py).

A sweep commits in rounds. Each round appends the workers' reported files to `nodes` and `edges`, then to `graphs`
(the commit record of its keys: one row per key), then to `perturbations` (only for keys already in `graphs`).
Every snapshot carries the properties `ct-ray.sweep`, `ct-ray.batch` (the round) and `ct-ray.first-key` (a key of the
round with an 'ok' graphs row). Tables cannot be committed together, so a driver that dies between the `nodes`/`edges`
and the `graphs` commit leaves rows of keys that have no graphs row: `recover` finds those snapshots (their first key
has no 'ok' row in `graphs`) and removes their files before the sweep runs again, so a key's rows are never there
twice. A key retried after an error row gets its new graphs row in the same commit that deletes the old one.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
import warnings

from ..errors import StorageError, one_line
from .schemas import PARTITIONS, conform
from .visibility import GRAPH_PARTS, PROP_BATCH, PROP_FIRST, PROP_SWEEP  # noqa: F401 (re-exported)
from .writer import RowBuffer

log = logging.getLogger(__name__)
FAULT_ENV = "CT_RAY_FAULT_DRIVER_DIES"
KEEP_SNAPSHOTS = 20  # snapshots a running sweep keeps per table (more only for rounds recovery may still need)


def _revive(files: list, spec_id: int) -> list:
    """DataFiles that crossed a process boundary lose their (unserialised) partition-spec id."""
    for f in files:
        try:
            f.spec_id  # noqa: B018
        except AttributeError:
            f.spec_id = spec_id
    return files


def commit_files(store, name: str, add: list, properties: dict | None = None, delete: list | None = None,
                 delete_where=None) -> None:
    """One atomic commit on table `name`: remove the rows matching `delete_where` and the files `delete` (of the
    current snapshot), and append the files `add`."""
    if not add and not delete and delete_where is None:
        return
    t = store.table(name)
    props = {k: str(v) for k, v in (properties or {}).items()}
    try:
        tx = t.transaction()
        if delete_where is not None:
            with warnings.catch_warnings():  # "did not match any records": nothing to delete is fine here
                warnings.simplefilter("ignore", UserWarning)
                tx.delete(delete_where, snapshot_properties=props)
        upd = tx.update_snapshot(snapshot_properties=props)
        # appends merge manifests (table property commit.manifest-merge.enabled): the manifest list a commit writes
        # and a reader plans from stays short however many rounds a sweep commits
        with (upd.overwrite() if delete else upd.merge_append()) as op:
            for f in _revive(list(add), t.metadata.default_spec_id):
                op.append_data_file(f)
            for f in delete or []:
                op.delete_data_file(f)
        tx.commit_transaction()
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(f"cannot commit to table {name} of {store.url}: {one_line(e)}") from e


def live_files(store, name: str, partition: str | None = None) -> list:
    """DataFiles of the current snapshot (of one partition)."""
    from pyiceberg.expressions import AlwaysTrue, EqualTo

    t = store.existing_table(name)
    if t is None or t.current_snapshot() is None:
        return []
    expr = EqualTo(PARTITIONS[name], partition) if partition is not None else AlwaysTrue()
    return [task.file for task in t.scan(row_filter=expr).plan_files()]


def append_rows(store, name: str, partition: str, rows, properties: dict | None = None) -> int:
    """Write `rows` (Arrow table or row dicts) as data files of one partition and commit them (small writes made on
    the committing process itself: tests, imports, a driver's own rows)."""
    from .writer import TableWriter

    files = TableWriter(store.writer_config(name)).write(conform(rows, name, partition))
    commit_files(store, name, files, properties)
    return len(files)


def replace_partition(store, name: str, partition: str, rows, properties: dict | None = None) -> int:
    """Make `rows` the whole content of one partition of `name`, atomically (old files out, new in, one commit)."""
    from .writer import TableWriter

    files = TableWriter(store.writer_config(name)).write(conform(rows, name, partition))
    commit_files(store, name, files, properties, delete=live_files(store, name, partition))
    return len(files)


def recover(store, sweep_id: str | None = None, committed: dict[str, set] | None = None, older_than_s: float = 0.0) -> int:
    """Remove the graph-part files of rounds whose graphs commit never happened (of one sweep, or all); readers
    already hide them (visibility.py), this makes the tables say so for every engine. `committed`: sweep id -> keys
    with an 'ok' graphs row, where the caller has them. Only rounds older than `older_than_s` are touched: a live
    driver's round is between two commits for a moment. Returns the number of files removed."""
    from .visibility import files_added_by, unconfirmed

    removed = 0
    for name in GRAPH_PARTS:
        t = store.existing_table(name)
        if t is None or t.current_snapshot() is None:
            continue
        orphans = unconfirmed(t, store.existing_table("graphs"), sweep_id, older_than_s, committed)
        paths = files_added_by(t, orphans)
        for sid in sorted(set(orphans.values())):
            dead = [f for f in live_files(store, name, sid) if f.file_path in paths]
            if dead:
                log.warning("table %s: removing %d data file(s) of an uncommitted round of sweep %s", name, len(dead), sid)
                commit_files(store, name, [], {"ct-ray.recover": sid}, delete=dead)
                removed += len(dead)
    return removed


def _fault(where: str, round_no: int) -> None:
    """Fault injection for the tests: FAULT_ENV='before-commit:N' (or before-graphs) SIGKILLs this process there,
    in round N (0-based), as a driver dying at the worst moment would."""
    fault = os.environ.get(FAULT_ENV, "")
    if fault == f"{where}:{round_no}":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.startswith("slow:") and where == "before-commit":  # 'slow:S': each round waits S s (a test's kill window)
        time.sleep(float(fault[5:]))


class Committer:
    """The driver's side of a sweep's rounds: collects reported files, commits them in order, knows what is in.

    `add` refuses (returns False) a worker's report that would put a key's rows in twice: one whose prompt keys are
    already committed or already in the round, or whose perturbations are of keys with no graphs row (their prompt
    was lost with a worker). The caller re-runs the report's keys instead; its files are never committed."""

    def __init__(self, store, sweep_id: str, committed_keys=(), perturbed_keys=(), replace_keys=(), lease=None,
                 keep_snapshots: int = KEEP_SNAPSHOTS, graphs_snapshot: int | None | str = "now"):
        self.store, self.sweep_id, self.lease, self.keep_snapshots = store, sweep_id, lease, keep_snapshots
        self.keys = set(committed_keys)  # keys with a committed graphs row (not to be written again)
        self.replace = set(replace_keys)  # keys whose committed (error) row a new row replaces
        self.perturbed = set(perturbed_keys)  # keys with committed perturbation rows (of the current plan)
        self.driver_rows = RowBuffer({"graphs": store.writer_config("graphs")}, sweep_id)
        # graphs snapshots up to here are checked (the caller's scan of the committed keys saw them)
        self._seen = store.table("graphs").metadata.current_snapshot_id if graphs_snapshot == "now" else graphs_snapshot
        self._reset()
        self.rounds = 0

    def _reset(self):
        self.files: dict[str, list] = {}
        self.prompts: list[str] = []
        self.ok: list[str] = []
        self.perturbations: list[str] = []

    def add(self, report: dict) -> bool:
        prompts, perts = report.get("prompts", []), report.get("perturbations", [])
        round_keys = set(self.prompts)
        if (len(set(prompts)) != len(prompts) or any(k in self.keys or k in round_keys for k in prompts)
                or any(k in self.perturbed or k in self.perturbations for k in perts)
                or any(k not in self.keys and k not in round_keys and k not in prompts for k in perts)):
            return False
        for t, fs in report.get("files", {}).items():
            self.files.setdefault(t, []).extend(fs)
        self.prompts += prompts
        self.ok += report.get("ok", [])
        self.perturbations += perts
        return True

    def add_driver_row(self, key: str, row: dict) -> None:
        """A graphs row the driver writes itself (a prompt whose worker kept dying)."""
        self.driver_rows.add("graphs", [row])
        self.driver_rows.finish("prompts", key)

    @property
    def pending(self) -> int:
        return len(self.prompts) + len(self.perturbations) + self.driver_rows.pending

    def _others_committed(self, batch: str) -> bool:
        """Did a round of this sweep other than ours land in `graphs` since the last check? Walks the snapshots
        from the current one back to the last one checked (metadata only); True when it cannot tell."""
        meta = self.store.table("graphs", refresh=False).metadata
        by_id = {s.snapshot_id: s for s in meta.snapshots}
        sid, seen, found = meta.current_snapshot_id, self._seen, False
        while sid is not None and sid != seen:
            snap = by_id.get(sid)
            if snap is None:  # the walk left the kept history before reaching the last check
                found = True
                break
            p = snap.summary.additional_properties if snap.summary else {}
            if p.get(PROP_SWEEP) == self.sweep_id and p.get(PROP_BATCH) not in (None, batch) and "ct-ray.prompts" in p:
                found = True
            sid = snap.parent_snapshot_id
        if sid is None and seen is not None:
            found = True
        self._seen = meta.current_snapshot_id
        return found

    def _check_once(self, keys: set[str], batch: str) -> None:
        """After a graphs commit: none of the round's keys may be there twice. Two drivers that raced past the lease
        both commit a key; both see it here, remove every row of it (idempotent) and stop, and the next run
        recomputes it once. Keys are read only when another round of this sweep landed since the last check: a
        driver alone pays no scan of the committed keys (that scan grows with the sweep)."""
        from .lease import dedupe_keys, duplicated_keys

        if not keys or not self._others_committed(batch):
            return
        dup = duplicated_keys(self.store, self.sweep_id, keys)
        if dup:
            dedupe_keys(self.store, self.sweep_id, dup)
            from ..errors import CTRayError

            raise CTRayError(f"sweep {self.sweep_id!r}: another driver committed {len(dup)} of this round's keys at the "
                             f"same time; their rows were removed: run the sweep again, one driver at a time")

    def commit(self) -> dict:
        """Commit the round: nodes, edges, graphs (the commit record), perturbations. Returns counts."""
        if self.driver_rows.pending:
            self.add(self.driver_rows.flush())
        if not self.prompts and not self.perturbations:
            return {"prompts": 0, "perturbations": 0}
        _fault("before-commit", self.rounds)
        batch = uuid.uuid4().hex[:16]
        props = {PROP_SWEEP: self.sweep_id, PROP_BATCH: batch}
        if self.prompts:
            from pyiceberg.expressions import And, EqualTo, In

            if self.ok:
                props[PROP_FIRST] = self.ok[0]
            props["ct-ray.prompts"] = len(self.prompts)
            if self.lease is not None:
                self.lease.check()  # another driver took the sweep over: this round is dropped, never committed
            for t in GRAPH_PARTS:
                commit_files(self.store, t, self.files.get(t, []), props)
            _fault("before-graphs", self.rounds)
            replaced = sorted(self.replace.intersection(self.prompts))
            where = And(EqualTo(PARTITIONS["graphs"], self.sweep_id), In("key", replaced)) if replaced else None
            commit_files(self.store, "graphs", self.files.get("graphs", []), props, delete_where=where)
            self.keys.update(self.prompts)
            self.replace.difference_update(self.prompts)
            self._check_once(set(self.prompts) - set(replaced), batch)
        if self.perturbations:
            commit_files(self.store, "perturbations", self.files.get("perturbations", []),
                         {PROP_SWEEP: self.sweep_id, PROP_BATCH: batch, "ct-ray.graphs": len(self.perturbations)})
            self.perturbed.update(self.perturbations)
        out = {"prompts": len(self.prompts), "perturbations": len(self.perturbations)}
        self._reset()
        self.rounds += 1
        if self.keep_snapshots and self.rounds % max(1, self.keep_snapshots // 2) == 0:
            # bounded metadata: every commit rewrites the table's metadata with all its snapshots
            from .visibility import expire_rounds

            try:  # maintenance: the round is committed whatever happens here (the next expiry tries again)
                out["expired"] = expire_rounds(self.store, (*GRAPH_PARTS, "perturbations"), self.keep_snapshots)
            except Exception as e:
                log.warning("sweep %s: could not expire old snapshots: %s", self.sweep_id, one_line(e))
        return out
