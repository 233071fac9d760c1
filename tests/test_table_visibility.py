"""Visibility per data file (store/visibility.py) and the bounded commit cost of a long sweep: rounds whose graphs
commit is missing are hidden from snapshot metadata alone, through merged manifests and expired snapshots; a sweep
expires what recovery does not need; a driver alone never scans the committed keys."""

import pyarrow as pa
import pytest

from ct_ray.store.commit import Committer, recover
from ct_ray.store.sql import query
from ct_ray.store.tables import Store
from ct_ray.store.visibility import round_snapshots

from ._helpers import cut_round
from .test_sql import report


def keys_of(url, sql):
    return sorted(query(sql, url).column("key").to_pylist())


def test_a_cut_round_stays_hidden_through_merged_manifests(tmp_path, monkeypatch):
    url = str(tmp_path)
    st = Store(url)
    cut_round(st, "s", ["x", "y"], monkeypatch, keep_snapshots=0)
    c = Committer(st, "t", keep_snapshots=0)  # another sweep goes on: its appends merge the manifests
    for i in range(20):
        assert c.add(report(st, "t", {f"k{i}": "ok"}))
        c.commit()
    nodes = Store(url).table("nodes")
    assert len(nodes.current_snapshot().manifests(nodes.io)) < 20  # merged (commit.manifest.min-count-to-merge 16)
    assert keys_of(url, "SELECT key FROM nodes WHERE sweep_id = 's'") == []
    assert keys_of(url, "SELECT key FROM raw_nodes WHERE sweep_id = 's'") == ["x", "y"]
    assert query("SELECT count(*) n FROM edges", url).column("n").to_pylist() == [20]
    assert Store(url).read("nodes", "s").num_rows == 0
    assert recover(Store(url)) == 2  # found in the merged manifest: one nodes file, one edges file
    assert keys_of(url, "SELECT key FROM raw_nodes WHERE sweep_id = 's'") == []


def test_expired_graphs_snapshots_keep_confirmed_rounds_visible(tmp_path, monkeypatch):
    """A part snapshot whose graphs snapshot is gone is judged by its first key's graphs row."""
    url = str(tmp_path)
    st = Store(url)
    c = Committer(st, "s", keep_snapshots=0)
    for i in range(3):
        assert c.add(report(st, "s", {f"a{i}": "ok", f"b{i}": "error"}))
        c.commit()
    cut_round(st, "s", ["z"], monkeypatch, keep_snapshots=0)
    g = Store(url).table("graphs")
    old = [s.snapshot_id for s in g.metadata.snapshots if s.snapshot_id != g.metadata.current_snapshot_id]
    g.maintenance.expire_snapshots().by_ids(old).commit()
    assert len(Store(url).table("graphs").metadata.snapshots) == 1
    assert keys_of(url, "SELECT key FROM nodes") == ["a0", "a1", "a2"]
    assert sorted(Store(url).read("edges", "s").column("key").to_pylist()) == ["a0", "a1", "a2"]
    assert recover(Store(url), "s") == 2


def test_a_sweep_expires_what_recovery_does_not_need(tmp_path, monkeypatch):
    url = str(tmp_path)
    st = Store(url)
    cut_round(st, "other", ["q"], monkeypatch, keep_snapshots=0)  # another sweep's cut round: its snapshots must stay
    c = Committer(st, "s", keep_snapshots=4)
    for i in range(30):
        assert c.add(report(st, "s", {f"k{i:02d}": "ok"}))
        c.commit()  # expiry runs every keep/2 rounds
    fresh = Store(url)
    for name in ("nodes", "edges", "graphs"):
        assert len(fresh.table(name).metadata.snapshots) <= 4 + 2, name
    assert {p["ct-ray.sweep"] for p in round_snapshots(fresh.table("nodes")).values()} >= {"other"}
    assert len(keys_of(url, "SELECT key FROM nodes")) == 30
    assert keys_of(url, "SELECT key FROM raw_nodes WHERE sweep_id = 'other'") == ["q"]
    assert recover(fresh, "other") == 2
    assert query("SELECT count(*) n FROM raw_edges", url).column("n").to_pylist() == [30]


