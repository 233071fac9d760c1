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
    # no params in its row: the sliders open at PruneSpec's defaults, which /api/info also gives (graph files)
    assert g["pruning"] == req(port, "GET", "/api/info")[1]["prune_defaults"] == {"node_threshold": 0.8,
                                                                                   "edge_threshold": 0.98}
    assert req(port, "GET", "/api/graph?sweep=s1&key=nope")[0] == 404
    assert req(port, "GET", "/api/perturbations?sweep=s1&key=" + KEY) == (200, [])
    assert req(port, "GET", "/api/feature?clt_id=none-1&layer=0&feature=1")[0] == 404


def test_graph_pruning_from_params():
    """The thresholds a graph was pruned with (the explorer's sliders open there): a sweep's nested params, flat
    ones, PruneSpec's defaults for what is missing or not a threshold."""
    from ct_ray.explorer.api import graph_pruning

    nested = json.dumps({"attribution": {"max_n_logits": 3}, "pruning": {"node_threshold": 0.5, "edge_threshold": 0.9},
                         "graph_rows": "pruned"})
    assert graph_pruning(nested) == {"node_threshold": 0.5, "edge_threshold": 0.9}
    assert graph_pruning('{"node_threshold": 0.6}') == {"node_threshold": 0.6, "edge_threshold": 0.98}
    for bad in (None, "", "not json", "[1]", '{"pruning": {"node_threshold": 7, "edge_threshold": true}}',
                '{"node_threshold": "0.5"}'):
        assert graph_pruning(bad) == {"node_threshold": 0.8, "edge_threshold": 0.98}, bad


def test_graph_attention_attribution(serve, tmp_path):
    """/api/graph carries the graph's head loadings (columns, like edges) and QK rows (dicts without key/sweep_id);
    both empty while the tables do not exist, or hold nothing for the graph."""
    port = serve()
    g = req(port, "GET", f"/api/graph?sweep=s1&key={KEY}")[1]
    assert g["edge_heads"] == {"source": [], "target": [], "layer": [], "head": [], "weight": []} and g["qk"] == []
    st = Store(str(tmp_path / "store"))
    append_rows(st, "edge_heads", "s1", pa.Table.from_pylist(
        [{"key": KEY, "source": 1, "target": 3, "layer": l, "head": h, "weight": w}
         for l, h, w in ((-1, -1, 0.25), (1, 0, 0.5), (0, 3, 0.375), (-1, -2, -0.125))]
        + [{"key": "other", "source": 1, "target": 3, "layer": 0, "head": 0, "weight": 9.0}]))
    qk = {"target": 1, "layer": 1, "head": 0, "query_position": 1, "key_position": 0, "score": 2.5, "pattern": 0.75}
    append_rows(st, "qk_attributions", "s1", pa.Table.from_pylist(
        [{"key": KEY, **qk, "role": "query", "rank": 0, "query_source": "0_3_1", "key_source": None, "weight": 1.5},
         {"key": KEY, **qk, "role": "pair", "rank": 1, "query_source": "bias", "key_source": "E_5_0", "weight": -0.5},
         {"key": KEY, **qk, "role": "pair", "rank": 0, "query_source": "0_3_1", "key_source": "E_5_0", "weight": 2.0},
         {"key": KEY, **qk, "role": "key", "rank": 0, "query_source": None, "key_source": "E_5_0", "weight": 1.0}]))
    g = req(port, "GET", f"/api/graph?sweep=s1&key={KEY}")[1]
    eh = g["edge_heads"]
    assert eh["source"] == [1] * 4 and eh["target"] == [3] * 4
    assert sorted(zip(eh["layer"], eh["head"], eh["weight"])) == [(-1, -2, -0.125), (-1, -1, 0.25), (0, 3, 0.375),
                                                                  (1, 0, 0.5)]
    assert sum(eh["weight"]) == pytest.approx(1.0)  # the edge's weight
    assert [(r["role"], r["rank"]) for r in g["qk"]] == [("key", 0), ("pair", 0), ("pair", 1), ("query", 0)]
    assert set(g["qk"][0]) == {*qk, "role", "rank", "query_source", "key_source", "weight"}
    assert g["qk"][1] == {**qk, "role": "pair", "rank": 0, "query_source": "0_3_1", "key_source": "E_5_0",
                          "weight": 2.0}


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


