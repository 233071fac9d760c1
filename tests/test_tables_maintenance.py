"""Table maintenance (`ct-ray tables compact|expire|vacuum|list|import`) on small stores built through the real commit
path: rows never change, every reader still reads, nothing young or referenced is touched, rounds cut short are
repaired only once older than the grace period."""

import os
import random
import time
import uuid

import pytest

from ct_ray.cli import main as cli_main
from ct_ray.store import maintenance
from ct_ray.store.commit import Committer, append_rows, live_files
from ct_ray.store.maintenance import compact, expire, table_stats, vacuum
from ct_ray.store.sql import query
from ct_ray.store.tables import Store
from ct_ray.store.writer import RowBuffer, sweep_writer_configs

from .test_sql import report

COUNTS = ("SELECT (SELECT count(*) FROM raw_nodes) rn, (SELECT count(*) FROM raw_edges) re, (SELECT count(*) FROM nodes) n,"
          " (SELECT count(*) FROM edges) e, (SELECT count(*) FROM graphs) g, (SELECT count(*) FROM features) f,"
          " (SELECT count(*) FROM train_metrics) m")
ROW_TABLES = ("graphs", "nodes", "edges", "features", "train_metrics")


def commit_keys(st, sid, keys):
    """One commit round per key (nodes, edges, graphs): one small data file per table and round."""
    done = set(st.committed(sid).column("key").to_pylist())
    for k in keys:
        c = Committer(st, sid, done)
        assert c.add(report(st, sid, {k: "ok"}))
        c.commit()
        done.add(k)


def rows(st) -> dict:
    """Every committed row of every table, in a stable order."""
    return {t: sorted(map(repr, st.read(t).to_pylist())) for t in ROW_TABLES}


def counts(st) -> dict:
    return query(COUNTS, store=st).to_pylist()[0]


def n_files(st, table, partition=None) -> int:
    return len(live_files(st, table, partition))


def data_paths(st, table) -> set[str]:
    d = st.fs.find(f"{st.root}/warehouse/{table}/data") if st.fs.exists(f"{st.root}/warehouse/{table}/data") else []
    return set(d)


def small_store(path) -> Store:
    st = Store(str(path))
    commit_keys(st, "s", ["a", "b", "c", "d", "e"])
    commit_keys(st, "007", ["a", "x", "y"])
    for i in range(3):
        append_rows(st, "features", "clt1", [{"job": "j", "clt": "clt1", "layer": 0, "feature": i, "density": 0.5}])
        append_rows(st, "train_metrics", "run1", [{"step": i, "fvu": 0.1 * i}])
    return st


def test_compact_merges_small_files_into_one_per_partition(tmp_path):
    st = small_store(tmp_path)
    before, c0 = rows(st), counts(st)
    assert n_files(st, "nodes", "s") == 5 and n_files(st, "nodes", "007") == 3 and n_files(st, "features") == 3
    old_snap = st.table("nodes").current_snapshot().snapshot_id
    old_nodes = sorted(map(repr, st.table("nodes").scan().to_arrow().to_pylist()))
    old_files = {f.file_path for f in live_files(st, "nodes")}

    t0 = time.perf_counter()
    r = compact(st, older_than_s=0)
    print(f"compact: {r} in {time.perf_counter() - t0:.2f} s")
    assert r["partitions"] == 8 and r["files_before"] == 5 * 3 + 3 * 3 + 3 + 3 and r["files_after"] == 8
    assert r["rows"] == sum(c0[k] for k in ("rn", "re", "g", "f", "m")) and r["recovered"] == 0 and not r["failed"]
    for t, parts in (("graphs", ("s", "007")), ("nodes", ("s", "007")), ("edges", ("s", "007")),
                     ("features", ("clt1",)), ("train_metrics", ("run1",))):
        for p in parts:
            assert n_files(st, t, p) == 1, (t, p)
    assert rows(st) == before and counts(st) == c0
    assert rows(Store(str(tmp_path))) == before  # a fresh reader (another process) too
    # the snapshot before the compaction still reads its (old) files until it is expired
    t = st.table("nodes")
    assert sorted(map(repr, t.scan(snapshot_id=old_snap).to_arrow().to_pylist())) == old_nodes
    assert all(os.path.exists(p.removeprefix("file://")) for p in old_files)
    # nothing left to merge: a second run changes nothing
    assert compact(st, older_than_s=0)["partitions"] == 0
    assert [s["files"] for s in table_stats(st, ["nodes", "features"])] == [2, 1]


