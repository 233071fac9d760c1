"""`ct-ray serve` without a browser: routes, input validation, read-only mode, path traversal, oversized bodies."""

import http.client
import json
import threading

import pyarrow as pa
import pytest

from ct_ray.cli import build_parser
from ct_ray.explorer.server import MAX_BODY, make_server
from ct_ray.store.commit import append_rows
from ct_ray.store.tables import Store

KEY = "abc123"


def _store(root) -> Store:
    st = Store(str(root))
    nodes = [{"node": i, "node_id": nid, "kind": k, "layer": l, "position": p, "feature": f, "token": 5,
              "token_str": "x", "activation": 1.0, "probability": float("nan") if k != "logit" else 0.9,
              "influence": 0.5, "kept": True}
             for i, (nid, k, l, p, f) in enumerate([("0_3_1", "feature", 0, 1, 3), ("1_2_1", "feature", 1, 1, 2),
                                                    ("E_5_1", "embedding", -1, 1, -1), ("3_7_1", "logit", 2, 1, -1)])]
    append_rows(st, "nodes", "s1", pa.Table.from_pylist([{**n, "key": KEY} for n in nodes]))
    edges = ((2, 0, 0.5), (0, 1, -0.2), (1, 3, 1.0))
    append_rows(st, "edges", "s1", pa.Table.from_pylist(
        [{"key": KEY, "source": s, "target": t, "weight": w, "kept": True} for s, t, w in edges]))
    append_rows(st, "graphs", "s1", pa.Table.from_pylist([{
        "key": KEY, "prompt_index": 0, "prompt": "Hello there", "status": "ok", "clt": "random(x)", "n_tokens": 2,
        "token_strs": ["<s>", "x"], "completeness_score": 0.7, "replacement_score": 0.5, "top_token_str": "y"}]))
    append_rows(st, "graphs", "s1", pa.Table.from_pylist([{
        "key": "bad1", "prompt_index": 1, "prompt": "", "status": "error", "error": "empty prompt"}]))
    return st


def launch(store: str, servers: list, **kw) -> int:
    """make_server on an ephemeral port of 127.0.0.1, served on a thread; its port. The caller stops `servers`."""
    srv = make_server(store, **{"port": 0, **kw})
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    servers.append(srv)
    return srv.server_address[1]


def stop(servers: list):
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(**kw):
        _store(tmp_path / "store")
        return launch(str(tmp_path / "store"), servers, **kw)

    yield start
    stop(servers)