# --- the analysis tables: sweep overview, automatic supernodes, graph diffs --------------------------------------
def _analysed(root) -> Store:
    """The store of `_store`, analysed (`analyze`: feature_stats + circuit_paths of s1), with automatic supernodes
    rows for its graph (two methods) and a second sweep s2 sharing the prompt "Hello there"."""
    from ct_ray.analysis.analyze import analyze

    st = _store(root)
    analyze(st, "s1")
    append_rows(st, "supernodes", "s1", pa.Table.from_pylist([
        {"key": KEY, "method": "auto-v1", "supernode": "small", "size": 1, "node_ids": ["E_5_1"], "influence": 0.1,
         "label": "small"},
        {"key": KEY, "method": "auto-v1", "supernode": 'L0-1 → "y"', "size": 2, "node_ids": ["0_3_1", "1_2_1"],
         "influence": -0.9, "label": "big"},
        {"key": KEY, "method": "other", "supernode": "o", "size": 1, "node_ids": ["0_3_1"], "influence": float("nan")},
        {"key": "elsewhere", "method": "auto-v1", "supernode": "x", "size": 1, "node_ids": ["0_3_1"], "influence": 1.0}]))
    append_rows(st, "graphs", "s2", pa.Table.from_pylist([
        {"key": "k2", "prompt_index": 0, "prompt": "Hello there", "status": "ok", "replacement_score_pruned": 0.6},
        {"key": "k3", "prompt_index": 1, "prompt": "only in s2", "status": "ok"}]))
    return st


@pytest.fixture
def serve_analysed(tmp_path):
    servers = []

    def start(**kw):
        _analysed(tmp_path / "store")
        return launch(str(tmp_path / "store"), servers, **kw)

    yield start
    stop(servers)


def test_overview_of_a_sweep_not_analysed(serve):
    port = serve()
    code, o = req(port, "GET", "/api/overview?sweep=s1")
    assert code == 200 and o["analysed"] is False and o["features"] == [] and o["paths"] == []
    assert o["command"].startswith("ct-ray analyze s1 --store ") and (o["graphs"], o["ok"]) == (2, 1)
    h = o["scores"]["completeness"]
    assert len(h["counts"]) == 20 and sum(h["counts"]) == h["n"] == 0 and h["missing"] == 1  # no pruned score stored
    assert req(port, "GET", "/api/overview?sweep=nope")[0] == 404


def test_overview_of_an_analysed_sweep(serve_analysed):
    port = serve_analysed()
    code, o = req(port, "GET", "/api/overview?sweep=s1")
    assert code == 200 and o["analysed"] is True and o["n_features"] == 2
    assert [(f["layer"], f["feature"]) for f in o["features"]] == [(0, 3), (1, 2)]  # ties on prompts: by influence
    f = o["features"][0]
    assert f["node_prefix"] == "0_3_" and f["n_prompts"] == 1 and f["features_id"] is None
    assert f["top_graphs"] == [{"key": KEY, "prompt": "Hello there", "influence": pytest.approx(0.5)}]
    assert {x["token"] for x in o["features"][1]["top_logits"]} == {"x"}
    assert o["n_paths"] == len(o["paths"]) == 2
    p = o["paths"][0]
    assert p["support"] == 1 and p["example"]["key"] == KEY and p["example"]["node_ids"][-1] == "3_7_1"
    assert p["path"].endswith('"x"') and p["mean_score"] > 0
    one = req(port, "GET", "/api/overview?sweep=s1&features=1&paths=1")[1]
    assert len(one["features"]) == len(one["paths"]) == 1 and one["n_features"] == 2
    assert req(port, "GET", "/api/overview?sweep=s2")[1]["analysed"] is False


def test_auto_supernodes_route(serve_analysed):
    port = serve_analysed()
    code, r = req(port, "GET", f"/api/auto-supernodes?sweep=s1&key={KEY}")
    assert code == 200 and r["method"] == "auto-v1" and r["methods"] == ["auto-v1", "other"]
    assert [(s["name"], s["size"], s["nodes"]) for s in r["supernodes"]] == [
        ('L0-1 → "y"', 2, ["0_3_1", "1_2_1"]), ("small", 1, ["E_5_1"])]  # by |influence|
    other = req(port, "GET", f"/api/auto-supernodes?sweep=s1&key={KEY}&method=other")[1]
    assert [s["name"] for s in other["supernodes"]] == ["o"] and other["supernodes"][0]["influence"] is None
    assert req(port, "GET", "/api/auto-supernodes?sweep=s1&key=none1")[1]["supernodes"] == []
    assert req(port, "GET", "/api/auto-supernodes?sweep=s2&key=k2")[1] == {
        "sweep_id": "s2", "key": "k2", "method": None, "methods": [], "supernodes": [], "truncated": False}
    # the hand-made supernodes are another thing, untouched
    assert req(port, "GET", f"/api/supernodes?sweep=s1&key={KEY}")[1] == {"supernodes": []}