def test_compact_writes_files_of_about_the_target_size(tmp_path):
    st = Store(str(tmp_path))
    rng, done = random.Random(0), set()
    for r in range(8):  # 8 rounds of ~90 kB edges files
        buf = RowBuffer(sweep_writer_configs(st), "s")
        for k in range(3):
            key = f"r{r}k{k}"
            buf.add("edges", [{"key": key, "source": rng.randrange(10**6), "target": rng.randrange(10**6),
                               "weight": rng.random()} for _ in range(2000)])
            buf.add("graphs", [{"key": key, "status": "ok"}])
            buf.finish("prompts", key, ok=True)
        c = Committer(st, "s", done)
        assert c.add(buf.flush())
        c.commit()
        done |= c.keys
    before = rows(st)
    target = 150_000
    r = compact(st, tables=["edges"], target_bytes=target, older_than_s=0)
    sizes = sorted((f.file_size_in_bytes for f in live_files(st, "edges")), reverse=True)
    assert r["files_before"] == 8 and r["files_after"] == len(sizes) >= 3 and r["rows"] == 48_000
    assert all(0.75 * target <= s <= 1.25 * target for s in sizes[:-1]), sizes  # all but the remainder
    assert sum(sizes) == r["bytes_after"]
    assert rows(st) == before
    assert n_files(st, "graphs") == 8  # --tables edges: the other tables untouched
    assert compact(st, tables="edges", target_bytes=target, older_than_s=0)["partitions"] == 0  # converged


def test_compact_leaves_a_fresh_round_alone(tmp_path):
    st = Store(str(tmp_path))
    commit_keys(st, "s", ["a", "b"])
    time.sleep(2.0)
    commit_keys(st, "s", ["c", "d"])
    assert compact(st, older_than_s=3600)["partitions"] == 0  # everything is younger than an hour
    assert n_files(st, "nodes") == 4
    fresh = {f.file_path for f in live_files(st, "nodes")}
    before = rows(st)
    r = compact(st, older_than_s=1.0)  # a and b are old enough, c and d are not
    assert r["files_before"] == 3 * 2 and r["files_after"] == 3
    live = {f.file_path for f in live_files(st, "nodes")}
    assert len(live) == 3 and len(live & fresh) == 2  # c's and d's files as they were, a + b merged
    assert rows(st) == before


def test_expire_keeps_the_current_rows_and_refuses_young_cutoffs(tmp_path):
    st = Store(str(tmp_path))
    commit_keys(st, "s", ["a", "b", "c", "d"])
    before, c0 = rows(st), counts(st)
    snaps = lambda t: len(st.table(t).metadata.snapshots)  # noqa: E731
    assert [snaps(t) for t in ("nodes", "edges", "graphs")] == [4, 4, 4]
    assert expire(st)["expired"] == 0  # a week: nothing that old
    for bad in (0, 1800, 3599):
        with pytest.raises(ValueError, match="refusing to expire snapshots younger than 1h") as e:
            expire(st, bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="retain_last"):
        expire(st, 7200, retain_last=0)
    with pytest.raises(ValueError, match="unknown table"):
        expire(st, 7200, tables=["nope"])
    # the 1 h floor lifted through the private parameter (the snapshots here are seconds old)
    r = expire(st, 0, retain_last=2, _floor_s=0)
    assert [snaps(t) for t in ("nodes", "edges", "graphs")] == [2, 2, 2] and r["expired"] == 6
    r = expire(st, 0, tables="nodes", _floor_s=0)
    assert [snaps(t) for t in ("nodes", "edges", "graphs")] == [1, 2, 2] and r["expired"] == 1
    expire(st, 0, _floor_s=0)
    assert [snaps(t) for t in ("nodes", "edges", "graphs")] == [1, 1, 1]
    assert rows(st) == before and counts(st) == c0 and rows(Store(str(tmp_path))) == before
    commit_keys(st, "s", ["e"])  # the tables take commits as before
    assert counts(st)["g"] == 5


def test_expire_drops_sweep_tables_before_graphs(tmp_path, monkeypatch):
    st = Store(str(tmp_path))
    commit_keys(st, "s", ["a", "b"])
    order = []
    real = maintenance._expire_cutoff

    def spy(meta, *a):
        order.append(meta.location.rsplit("/", 1)[-1])
        return real(meta, *a)

    monkeypatch.setattr(maintenance, "_expire_cutoff", spy)
    expire(st, 0, _floor_s=0)
    assert [t for t in order if t in ("nodes", "edges", "graphs")] == ["nodes", "edges", "graphs"]
    assert order[-1] == "graphs"


