"""Which committed data files readers see: decided per data file, from snapshot metadata, never by joining rows.

A sweep round commits `nodes`, `edges` (`edge_heads`, `qk_attributions`) and then `graphs`; every snapshot of the
round names it (`ct-ray.batch`) and one of its ok keys (`ct-ray.first-key`), see commit.py. A round of a graph-part
table is *confirmed* when the `graphs` table has a snapshot of the same batch, or, once that snapshot was expired,
when its first key has an ok `graphs` row. The files added by an unconfirmed round (its driver died between the two
commits, or is between them right now) are hidden from every reader here (`ct-ray sql`, `Store.read`, export,
analysis); `recover` removes them before the sweep runs again. So a key's rows are shown only with its ok graphs
row, and a query of `nodes` or `edges` is a plain scan of the planned files.

Readers load each graph-part table before `graphs`: a round they see in `graphs` is complete in the parts they read.
Engines reading the catalog directly (Spark, Trino, Athena, Polars) see an unconfirmed round's rows until the
recovery (docs/tables.md, "What other engines see").
"""

from __future__ import annotations

import time

PROP_SWEEP, PROP_BATCH, PROP_FIRST = "ct-ray.sweep", "ct-ray.batch", "ct-ray.first-key"
GRAPH_PARTS = ("nodes", "edges", "edge_heads", "qk_attributions")  # committed before graphs: what readers filter


def _props(snap) -> dict:
    return snap.summary.additional_properties if snap.summary else {}


def round_snapshots(table, sweep_id: str | None = None, older_than_s: float = 0.0) -> dict[int, dict]:
    """{snapshot id: its properties} of a graph-part table's sweep rounds (of one sweep) older than `older_than_s`."""
    now_ms = time.time() * 1000
    out = {}
    for snap in table.metadata.snapshots:
        p = _props(snap)
        if not p.get(PROP_SWEEP) or not p.get(PROP_FIRST) or sweep_id is not None and p[PROP_SWEEP] != sweep_id:
            continue
        if now_ms - snap.timestamp_ms < older_than_s * 1000:
            continue
        out[snap.snapshot_id] = p
    return out


def graphs_batches(graphs) -> set[str]:
    """The rounds (batch ids) whose graphs commit is in `graphs`' metadata."""
    return {p[PROP_BATCH] for p in map(_props, graphs.metadata.snapshots) if p.get(PROP_BATCH)} if graphs else set()


def _ok_firsts(graphs, firsts: dict[str, set[str]]) -> dict[str, set[str]]:
    """{sweep: the keys of `firsts[sweep]` with an ok row} in `graphs` as loaded (no refresh: the reader's view)."""
    from pyiceberg.expressions import And, EqualTo, In

    out: dict[str, set[str]] = {}
    if graphs is None or graphs.current_snapshot() is None:
        return out
    for sid, keys in firsts.items():
        t = graphs.scan(row_filter=And(EqualTo("sweep_id", sid), In("key", sorted(keys))),
                        selected_fields=("key", "status")).to_arrow()
        out[sid] = {k for k, s in zip(t.column("key").to_pylist(), t.column("status").to_pylist()) if s == "ok"}
    return out


def unconfirmed(table, graphs, sweep_id: str | None = None, older_than_s: float = 0.0,
                ok_keys: dict[str, set] | None = None) -> dict[int, str]:
    """{snapshot id: sweep id} of `table`'s rounds whose graphs commit is missing. `graphs`: the graphs table as the
    caller loaded it (after `table`); `ok_keys`: sweep id -> keys with an ok graphs row, where the caller has them."""
    rounds = round_snapshots(table, sweep_id, older_than_s)
    if not rounds:
        return {}
    done = graphs_batches(graphs)
    left = {s: p for s, p in rounds.items() if p.get(PROP_BATCH) not in done}
    if not left:
        return {}
    ok = dict(ok_keys or {})
    ask: dict[str, set[str]] = {}
    for p in left.values():
        if p[PROP_SWEEP] not in ok:
            ask.setdefault(p[PROP_SWEEP], set()).add(p[PROP_FIRST])
    ok.update(_ok_firsts(graphs, ask))
    return {s: p[PROP_SWEEP] for s, p in left.items() if p[PROP_FIRST] not in ok.get(p[PROP_SWEEP], ())}


def files_added_by(table, snapshot_ids) -> set[str]:
    """Paths of the live data files (of the current snapshot) that the snapshots `snapshot_ids` added. A merged
    manifest keeps each entry's adding snapshot; only manifests whose sequence range can hold one are read."""
    ids = set(snapshot_ids)
    snap = table.current_snapshot()
    if not ids or snap is None:
        return set()
    seqs = [s.sequence_number for s in table.metadata.snapshots if s.snapshot_id in ids and s.sequence_number is not None]
    lo, hi = (min(seqs), max(seqs)) if seqs else (None, None)
    out = set()
    for m in snap.manifests(table.io):
        if lo is not None and (m.sequence_number < lo or (m.min_sequence_number or 0) > hi):
            continue
        for e in m.fetch_manifest_entry(table.io, discard_deleted=True):
            if e.snapshot_id in ids:
                out.add(e.data_file.file_path)
    return out


def hidden_files(table, graphs, sweep_id: str | None = None) -> set[str]:
    """Paths of `table`'s live data files that readers must not see (added by unconfirmed rounds)."""
    if table is None:
        return set()
    return files_added_by(table, unconfirmed(table, graphs, sweep_id))


# --- which snapshots a running sweep may drop -------------------------------------------------------------------------
def _lineage(meta, keep: int) -> set[int]:
    """The `keep` newest snapshots of the current lineage, and every branch or tag head."""
    by_id = {s.snapshot_id: s for s in meta.snapshots}
    out, sid = set(), meta.current_snapshot_id
    while sid is not None and sid in by_id and len(out) < keep:
        out.add(sid)
        sid = by_id[sid].parent_snapshot_id
    return out | {r.snapshot_id for r in meta.refs.values()}


def expire_rounds(store, parts, keep: int) -> int:
    """Drop the snapshots recovery and readers no longer need, keeping each table's `keep` newest: of the graph-part
    tables every snapshot except unconfirmed rounds (their files may have to be removed), then of `graphs` every
    snapshot no remaining round of a part table is confirmed by. Deletes no file (vacuum does, after its grace
    period), so a reader that planned on an expired snapshot still reads. Returns the snapshots dropped."""
    from pyiceberg.exceptions import CommitFailedException

    def drop(name: str, needed) -> int:
        t = store.existing_table(name)
        for attempt in range(5):
            if t is None or len(t.metadata.snapshots) <= keep:
                return 0
            held = _lineage(t.metadata, keep)
            ids = [s.snapshot_id for s in t.metadata.snapshots if s.snapshot_id not in held and not needed(_props(s))]
            if not ids:
                return 0
            try:
                t.maintenance.expire_snapshots().by_ids(ids).commit()
                return len(ids)
            except CommitFailedException:  # another commit landed meanwhile: decide again on the new metadata
                time.sleep(0.05 * 2**attempt)
                t = t.refresh()
        return 0

    done = graphs_batches(store.existing_table("graphs"))
    n = sum(drop(name, lambda p: bool(p.get(PROP_FIRST)) and p.get(PROP_BATCH) not in done) for name in parts)
    wanted = set()
    for name in parts:
        t = store.existing_table(name)
        if t is not None:
            wanted |= {p.get(PROP_BATCH) for p in round_snapshots(t).values()}
    return n + drop("graphs", lambda p: p.get(PROP_BATCH) in wanted)