def test_diff_route(serve_analysed, tmp_path):
    port = serve_analysed()
    code, d = req(port, "GET", "/api/diff?a=s1&b=s2")
    assert code == 200 and d["diffed"] is False and d["command"].startswith("ct-ray diff s1 s2 --store ")
    assert (d["n_a"], d["n_b"], d["n_common"]) == (1, 2, 1)
    assert d["prompts"] == [{"prompt": "Hello there", "key_a": KEY, "key_b": "k2"}] and d["aggregate"] is None
    assert req(port, "GET", "/api/diff?a=s1&b=s2&q=nothing")[1]["prompts"] == []
    one = req(port, "GET", "/api/diff?a=s1&b=s2&prompt=Hello%20there")[1]
    assert (one["key_a"], one["key_b"], one["row"]) == (KEY, "k2", None)
    assert req(port, "GET", f"/api/diff?a=s1&b=s2&key_a={KEY}")[1]["key_b"] == "k2"
    assert req(port, "GET", "/api/diff?a=s2&b=s1&prompt=only%20in%20s2")[0] == 404  # not in both
    assert req(port, "GET", "/api/diff?a=s1&b=s2&key_a=nope")[0] == 404
    assert req(port, "GET", "/api/diff?a=s1&b=none")[0] == 404
    # what `ct-ray diff s1 s2` writes: one row per prompt and the sweep-level row (prompt null)
    st = Store(str(tmp_path / "store"))
    append_rows(st, "graph_diffs", "s1..s2", pa.Table.from_pylist([
        {"sweep_a": "s1", "sweep_b": "s2", "prompt": "Hello there", "key_a": KEY, "key_b": "k2", "match": "feature",
         "replacement_delta": 0.1, "edge_change_l1": float("nan"), "top_changed_edges": ["L0/F3@1 > L1/F2@1: -0.2 -> 0.4"],
         "n_prompts": None},
        {"sweep_a": "s1", "sweep_b": "s2", "match": "feature", "replacement_delta": 0.1, "n_prompts": 1}]))
    one = req(port, "GET", "/api/diff?a=s1&b=s2&prompt=Hello%20there")[1]
    assert one["diffed"] is True and one["diff_id"] == "s1..s2"
    assert one["row"]["replacement_delta"] == pytest.approx(0.1) and one["row"]["edge_change_l1"] is None
    assert one["row"]["top_changed_edges"] == ["L0/F3@1 > L1/F2@1: -0.2 -> 0.4"] and one["aggregate"]["n_prompts"] == 1
    # the other way round finds the same rows (their sweep_a / sweep_b say which way the deltas go)
    assert req(port, "GET", "/api/diff?a=s2&b=s1&prompt=Hello%20there")[1]["row"]["sweep_a"] == "s1"
    ov = req(port, "GET", "/api/overview?sweep=s2")[1]
    assert [(x["sweep_a"], x["sweep_b"], x["n_prompts"]) for x in ov["diffs"]] == [("s1", "s2", 1)]


@pytest.mark.parametrize("path", [
    "/api/overview", "/api/overview?sweep=../s1", "/api/overview?sweep=s1&features=0",
    "/api/overview?sweep=s1&paths=201", "/api/overview?sweep=s1&features=x",
    f"/api/auto-supernodes?sweep=s1&key={KEY}&method=%3Cb%3E", "/api/auto-supernodes?sweep=s1",
    "/api/auto-supernodes?sweep=s1&key=a/b", "/api/diff?a=s1", "/api/diff?a=s1&b=..",
    "/api/diff?a=s1&b=s2&key_a=../x", "/api/diff?a=s1&b=s2&limit=0", "/api/diff?a=s1&b=s2&limit=501",
    "/api/diff?a=s1&b=s2&prompt=" + "x" * 2001, "/api/diff?a=s1&b=s2&prompt=a%00b", "/api/diff?a=s1&b=s2&q=" + "x" * 201])
def test_analysis_routes_validate(serve, path):
    code, body = req(serve(), "GET", path)
    assert code == 400 and "error" in body, body


def test_a_taken_port_is_one_clear_line(tmp_path, capsys):
    """`ct-ray serve` on a port another process holds: 'cannot listen on ...', not an AttributeError."""
    import socket

    from ct_ray.cli import main as cli_main

    graph = tmp_path / "g.json"
    graph.write_text("{}")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        rc = cli_main(["serve", "--graph-json", str(graph), "--port", str(port)])
    err = capsys.readouterr().err
    assert rc == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "internal error" not in err
    assert len(err.strip().splitlines()) == 1
