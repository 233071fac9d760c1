"""Process-level faults: SIGKILL of the sweep driver (a real `ct-ray sweep` process) then a re-run, and a
simulated 2-node cluster (`ray.cluster_utils.Cluster`) losing a node mid-sweep. Run as a script, this file is the
cluster driver (a separate process: one Ray per process)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from ct_ray.store.tables import Store

N_PROMPTS = 40
PROMPTS = [f"prompt number {i} says" for i in range(N_PROMPTS)]


def _spec_dict(tiny_dir, store, sweep_id, workers=1, **kw):
    return {"sweep_id": sweep_id, "model": str(tiny_dir), "random_clt": {"features": 24, "seed": 3},
            "prompts": PROMPTS, "attribution": {"max_n_logits": 5, "batch_size": 64}, "storage": str(store),
            "resources": {"workers": workers, "num_cpus": 1}, **kw}


def test_sigkill_driver_then_rerun(ray_local, tiny_dir, tmp_path, capsys):
    from ct_ray.cli import main as cli_main
    from ct_ray.store.commit import FAULT_ENV
    from ct_ray.sweep.status import summary_table

    from .test_sweep import check_consistent

    store = tmp_path / "store"
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump(_spec_dict(tiny_dir, store, "drvkill", commit={"every_prompts": 3})))
    gcs = ray_local.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-m", "ct_ray.cli", "sweep", str(spec_path), "--address", gcs,
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, FAULT_ENV: "slow:0.3"})  # >= 13 rounds: the kill lands mid-sweep
    committed = lambda: Store(str(store)).committed("drvkill").column("key").to_pylist()
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (store / "catalog.db").exists() and len(committed()) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)  # the driver dies mid-sweep; its workers die with it
    finally:
        proc.wait(30)
    # only the driver commits: what is committed is fixed the moment it dies (workers' buffers die with them)
    done = committed()
    assert 3 <= len(done) < N_PROMPTS
    capsys.readouterr()
    assert cli_main(["sweep", str(spec_path)]) == 0  # the re-run, with its progress bar, on the session's Ray
    out = capsys.readouterr()
    assert f"{len(done)} already committed, {N_PROMPTS - len(done)} attributed, 0 failed" in out.out
    assert "prompt/s" in out.err or "s/prompt" in out.err  # tqdm's rate
    check_consistent(str(store), "drvkill", N_PROMPTS)
    assert summary_table("drvkill", str(store)).endswith(f"({N_PROMPTS} rows)")


@pytest.mark.parametrize("where", ["before-commit", "before-graphs"])
def test_driver_killed_between_data_files_and_commit(ray_local, tiny_dir, tmp_path, where):
    """The driver is SIGKILLed in its second commit round: after the workers wrote that round's data files and before
    any commit of it ('before-commit'), or after its nodes/edges commits and before its graphs commit
    ('before-graphs'). Those rows are never visible; the re-run recovers, commits each key once, and vacuum removes
    the files no snapshot names (a recovered round's files go once `expire` has dropped the snapshot that added them)."""
    from ct_ray.cli import main as cli_main
    from ct_ray.store.commit import FAULT_ENV
    from ct_ray.store.sql import query

    from .test_sweep import check_consistent

    store = tmp_path / "store"
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump(_spec_dict(tiny_dir, store, "midcommit", commit={"every_prompts": 8})))
    gcs = ray_local.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, "-m", "ct_ray.cli", "sweep", str(spec_path), "--address", gcs, "--no-progress"],
                          capture_output=True, timeout=300, env={**os.environ, FAULT_ENV: f"{where}:1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    done = Store(str(store)).committed("midcommit").column("key").to_pylist()
    assert 8 <= len(done) < N_PROMPTS
    files = lambda t: {p.name for p in (store / "warehouse" / t / "data").rglob("*.parquet")}
    written = files("edges")
    raw = query("SELECT count(DISTINCT key) k FROM raw_edges", str(store)).column("k").to_pylist()[0]
    if where == "before-graphs":  # the round's nodes/edges are committed: the raw view shows them, the views do not
        assert raw > len(done)
    assert query("SELECT count(DISTINCT key) k FROM edges", str(store)).column("k").to_pylist() == [len(done)]
    ok = set(query("SELECT key FROM graphs WHERE status = 'ok'", str(store)).column("key").to_pylist())
    assert set(Store(str(store)).read("edges", "midcommit", columns=["key"]).column("key").to_pylist()) == ok
    if where == "before-graphs":  # other engines see the cut round until a recovery; `tables recover` is one
        assert set(_engine_keys(store, "edges")["pyiceberg"]) > ok
        assert cli_main(["tables", "recover", "--store", str(store), "--older-than", "0s"]) == 0
        for engine, keys in _engine_keys(store, "edges").items():
            assert set(keys) == ok, engine
    assert cli_main(["sweep", str(spec_path)]) == 0
    check_consistent(str(store), "midcommit", N_PROMPTS)
    # no key's rows twice, even in the raw (unfiltered) table
    n = query("SELECT (SELECT count(*) FROM raw_edges) e, (SELECT sum(n_edges_pruned) FROM graphs) g", str(store))
    assert n.column("e").to_pylist() == n.column("g").to_pylist()
    dead = written - {p.rsplit("/", 1)[-1] for p in _live(store, "edges")}
    assert dead  # the dead round's edges file(s): no longer in the current snapshot
    named = {p.rsplit("/", 1)[-1] for p in _named(store, "edges")}
    orphans = dead - named  # written by no commit at all
    if where == "before-commit":
        assert orphans
    assert cli_main(["tables", "vacuum", "--store", str(store), "--older-than", "0s"]) == 0
    assert not (orphans & files("edges"))
    # a round recovered after its nodes/edges commit stays named by that (older) snapshot until `expire` drops it
    assert (dead & named) <= files("edges")
    check_consistent(str(store), "midcommit", N_PROMPTS)


def _engine_keys(store, table) -> dict[str, list[str]]:
    """The keys of a table's rows as engines that read the catalog directly see them (pyiceberg, Polars)."""
    import os

    import polars as pl
    from pyiceberg.catalog import load_catalog

    from ct_ray.store.catalog import CATALOG_NAME

    t = load_catalog(CATALOG_NAME, type="sql", uri=f"sqlite:///{store}/catalog.db").load_table(f"ct_ray.{table}")
    os.environ.setdefault("POLARS_ICEBERG_PLANNER", "pyiceberg")
    return {"pyiceberg": t.scan(selected_fields=("key",)).to_arrow().column("key").to_pylist(),
            "polars": pl.scan_iceberg(t, reader_override="native").select("key").collect()["key"].to_list()}


def _named(store, table):
    from ct_ray.store.maintenance import _referenced
    from ct_ray.store.tables import Store

    return _referenced(Store(str(store)).table(table))


def _live(store, table):
    from ct_ray.store.commit import live_files
    from ct_ray.store.tables import Store

    return {f.file_path for f in live_files(Store(str(store)), table)}


def test_two_node_cluster_loses_a_node(tiny_dir, tmp_path):
    """Head + worker node, one sweep worker on each (SPREAD); the worker node is removed once both produce (or, if
    one is slow to start, after a quarter of the prompts): its actor restarts on the head, its in-flight prompts are
    retried, the sweep completes with every prompt once."""
    from .test_sweep import check_consistent

    store = tmp_path / "store"
    spec = _spec_dict(tiny_dir, store, "twonode", workers=2, retries=3)
    spec["resources"]["spread"] = True
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run([sys.executable, __file__, json.dumps(spec)], capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["removed"] and res["ok"] + res["skipped"] == N_PROMPTS and res["failed"] == 0
    # whether the lost node's actor is restarted (a third worker process) or its prompts simply move to the
    # surviving worker depends on timing; either way every prompt must land exactly once
    assert len(res["pids"]) >= 2 or not res["both"], res
    check_consistent(str(store), "twonode", N_PROMPTS)


def _cluster_main(spec_json: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from ct_ray.sweep import parse_sweep_spec, run_sweep

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "object_store_memory": 128 * 2**20,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                           "health_check_timeout_ms": 1000}})
    node = cluster.add_node(num_cpus=2, object_store_memory=128 * 2**20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    state = {"removed": False, "both": False, "pids": set(), "done": 0}

    def on_event(kind, out):
        if kind == "commit":
            return
        state["pids"].add(out["pid"])
        state["done"] += 1
        # both workers (one per node) producing; or, on a slow machine where one worker is still starting while the
        # other has done a quarter of the sweep, the node goes anyway (its actor is lost while it starts or idles)
        if not state["removed"] and (len(state["pids"]) == 2 or state["done"] >= N_PROMPTS // 4):
            state["both"] = len(state["pids"]) == 2
            cluster.remove_node(node, allow_graceful=False)  # as if the machine died
            state["removed"] = True

    r = run_sweep(parse_sweep_spec(json.loads(spec_json)), on_event=on_event)
    pids = sorted(state["pids"])
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps({"removed": state["removed"], "both": state["both"], "ok": r.ok, "skipped": r.skipped, "failed": r.failed,
                      "pids": pids, "restarts": r.worker_restarts}))


if __name__ == "__main__":
    _cluster_main(sys.argv[1])
else:
    pytestmark = pytest.mark.slow
