"""One driver per sweep (issue 21, item 3): the lease in the catalog, the committer's check that no key is committed
twice, `ct-ray sweep repair`, and two real `ct-ray sweep` processes started at once."""

import os
import subprocess
import sys
import time

import pyarrow as pa
import pytest
import yaml

from ct_ray.cli import main as cli_main
from ct_ray.errors import CTRayError
from ct_ray.store.commit import Committer, append_rows
from ct_ray.store.lease import LeaseLost, SweepLease, duplicated_keys
from ct_ray.store.sql import query
from ct_ray.store.tables import Store
from ct_ray.store.writer import RowBuffer, sweep_writer_configs

pytestmark = pytest.mark.ray  # two `ct-ray sweep` processes, each with its own local Ray

def test_lease_is_exclusive_lapses_and_is_released(tmp_path):
    st = Store(str(tmp_path / "s"))
    a = SweepLease(st, "sw", ttl_s=30).acquire(settle_s=0)
    b = SweepLease(st, "sw", ttl_s=30)
    with pytest.raises(CTRayError, match="being run by another driver"):
        b.acquire(settle_s=0)
    t0 = time.monotonic()
    with pytest.raises(CTRayError, match="lease until"):
        b.acquire(wait_s=1.0, settle_s=0)  # waits, then refuses
    assert time.monotonic() - t0 >= 1.0
    SweepLease(st, "other", ttl_s=30).acquire(settle_s=0).release()  # leases are per sweep
    a.check()
    a.release()
    assert a.read() is None
    b.acquire(settle_s=0)
    with pytest.raises(LeaseLost):
        a.check()
    b.release()
    # a lease whose holder is a dead process of this host is free at once; one of another host when it expires
    for owner, expires in ((f"{b.host}:999999:x", time.time() + 600), ("elsewhere:1:x", time.time() - 1)):
        b._write({"owner": owner, "expires_at": expires})
        SweepLease(st, "sw", ttl_s=30).acquire(settle_s=0).release()
    b._write({"owner": "elsewhere:1:x", "expires_at": time.time() + 600})
    with pytest.raises(CTRayError, match="elsewhere:1:x"):
        SweepLease(st, "sw").acquire(settle_s=0)


def _rows(key: str, n_nodes: int = 3):
    nodes = pa.table({"key": [key] * n_nodes, "node": list(range(n_nodes)), "kind": ["feature"] * n_nodes})
    edges = pa.table({"key": [key] * 2, "source": [0, 1], "target": [1, 2], "weight": [0.5, 0.25]})
    return nodes, edges, [{"key": key, "status": "ok", "n_nodes_pruned": n_nodes, "n_edges_pruned": 2}]


def _report(configs, sid, keys):
    buf = RowBuffer(configs, sid)
    for k in keys:
        n, e, g = _rows(k)
        buf.add("nodes", n)
        buf.add("edges", e)
        buf.add("graphs", g)
        buf.finish("prompts", k, ok=True)
    return buf.flush()


def _exact(st, sid):
    q = lambda s: query(s, store=st).to_pylist()[0]  # noqa: E731
    return q(f"SELECT count(*) AS rows, count(DISTINCT key) AS keys FROM graphs WHERE sweep_id = '{sid}'"), \
        q(f"SELECT count(*) AS n FROM raw_nodes WHERE sweep_id = '{sid}'")["n"], \
        q(f"SELECT count(*) AS n FROM raw_edges WHERE sweep_id = '{sid}'")["n"]


def test_two_committers_racing_never_leave_a_key_twice(tmp_path):
    """The backstop behind the lease: two drivers that both believe they hold the sweep commit overlapping keys; the
    second graphs commit finds them twice, removes every row of them and stops; a re-run computes them once."""
    st = Store(str(tmp_path / "s"))
    configs = sweep_writer_configs(st)
    c1, c2 = Committer(st, "sw"), Committer(st, "sw")
    assert c1.add(_report(configs, "sw", ["a", "b", "c"])) and c2.add(_report(configs, "sw", ["c", "d"]))
    c1.commit()
    with pytest.raises(CTRayError, match="another driver committed 1 of this round's keys"):
        c2.commit()
    assert duplicated_keys(st, "sw") == []
    (g, n, e) = _exact(st, "sw")
    assert g == {"rows": 3, "keys": 3} and (n, e) == (9, 6)  # a, b, d; c removed everywhere
    c3 = Committer(st, "sw", committed_keys={"a", "b", "d"})
    assert c3.add(_report(configs, "sw", ["c"]))
    c3.commit()
    assert _exact(st, "sw") == ({"rows": 4, "keys": 4}, 12, 8)


def test_repair_removes_keys_committed_twice(tmp_path, capsys):
    st = Store(str(tmp_path / "s"))
    for _ in range(2):  # two drivers before the lease existed: every row twice
        for k in ("a", "b"):
            n, e, g = _rows(k)
            append_rows(st, "nodes", "sw", n)
            append_rows(st, "edges", "sw", e)
            append_rows(st, "graphs", "sw", g)
    n, e, g = _rows("c")
    for t, r in (("nodes", n), ("edges", e), ("graphs", g)):
        append_rows(st, t, "sw", r)
    assert cli_main(["sweep", "status", "sw", "--store", st.url]) == 0
    assert "DUPLICATES: 2 graphs row(s)" in capsys.readouterr().out
    assert cli_main(["sweep", "repair", "sw", "--store", st.url]) == 0
    assert "2 key(s) were committed more than once" in capsys.readouterr().out
    assert _exact(st, "sw") == ({"rows": 1, "keys": 1}, 3, 2)
    assert cli_main(["sweep", "repair", "sw", "--store", st.url]) == 0
    assert "0 key(s)" in capsys.readouterr().out


def test_two_sweep_processes_at_once_commit_each_key_once(tiny_dir, tmp_path):
    store = tmp_path / "store"
    spec = {"sweep_id": "twice", "model": str(tiny_dir), "random_clt": {"features": 8, "seed": 1},
            "prompts": [f"The number {i} is" for i in range(8)], "storage": str(store),
            "resources": {"workers": 1, "num_cpus": 1}, "attribution": {"max_n_logits": 3, "batch_size": 64}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "ct_ray.cli", "sweep", str(path), "--no-progress"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=500) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes[0] == 0, outs
    for p, (_so, se) in zip(procs, outs):
        if p.returncode:  # the one that lost: refused by the lease (or stopped by the committer's check), one line
            assert p.returncode == 2 and se.strip().count("\n") == 0 and "another driver" in se, se
    assert subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500).returncode == 0  # finishes
    st = Store(str(store))
    g, n, e = _exact(st, "twice")
    assert g == {"rows": 8, "keys": 8}
    sums = query("SELECT sum(n_nodes_pruned) AS n, sum(n_edges_pruned) AS e FROM graphs WHERE sweep_id = 'twice'",
                 store=st).to_pylist()[0]
    assert (n, e) == (sums["n"], sums["e"])