def test_vacuum_removes_orphans_and_keeps_every_referenced_file(tmp_path):
    st = Store(str(tmp_path))
    commit_keys(st, "s", ["a", "b", "c"])
    lost = report(st, "s", {"z": "ok"})  # written by a worker that died before reporting: never committed
    uncommitted = {f.file_path.removeprefix("file://") for fs in lost["files"].values() for f in fs}
    assert len(uncommitted) == 3 and all(os.path.exists(p) for p in uncommitted)
    st.write_json("_sweeps/s/plan.json", {"keys": ["a", "b", "c"]})
    strays = [tmp_path / "warehouse" / "notes.txt", tmp_path / "warehouse" / "nodes" / "metadata" / "version-hint.text",
              tmp_path / "_sweeps" / "s" / "plan.json", tmp_path / "catalog.db"]
    for p in strays[:2]:
        p.write_text("keep me")
    c0, before = counts(st), rows(st)
    small = {f.file_path.removeprefix("file://") for t in ("nodes", "edges", "graphs") for f in live_files(st, t)}
    old_snap = st.table("nodes").current_snapshot().snapshot_id
    compact(st, older_than_s=0)

    listing = lambda: {p for t in ("graphs", "nodes", "edges") for p in st.fs.find(f"{st.root}/warehouse/{t}")}  # noqa: E731
    everything = listing()
    dry = vacuum(st, 0, dry_run=True)
    assert dry["dry_run"] and set(dry["paths"]) == uncommitted and dry["files"] == 3 and listing() == everything
    assert vacuum(st)["files"] == 0 and vacuum(st, 3600)["files"] == 0  # all of them younger than the grace period

    # the compacted-away files still belong to a retained snapshot: only the uncommitted files go
    r = vacuum(st, 0)
    assert set(r["paths"]) == uncommitted and not any(os.path.exists(p) for p in uncommitted)
    assert all(os.path.exists(p) for p in small)
    assert st.table("nodes").scan(snapshot_id=old_snap).to_arrow().num_rows == 3

    expire(st, 0, _floor_s=0)
    dry = vacuum(st, 0, dry_run=True)
    assert small <= set(dry["paths"]) and all(os.path.exists(p) for p in small)
    r = vacuum(st, 0)
    assert r["files"] == dry["files"] and r["bytes"] > 0 and not any(os.path.exists(p) for p in small)
    assert any("/metadata/snap-" in p for p in r["paths"])  # the expired snapshots' manifest lists
    # every file the tables name is still there, and every reader reads the same rows
    for t in ("graphs", "nodes", "edges"):
        refs = maintenance._referenced(st.table(t))
        assert refs and all(os.path.exists(p.removeprefix("file://")) for p in refs), t
    assert counts(st) == c0 and rows(st) == before and rows(Store(str(tmp_path))) == before
    assert all(p.exists() for p in strays)  # nothing outside the tables' data/ and metadata/ files
    assert vacuum(st, 0)["files"] == 0
    commit_keys(st, "s", ["d"])
    assert counts(st)["g"] == 4


def test_a_cut_round_is_recovered_by_compact_and_expire_only_after_the_grace_period(tmp_path, monkeypatch):
    from ._helpers import cut_round

    def cut_store(path) -> Store:
        """Key a committed, then a round (b, c) whose driver died between the nodes/edges and the graphs commit."""
        st = Store(str(path))
        commit_keys(st, "s", ["a"])
        cut_round(st, "s", ["b", "c"], monkeypatch, committed={"a"})
        return st

    raw_keys = lambda st: query("SELECT key FROM raw_nodes ORDER BY key", store=st).column("key").to_pylist()  # noqa: E731

    st = cut_store(tmp_path / "c")
    assert raw_keys(st) == ["a", "b", "c"] and n_files(st, "nodes") == 2
    r = compact(st, older_than_s=3600)  # the round may be a live driver's: left alone, and not merged
    assert r["recovered"] == 0 and r["partitions"] == 0 and raw_keys(st) == ["a", "b", "c"]
    r = compact(st, older_than_s=0)
    assert r["recovered"] == 2 and raw_keys(st) == ["a"] and r["partitions"] == 0  # one file left per table
    commit_keys(st, "s", ["b", "c"])  # the re-run
    compact(st, older_than_s=0)
    r = query("SELECT key, count(*) n FROM raw_edges GROUP BY 1 ORDER BY 1", store=st).to_pylist()
    assert r == [{"key": k, "n": 1} for k in "abc"] and n_files(st, "edges") == 1

    st = cut_store(tmp_path / "e")
    assert expire(st)["recovered"] == 0 and expire(st, 3600)["recovered"] == 0 and raw_keys(st) == ["a", "b", "c"]
    assert expire(st, 0, _floor_s=0)["recovered"] == 2 and raw_keys(st) == ["a"]
    assert len(st.table("nodes").metadata.snapshots) == 1


