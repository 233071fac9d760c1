"""One driver per sweep: a lease in the catalog, and the repair of keys that two drivers committed twice.

The lease is a property of the `graphs` table (`ct-ray.lease.{sweep_id}` = owner, expiry), so it lives wherever the
catalog lives (SQLite in the store, PostgreSQL, REST, Glue) and needs nothing else. A driver takes it before it plans,
renews it from a heartbeat thread every third of its time to live, checks it before each commit round, and drops it
when it ends. A driver that was killed leaves a lease that lapses after its time to live, or at once when its holder
is a process of this host that no longer exists. Taking a lease is write-then-read-back (the catalog's last writer
wins): two drivers starting in the same instant can both believe they hold it for a moment, so the committer also
checks the lease before every round and, after its `graphs` commit, that none of its keys is there twice
(`dedupe_keys`): rows of a key committed twice are removed in every table, and the next run recomputes them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from ..errors import CTRayError, StorageError, one_line

log = logging.getLogger(__name__)
LEASE_PROP = "ct-ray.lease."
TTL_ENV = "CT_RAY_SWEEP_LEASE_S"
DEFAULT_TTL_S = 120.0
_HELD: set[str] = set()  # owners of the leases this process holds now (one left behind by a failed release is stale)


class LeaseLost(CTRayError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SweepLease:
    def __init__(self, store, sweep_id: str, ttl_s: float | None = None):
        self.store, self.sweep_id = store, sweep_id
        self.ttl_s = float(ttl_s or os.environ.get(TTL_ENV) or DEFAULT_TTL_S)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.owner = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self.prop = LEASE_PROP + sweep_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # why the heartbeat found the lease gone

    # --- the property ------------------------------------------------------------------------------------------
    def _table(self):
        return self.store.table("graphs")  # created if missing (the sweep writes it anyway), refreshed

    def read(self) -> dict | None:
        raw = self._table().properties.get(self.prop)
        try:
            cur = json.loads(raw) if raw else None
        except ValueError:
            return None  # an unreadable lease is no lease
        return cur if isinstance(cur, dict) and "owner" in cur and "expires_at" in cur else None

    def _write(self, value: dict | None) -> None:
        from pyiceberg.exceptions import CommitFailedException

        try:
            with self._table().transaction() as tx:
                if value is None:
                    tx.remove_properties(self.prop)
                else:
                    tx.set_properties({self.prop: json.dumps(value)})
        except CommitFailedException:
            raise  # another process changed the table at that instant: the caller reads the lease again
        except Exception as e:
            raise StorageError(f"cannot write the lease of sweep {self.sweep_id!r} in {self.store.url}'s catalog: "
                               f"{one_line(e)}") from e

    def _free(self, cur: dict | None) -> bool:
        if cur is None or cur["owner"] == self.owner or cur["expires_at"] < time.time():
            return True
        host, _, rest = str(cur["owner"]).partition(":")
        pid = rest.partition(":")[0]
        if host != self.host or not pid.isdigit():
            return False
        if int(pid) == self.pid:  # this process: stale unless one of its drivers holds it now
            return cur["owner"] not in _HELD
        return not _alive(int(pid))  # its driver died on this host

    # --- taking, keeping, dropping -----------------------------------------------------------------------------
    def acquire(self, wait_s: float = 0.0, settle_s: float = 0.3) -> SweepLease:
        deadline = time.monotonic() + wait_s
        while True:
            from pyiceberg.exceptions import CommitFailedException

            cur = self.read()
            if self._free(cur):
                try:
                    self._write(self._record())
                except CommitFailedException:  # another driver (or a commit) at the same instant: look again
                    time.sleep(0.05)
                    continue
                time.sleep(settle_s)  # another driver writing at the same instant: the last writer holds it
                cur = self.read()
                if cur is not None and cur["owner"] == self.owner:
                    _HELD.add(self.owner)
                    self._thread = threading.Thread(target=self._beat, name=f"lease-{self.sweep_id}", daemon=True)
                    self._thread.start()
                    return self
            if time.monotonic() >= deadline:
                until = time.strftime("%H:%M:%S", time.localtime(cur["expires_at"])) if cur else "?"
                raise CTRayError(f"sweep {self.sweep_id!r} is being run by another driver ({cur and cur['owner']}, "
                                 f"lease until {until}): wait for it to finish (a killed driver's lease lapses after "
                                 f"{self.ttl_s:.0f} s)")
            time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))

    def _record(self) -> dict:
        return {"owner": self.owner, "expires_at": time.time() + self.ttl_s, "ttl_s": self.ttl_s}

    def _beat(self) -> None:
        from pyiceberg.exceptions import CommitFailedException

        while not self._stop.wait(self.ttl_s / 3):
            for attempt in range(5):  # a commit of the driver's own landing at the same instant: read and write again
                try:
                    cur = self.read()
                    if cur is None or cur["owner"] != self.owner:
                        self.lost = f"taken by {cur and cur['owner']}"
                        return
                    self._write(self._record())
                    break
                except CommitFailedException:
                    time.sleep(0.05 * 2**attempt)
                except Exception as e:  # a storage hiccup: the next beat tries again before the lease lapses
                    log.warning("sweep %s: lease heartbeat failed: %s", self.sweep_id, one_line(e))
                    break

    def check(self) -> None:
        """Raise LeaseLost unless this driver still holds the lease (before each commit round)."""
        cur = self.read()
        if self.lost or cur is None or cur["owner"] != self.owner:
            raise LeaseLost(f"sweep {self.sweep_id!r}: this driver lost its lease to another driver "
                            f"({self.lost or (cur and cur['owner'])}); its uncommitted round was dropped")

    def release(self) -> None:
        self._stop.set()
        _HELD.discard(self.owner)
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            cur = self.read()
            if cur is not None and cur["owner"] == self.owner:
                self._write(None)
        except Exception as e:  # it lapses on its own (a storage error, or a commit racing this one)
            log.warning("sweep %s: could not drop the lease: %s", self.sweep_id, e)


def duplicated_keys(store, sweep_id: str, keys=None) -> list[str]:
    """Keys of the sweep with more than one committed graphs row (of `keys`, if given)."""
    import collections

    c = collections.Counter(store.committed(sweep_id).column("key").to_pylist())
    want = None if keys is None else set(keys)
    return sorted(k for k, n in c.items() if n > 1 and (want is None or k in want))


def dedupe_keys(store, sweep_id: str, keys: list[str]) -> None:
    """Remove every row of `keys` from the sweep's tables (graphs last: the keys stay visible as committed until their
    other rows are gone); the next run of the sweep recomputes them. Analysis tables are derived: re-run analyze."""
    from pyiceberg.expressions import And, EqualTo, In

    from .commit import commit_files
    from .schemas import SWEEP_TABLES

    where = And(EqualTo("sweep_id", sweep_id), In("key", list(keys)))
    for name in [*[t for t in SWEEP_TABLES if t != "graphs"], "graphs"]:
        if store.existing_table(name) is not None:
            commit_files(store, name, [], {"ct-ray.sweep": sweep_id, "ct-ray.dedupe": len(keys)}, delete_where=where)


def repair(store, sweep_id: str) -> list[str]:
    """`ct-ray sweep repair`: the sweep's keys committed more than once, with all their rows removed."""
    dup = duplicated_keys(store, sweep_id)
    if dup:
        dedupe_keys(store, sweep_id, dup)
    return dup