def test_a_driver_alone_never_scans_the_committed_keys(tmp_path, monkeypatch):
    """The duplicate check reads the committed keys only when another round of the sweep landed meanwhile."""
    import ct_ray.store.lease as lease

    url = str(tmp_path)
    st = Store(url)
    calls = []
    real = lease.duplicated_keys
    monkeypatch.setattr(lease, "duplicated_keys", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    a = Committer(st, "s")
    for i in range(5):
        assert a.add(report(st, "s", {f"a{i}": "ok"}))
        a.commit()
    assert calls == []
    b = Committer(Store(url), "s")  # a second driver past the lease, racing on key "dup"
    assert a.add(report(st, "s", {"dup": "ok"}))
    assert b.add(report(st, "s", {"dup": "ok"}))
    a.commit()
    from ct_ray.errors import CTRayError

    with pytest.raises(CTRayError, match="another driver"):
        b.commit()
    assert calls
    assert "dup" not in query("SELECT key FROM graphs", url).column("key").to_pylist()
    assert query("SELECT count(*) n FROM raw_edges WHERE key = 'dup'", url).column("n").to_pylist() == [0]


def test_worker_files_are_sorted_by_key(tmp_path):
    """A worker's data file holds its keys in order (stable: a key's rows keep theirs), so row-group statistics
    find one key's rows."""
    import pyarrow.parquet as pq

    from ct_ray.store.writer import RowBuffer, sweep_writer_configs

    st = Store(str(tmp_path))
    buf = RowBuffer(sweep_writer_configs(st), "s")
    for k in ["m", "c", "x", "a"]:
        buf.add("edges", pa.table({"key": [k] * 3, "source": [3, 1, 2], "target": [0, 0, 0], "weight": [1.0] * 3}))
    buf.add("nodes", pa.table({"key": ["b", "a", "b"], "node": [1, 2, 3]}))  # several keys in one part: sorted rows
    files = buf.flush()["files"]
    e = pq.read_table(files["edges"][0].file_path.removeprefix("file://"))
    assert e.column("key").to_pylist() == [k for k in "acmx" for _ in range(3)]
    assert e.column("source").to_pylist() == [3, 1, 2] * 4
    n = pq.read_table(files["nodes"][0].file_path.removeprefix("file://"))
    assert n.column("key").to_pylist() == ["a", "b", "b"] and n.column("node").to_pylist() == [2, 1, 3]
    assert Store(str(tmp_path)).table("edges").sort_order().fields[0].source_id == \
        Store(str(tmp_path)).table("edges").schema().find_field("key").field_id


def test_sql_point_reads_plan_only_the_files_that_can_hold_the_key(tmp_path):
    from ct_ray.store import sql as S

    url = str(tmp_path)
    st = Store(url)
    c = Committer(st, "s")
    for r in range(4):  # rounds of increasing key ranges, as a sweep in key order writes them
        assert c.add(report(st, "s", {f"k{r}{i}": "ok" for i in range(3)}))
        c.commit()
    assert S._point_keys("SELECT * FROM edges WHERE key = 'k21' AND sweep_id = 's'") == ("edges", ["k21"])
    assert S._point_keys("SELECT count(*) FROM raw_nodes n WHERE n.key IN ('a', 'b')") == ("raw_nodes", ["a", "b"])
    for sql in ["SELECT * FROM edges WHERE key = 'a' OR weight > 0", "SELECT * FROM edges WHERE key > 'a'",
                "WITH x AS (SELECT 1) SELECT * FROM edges WHERE key = 'a'", "SELECT * FROM edges, nodes WHERE key = 'a'",
                "SELECT * FROM edges e WHERE other.key = 'a'", "SELECT * FROM edges WHERE key = 1",
                "SELECT key FROM edges WHERE key = 'a' AND weight >= (SELECT avg(weight) FROM edges)",
                "SELECT (SELECT count(*) FROM edges) n FROM edges WHERE key = 'a'"]:
        assert S._point_keys(sql) is None, sql
    assert len(S.data_files(st, "edges", ["k21"])[0]) == 1 < len(S.data_files(st, "edges")[0]) == 4
    for sql in ["SELECT key, source FROM edges WHERE key = 'k21'", "SELECT key FROM nodes n WHERE n.key IN ('k00', 'k32')",
                "SELECT count(*) FROM edges WHERE key = 'nothing'",
                "SELECT (SELECT count(*) FROM edges) n FROM edges WHERE key = 'k21'"]:
        con = S.connect(url)  # every file planned: the reference
        assert query(sql, url).to_pylist() == con.sql(sql).to_arrow_table().to_pylist(), sql