def req(port, method, path, body=None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.putrequest(method, path, skip_accept_encoding=True, skip_host="Host" in (headers or {}))
    for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
        c.putheader(k, v)
    if body is not None and "Content-Length" not in (headers or {}):
        c.putheader("Content-Length", str(len(body)))
    c.endheaders()
    if body is not None:
        c.send(body)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, (json.loads(data) if r.getheader("Content-Type", "").startswith("application/json") else data)


def test_default_bind_is_loopback(tmp_path):
    args = build_parser().parse_args(["serve", "--store", str(tmp_path)])
    assert (args.host, args.port, args.allow_write) == ("127.0.0.1", 8000, False)
    srv = make_server(str(tmp_path), port=0)
    try:
        assert srv.server_address[0] == "127.0.0.1"
    finally:
        srv.server_close()


def test_api_lists_filters_and_serves_a_graph(serve):
    port = serve()
    assert req(port, "GET", "/api/info")[1]["writable"] is False
    assert [s["sweep_id"] for s in req(port, "GET", "/api/sweeps")[1]] == ["s1"]
    assert [r["key"] for r in req(port, "GET", "/api/graphs")[1]] == [KEY, "bad1"]
    assert [r["key"] for r in req(port, "GET", "/api/graphs?q=HELLO")[1]] == [KEY]
    assert [r["key"] for r in req(port, "GET", "/api/graphs?status=error")[1]] == ["bad1"]
    assert req(port, "GET", "/api/graphs?min_completeness=0.8")[1] == []
    code, g = req(port, "GET", f"/api/graph?sweep=s1&key={KEY}")
    assert code == 200 and len(g["nodes"]) == 4 and g["edges"]["weight"] == pytest.approx([0.5, -0.2, 1.0])
    assert g["nodes"][0]["probability"] is None  # NaN is not JSON
    assert req(port, "GET", "/api/graph?sweep=s1&key=nope")[0] == 404
    assert req(port, "GET", "/api/perturbations?sweep=s1&key=" + KEY) == (200, [])
    assert req(port, "GET", "/api/feature?clt_id=none-1&layer=0&feature=1")[0] == 404


@pytest.mark.parametrize("path", ["/api/graph?sweep=../x&key=" + KEY, "/api/graph?sweep=s1&key=a/b",
                                  "/api/graphs?min_completeness=abc", "/api/graphs?status=maybe",
                                  "/api/feature?clt_id=x&layer=one&feature=2", "/api/graphs?limit=x"])
def test_bad_query_is_400(serve, path):
    code, body = req(serve(), "GET", path)
    assert code == 400 and "error" in body


@pytest.mark.parametrize("path", ["/static/../../../etc/passwd", "/static/%2e%2e/%2e%2e/etc/passwd",
                                  "/static/%252e%252e/%252e%252e/etc/passwd", "/static/..%2f..%2fserver.py",
                                  "/static/..\\..\\server.py", "/../api.py", "/static/%2e%2e%5capi.py"])
def test_path_traversal_is_refused(serve, path):
    code, body = req(serve(), "GET", path)
    assert code in (400, 404)
    assert b"import" not in (body if isinstance(body, bytes) else json.dumps(body).encode())


def test_static_page_and_missing_file(serve):
    port = serve()
    code, body = req(port, "GET", "/")
    assert code in (200, 503)  # 503 when the page was not built (make setup)
    assert req(port, "GET", "/static/nope.js")[0] == 404
    assert req(port, "GET", "/", headers={"Host": "evil.example:80"})[0] == 403  # DNS rebinding


def test_supernodes_read_only_by_default(serve):
    port = serve()
    body = json.dumps({"supernodes": [{"name": "g", "nodes": ["0_3_1"]}]}).encode()
    code, r = req(port, "PUT", f"/api/supernodes?sweep=s1&key={KEY}", body)
    assert code == 403 and "--allow-write" in r["error"]
    assert req(port, "POST", "/api/supernodes", b"{}")[0] == 405


def test_supernodes_saved_and_validated(serve, tmp_path):
    port = serve(allow_write=True)
    url = f"/api/supernodes?sweep=s1&key={KEY}"
    good = {"supernodes": [{"name": "say y", "nodes": ["0_3_1", "1_2_1"]}, {"name": "emb", "nodes": ["E_5_1"]}]}
    assert req(port, "PUT", url, json.dumps(good).encode()) == (200, good)
    assert req(port, "GET", url)[1] == good
    assert req(port, "GET", f"/api/graph?sweep=s1&key={KEY}")[1]["supernodes"] == good["supernodes"]
    bad = [b"not json", json.dumps({"supernodes": "x"}).encode(),
           json.dumps({"supernodes": [{"name": "<script>", "nodes": ["0_3_1"]}]}).encode(),
           json.dumps({"supernodes": [{"name": "a", "nodes": ["../../x"]}]}).encode(),
           json.dumps({"supernodes": [{"name": "a", "nodes": ["9_9_9"]}]}).encode(),  # not in the graph
           json.dumps({"supernodes": [{"name": "a", "nodes": ["0_3_1"]}, {"name": "a", "nodes": ["1_2_1"]}]}).encode(),
           json.dumps({"supernodes": [{"name": "a", "nodes": []}]}).encode(),
           json.dumps({"supernodes": [{"name": "a", "nodes": ["0_3_1"], "x": 1}]}).encode()]
    for b in bad:
        code, r = req(port, "PUT", url, b)
        assert code == 400, (b, r)
    assert req(port, "PUT", "/api/supernodes?sweep=s1&key=../../etc", json.dumps(good).encode())[0] == 400
    assert req(port, "GET", url)[1] == good  # unchanged by the refused requests
    assert req(port, "PUT", url, b"{}", headers={"Content-Type": "text/plain"})[0] == 415


def test_oversized_body_is_413(serve):
    port = serve(allow_write=True)
    code, r = req(port, "PUT", f"/api/supernodes?sweep=s1&key={KEY}", b"",
                  headers={"Content-Length": str(MAX_BODY + 1)})
    assert code == 413
    big = json.dumps({"supernodes": [{"name": "a", "nodes": ["0_3_1"] * 200_000}]}).encode()
    assert len(big) > MAX_BODY
    assert req(port, "PUT", f"/api/supernodes?sweep=s1&key={KEY}", big)[0] == 413


def test_graph_json_route(serve, tmp_path):
    f = tmp_path / "g.json"
    f.write_text(json.dumps({"metadata": {"prompt": "p"}, "nodes": [], "links": []}))
    port = serve(graph_json=str(f))
    assert req(port, "GET", "/api/graph-json")[1]["metadata"]["prompt"] == "p"
    from ct_ray.cli import main

    assert main(["serve", "--store", str(tmp_path), "--graph-json", str(tmp_path / "missing.json")]) == 2