def test_cli_tables_commands(tmp_path, capsys):
    st = small_store(tmp_path / "st")
    c0 = counts(st)
    store = ["--store", str(tmp_path / "st")]
    assert cli_main(["tables", "list", *store]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:6] == ["table", "snapshots", "files", "rows", "bytes", "size"]
    assert any(line.split()[:4] == ["nodes", "8", "8", "8"] for line in out.splitlines()), out
    assert cli_main(["tables", "compact", *store, "--older-than", "0s"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("compacted 8 partition(s) of 5 table(s): 30 files") and len(out.out.splitlines()) == 1
    assert "compacted nodes/s: 5 files" in out.err
    assert cli_main(["tables", "expire", *store, "--older-than", "7d", "--tables", "nodes,edges"]) == 0
    assert capsys.readouterr().out.startswith("expired 0 snapshot(s) of 2 table(s)")
    assert cli_main(["tables", "vacuum", *store, "--older-than", "0s", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("would remove 0 orphan file(s)")
    assert cli_main(["tables", "vacuum", *store, "--older-than", "90m"]) == 0
    assert capsys.readouterr().out.startswith("removed 0 orphan file(s)")
    assert cli_main(["tables", "list", *store, "--tables", "nodes"]) == 0
    assert any(line.split()[:3] == ["nodes", "10", "2"] for line in capsys.readouterr().out.splitlines())
    assert counts(st) == c0
    assert cli_main(["tables", "import", "--store", str(tmp_path / "empty")]) == 0
    assert capsys.readouterr().out.startswith("imported: ")

    for argv, msg in ((["compact", "--older-than", "7x"], "bad duration '7x'"),
                      (["expire", "--older-than", "10m"], "refusing to expire snapshots younger than 1h"),
                      (["vacuum", "--older-than", "1d", "--tables", "nodes,nope"], "unknown table(s) nope"),
                      (["compact", "--target-mb", "0"], "--target-mb must be positive")):
        assert cli_main(["tables", *argv, *store]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ct-ray: error: ") and msg in err and len(err.strip().splitlines()) == 1, err


def test_parse_duration():
    from ct_ray.errors import CTRayError
    from ct_ray.store.cli import parse_duration

    assert [parse_duration(s) for s in ("7d", "3h", "90m", "0s", "1.5h", "45", "2w", "3H")] == \
        [7 * 86400, 3 * 3600, 90 * 60, 0, 5400, 45, 14 * 86400, 3 * 3600]
    for bad in ("", "d", "-1h", "1y", "7 days", "1e3"):
        with pytest.raises(CTRayError):
            parse_duration(bad)


def test_vacuum_refuses_when_another_catalog_writes_the_same_location(tmp_path):
    """Two catalogs, one warehouse: the other's files would all look like orphans here. Nothing is deleted."""
    st = Store(str(tmp_path))
    commit_keys(st, "s", ["a"])
    other = Store(str(tmp_path), catalog=f"sqlite:///{tmp_path}/other.db")
    commit_keys(other, "t", ["b"])
    theirs = {f.file_path.removeprefix("file://") for f in live_files(other, "nodes")}
    from ct_ray.errors import StorageError

    with pytest.raises(StorageError, match="another table .* written through another catalog"):
        vacuum(st, 0)
    assert all(os.path.exists(p) for p in theirs)


def test_maintenance_on_s3(s3):
    st = Store(f"s3://{s3['bucket']}/maint-{uuid.uuid4().hex[:8]}")
    commit_keys(st, "s", ["a", "b", "c"])
    lost = report(st, "s", {"z": "ok"})
    before, c0 = rows(st), counts(st)
    r = compact(st, older_than_s=0)
    assert r["partitions"] == 3 and r["files_before"] == 9 and n_files(st, "nodes") == 1
    assert expire(st, 0, _floor_s=0)["expired"] == 3 * 3
    v = vacuum(st, 0)
    gone = {f.file_path for fs in lost["files"].values() for f in fs}
    assert gone <= set(v["paths"]) and v["files"] >= 3 + 9
    for t in ("graphs", "nodes", "edges"):
        st.fs.invalidate_cache()
        listed = {f"s3://{p}" for p in st.fs.find(f"{st.root}/warehouse/{t}/data")}
        assert listed == {f.file_path for f in live_files(st, t)}, t
    assert rows(st) == before and counts(st) == c0
    assert vacuum(st, 0)["files"] == 0
