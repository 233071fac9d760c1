"""Sweeps into a real S3 endpoint (moto's server on 127.0.0.1), SQL over S3, and an S3 outage mid-sweep."""

import io
import socket
import time

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ct_ray import load_model, random_clt, save_clt
from ct_ray.cli import main as cli_main
from ct_ray.errors import StorageError
from ct_ray.store.sql import query
from ct_ray.store.tables import Store
from ct_ray.sweep import parse_sweep_spec, run_sweep, sweep_status

from .test_sweep import PROMPTS, check_consistent


@pytest.fixture(scope="module")
def s3_clt(s3, tiny_dir):
    url = f"s3://{s3['bucket']}/sweep/clt"
    save_clt(random_clt(load_model(tiny_dir), 24, seed=3, firing_rate=0.15), url)
    return url


def test_sweep_on_s3_with_targets_and_sql(ray_local, s3, tiny_dir, s3_clt, capsys):
    root = f"s3://{s3['bucket']}/sweep/tables"
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": PROMPTS[:6], "next": [" the", None, " 5", "!", "a", " France"]}), buf)
    boto3.client("s3", endpoint_url=s3["endpoint"]).put_object(Bucket=s3["bucket"], Key="sweep/prompts.parquet",
                                                               Body=buf.getvalue())
    spec = parse_sweep_spec({
        "sweep_id": "s3run", "model": str(tiny_dir), "clt": s3_clt, "graph_rows": "full",
        "prompts": {"url": f"s3://{s3['bucket']}/sweep/prompts.parquet", "column": "text", "target_column": "next"},
        "attribution": {"max_n_logits": 5, "batch_size": 64}, "resources": {"workers": 2, "num_cpus": 1},
        "storage": {"url": root, "endpoint_url": s3["endpoint"]}})
    r = run_sweep(spec)
    assert (r.ok, r.failed) == (6, 0)

    # SQL on S3 through the registered fsspec filesystem (DuckDB has no httpfs offline)
    t = query("SELECT prompt, target, target_token, target_prob, target_rank, target_in_graph, n_nodes, n_edges, "
              "n_nodes_pruned FROM graphs WHERE sweep_id = 's3run' ORDER BY prompt_index", root)
    rows = t.to_pylist()
    assert [x["prompt"] for x in rows] == PROMPTS[:6]
    assert rows[1]["target"] is None and rows[1]["target_prob"] is None
    assert rows[0]["target_token"] == ord(" ") and 0 < rows[0]["target_prob"] < 1 and rows[0]["target_rank"] >= 0
    # full graphs stored, pruned subgraph flagged
    c = query("SELECT g.n_nodes, g.n_edges, g.n_nodes_pruned, g.n_edges_pruned, n.n, n.nk, e.e, e.ek "
              "FROM graphs g JOIN (SELECT key, count(*) n, sum(kept::int) nk FROM nodes GROUP BY key) n USING (key) "
              "JOIN (SELECT key, count(*) e, sum(kept::int) ek FROM edges GROUP BY key) e USING (key)", root)
    assert c.num_rows == 6
    for x in c.to_pylist():
        assert (x["n"], x["nk"], x["e"], x["ek"]) == (x["n_nodes"], x["n_nodes_pruned"], x["n_edges"], x["n_edges_pruned"])

    assert sweep_status("s3run", root)["ok"] == 6
    capsys.readouterr()
    assert cli_main(["sql", "--store", root, "--format", "json", "SELECT count(*) AS n FROM graphs"]) == 0
    assert capsys.readouterr().out.strip() == '{"n": 6}'
    assert cli_main(["sweep", "status", "s3run", "--store", root]) == 0
    assert "6/6 committed" in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_outage_mid_sweep_then_resume(ray_local, s3, tiny_dir, s3_clt, tmp_path):
    """Stop the S3 server mid-sweep: the sweep fails with one clear error, readers see no partial objects;
    restart it and re-run: the sweep completes with no duplicates."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="outage")
    root = "s3://outage/tables"
    storage = {"url": root, "endpoint_url": endpoint,
               "options": {"config_kwargs": {"retries": {"max_attempts": 2}, "connect_timeout": 2, "read_timeout": 5}}}
    spec = parse_sweep_spec({"sweep_id": "outage", "model": str(tiny_dir), "random_clt": {"features": 24, "seed": 3},
                             "prompts": PROMPTS, "attribution": {"max_n_logits": 5, "batch_size": 64},
                             "resources": {"workers": 1, "num_cpus": 1}, "storage": storage,
                             "commit": {"every_prompts": 2}})
    stopped = []

    def stop_s3(kind, out):
        if kind == "commit" and not stopped:  # a first round is committed, then the storage goes away
            server.stop()
            server._server.server_close()  # stop() leaves the socket listening (connections would just hang)
            stopped.append(time.monotonic())

    try:
        with pytest.raises(StorageError, match=r"cannot (write|commit|read|open)[^\n]* s3://outage/tables") as e:
            run_sweep(spec, on_event=stop_s3)
        assert "\n" not in str(e.value) and time.monotonic() - stopped[0] < 60
    finally:
        if not stopped:
            server.stop()
            server._server.server_close()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # moto keeps its state
        server.start()
    try:
        opts = spec.storage.storage_options()
        committed = Store(root, **opts).committed("outage").column("key").to_pylist()
        assert 1 <= len(committed) < len(PROMPTS)
        check_consistent(root, "outage", len(committed), **opts)  # only whole, committed rows are visible
        r = run_sweep(spec)
        assert r.skipped == len(committed) and r.ok == len(PROMPTS) - len(committed) and r.failed == 0
        check_consistent(root, "outage", len(PROMPTS), **opts)
    finally:
        server.stop()
        server._server.server_close()
