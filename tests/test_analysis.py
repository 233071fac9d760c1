"""`ct-ray analyze` (ct_ray/analysis): feature_stats and circuit_paths of a real sweep on tiny models, checked against
an independent computation (SQL for the aggregates, exhaustive path enumeration for the paths), idempotent, the same
in-process and as Ray tasks."""

import itertools
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from ct_ray import load_model, random_clt, save_clt
from ct_ray.analysis.analyze import analyze
from ct_ray.cli import main as cli_main
from ct_ray.store.sql import query
from ct_ray.store.tables import Store
from ct_ray.sweep import parse_sweep_spec, run_sweep

PROMPTS = ["The capital of France is", "The capital of Spain is", "One two three four", "The cat sat on the",
           "The capital of Italy is", "Red green blue"]


@pytest.fixture(scope="module")
def store(ray_local, tiny_dir, tmp_path_factory):
    lm = load_model(tiny_dir)
    clt = tmp_path_factory.mktemp("an_clt") / "clt"
    save_clt(random_clt(lm, 24, seed=5, firing_rate=0.2), str(clt))
    url = tmp_path_factory.mktemp("an_store") / "store"
    spec = {"sweep_id": "a1", "model": str(tiny_dir), "clt": str(clt), "prompts": PROMPTS + [""],
            "storage": str(url), "resources": {"workers": 1, "num_cpus": 1},
            "attribution": {"max_n_logits": 4, "batch_size": 64}}
    r = run_sweep(parse_sweep_spec(spec))
    assert (r.ok, r.failed) == (len(PROMPTS), 1)
    return str(url)


def _paths_brute(nodes: list[dict], edges: list[dict], max_hops: int) -> dict[str, float]:
    """Every feature -> ... -> logit path of the kept graph and its score, best per signature: by enumeration."""
    nodes = [n for n in nodes if n["kept"] is not False]
    by = {n["node"]: n for n in nodes}
    edges = [e for e in edges if e["kept"] is not False and e["source"] in by and e["target"] in by]
    tot: dict[int, float] = {}
    for e in edges:
        tot[e["target"]] = tot.get(e["target"], 0.0) + abs(e["weight"])
    inc: dict[int, list] = {}
    for e in edges:
        if by[e["source"]]["kind"] == "feature" and abs(e["weight"]) > 0:
            inc.setdefault(e["target"], []).append((e["source"], abs(e["weight"]) / tot[e["target"]]))
    best: dict[str, float] = {}

    def walk(head, score, rows):
        if len(rows) > 1:
            sig = " > ".join([*(f"L{by[r]['layer']}/F{by[r]['feature']}" for r in rows[:-1]),
                              json.dumps(by[rows[-1]]["token_str"], ensure_ascii=False)])
            best[sig] = max(best.get(sig, 0.0), score)
        if len(rows) <= max_hops:
            for s, a in inc.get(head, []):
                walk(s, score * a, [s, *rows])

    for n in nodes:
        if n["kind"] == "logit" and n["probability"] and n["probability"] > 0:
            walk(n["node"], n["probability"], [n["node"]])
    return best


def test_feature_stats_match_sql(store):
    r = analyze(Store(store), "a1")
    assert r["graphs"] == len(PROMPTS) and r["features"] > 0
    st = Store(store)
    mine = {(x["layer"], x["feature"]): x for x in st.read("feature_stats", "a1").to_pylist()}
    ref = query("""SELECT layer, feature, count(DISTINCT key) AS n, count(*) AS nodes, max(activation) AS amax,
                          avg(activation) AS amean, sum(influence) AS inf
                   FROM nodes WHERE sweep_id = 'a1' AND kind = 'feature' GROUP BY layer, feature""", store=st).to_pylist()
    assert len(mine) == len(ref) == r["features"]
    for x in ref:
        m = mine[(x["layer"], x["feature"])]
        assert (m["n_prompts"], m["n_nodes"]) == (x["n"], x["nodes"])
        assert m["activation_max"] == pytest.approx(x["amax"], rel=1e-6)
        assert m["activation_mean"] == pytest.approx(x["amean"], rel=1e-5)
        assert m["influence_sum"] == pytest.approx(x["inf"], rel=1e-5, abs=1e-9)
        assert m["node_prefix"] == f"{x['layer']}_{x['feature']}_" and m["frac_prompts"] == pytest.approx(x["n"] / 6)
        assert m["top_keys"] and len(m["top_keys"]) == len(m["top_key_influence"]) <= 5
        assert m["top_key_influence"] == sorted(m["top_key_influence"], reverse=True)
    # pushes: the sum of a feature's direct edges into each logit node, by token (checked for every feature)
    push = query("""SELECT s.layer, s.feature, t.token_str AS tok, sum(e.weight) AS w FROM edges e
                    JOIN nodes s ON s.key = e.key AND s.node = e.source AND s.kind = 'feature'
                    JOIN nodes t ON t.key = e.key AND t.node = e.target AND t.kind = 'logit'
                    WHERE e.sweep_id = 'a1' GROUP BY ALL""", store=st).to_pylist()
    want: dict = {}
    for p in push:
        want.setdefault((p["layer"], p["feature"]), {})[p["tok"]] = p["w"]
    for f, m in mine.items():
        ranked = sorted(want.get(f, {}).items(), key=lambda kv: -abs(kv[1]))[:5]
        assert [abs(w) for w in m["top_logit_weights"]] == pytest.approx([abs(w) for _, w in ranked], rel=1e-5)


def test_paths_equal_exhaustive_enumeration(store):
    st = Store(store)
    r = analyze(st, "a1", top_paths=1000, max_hops=3, write=False)
    paths = r["circuit_paths"].to_pylist()
    nodes = st.read("nodes", "a1").to_pylist()
    edges = st.read("edges", "a1").to_pylist()
    keys = {n["key"] for n in nodes}
    checked = 0
    for k in keys:
        brute = _paths_brute([n for n in nodes if n["key"] == k], [e for e in edges if e["key"] == k], 3)
        mine = {p["path"]: p for p in paths if p["key"] == k}
        # the beam (64 per hop) finds every path of these small graphs whose score is among the best 64 per hop
        top = sorted(brute.items(), key=lambda kv: -kv[1])[:20]
        for sig, score in top:
            assert sig in mine and mine[sig]["score"] == pytest.approx(score, rel=1e-5), (k, sig)
        ranks = [p["rank"] for p in sorted(mine.values(), key=lambda p: -p["score"])]
        assert ranks == list(range(len(mine)))
        checked += len(top)
    assert checked > 20
    # support: graphs holding the signature; mean score over them
    for _sig, grp in itertools.groupby(sorted(paths, key=lambda p: p["path"]), key=lambda p: p["path"]):
        grp = list(grp)
        assert {p["support"] for p in grp} == {len({p["key"] for p in grp})}
        assert grp[0]["mean_score"] == pytest.approx(np.mean([p["score"] for p in grp]), rel=1e-5)
        assert grp[0]["hops"] == len(grp[0]["layers"]) == len(grp[0]["node_ids"]) - 1


def test_rerun_replaces_and_ray_tasks_agree(store, capsys):
    st = Store(store)
    a = analyze(st, "a1")
    n = (st.read("feature_stats", "a1").num_rows, st.read("circuit_paths", "a1").num_rows)
    assert n == (a["features"], a["paths"])
    b = analyze(st, "a1", workers=2, unit_graphs=2)  # 3 units as Ray tasks
    assert b["units"] >= 3
    assert (st.read("feature_stats", "a1").num_rows, st.read("circuit_paths", "a1").num_rows) == n  # replaced
    fa = a["feature_stats"].sort_by([("layer", "ascending"), ("feature", "ascending")]).to_pylist()
    fb = b["feature_stats"].sort_by([("layer", "ascending"), ("feature", "ascending")]).to_pylist()
    assert [(x["layer"], x["feature"], x["n_prompts"], x["top_keys"]) for x in fa] == \
           [(x["layer"], x["feature"], x["n_prompts"], x["top_keys"]) for x in fb]
    assert all(x["influence_sum"] == pytest.approx(y["influence_sum"], rel=1e-9) for x, y in zip(fa, fb))
    pa_, pb_ = (sorted((p["key"], p["rank"], p["path"], p["support"]) for p in t["circuit_paths"].to_pylist())
                for t in (a, b))
    assert pa_ == pb_
    rc = cli_main(["sql", "--store", store, "SELECT count(*) AS n FROM circuit_paths WHERE sweep_id = 'a1'"])
    assert rc == 0 and str(n[1]) in capsys.readouterr().out


def test_cli(store, capsys):
    rc = cli_main(["analyze", "a1", "--store", store, "--no-progress", "--show", "3"])
    out = capsys.readouterr().out
    assert rc == 0 and f"analysed {len(PROMPTS)} graph(s) of sweep a1" in out and "most recurring features" in out
    for argv, msg in [(["analyze", "nope", "--store", store], "no committed graphs in sweep 'nope'"),
                      (["analyze", "../a1", "--store", store], "not a safe name"),
                      (["analyze", "a1", "--store", store, "--max-hops", "0"], "--max-hops"),
                      (["analyze", "a1", "--store", store + "-missing"], "no store at")]:
        rc = cli_main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and err.count("\n") == 1, (argv, err)


def test_a_sweep_refuses_a_second_plan(store, tiny_dir, tmp_path):
    """Issue 22 item 5: one sweep id, one model/CLT/params; --new-plan removes the old rows and starts over."""
    from ct_ray.errors import CTRayError

    def spec(seed):
        return parse_sweep_spec({"sweep_id": "p1", "model": str(tiny_dir), "prompts": PROMPTS[:2], "storage": store,
                                 "random_clt": {"features": 16, "seed": seed}, "resources": {"workers": 1, "num_cpus": 1},
                                 "attribution": {"max_n_logits": 4, "batch_size": 64}})

    assert run_sweep(spec(1)).ok == 2
    assert run_sweep(spec(1)).skipped == 2  # the same plan resumes
    with pytest.raises(CTRayError, match="another plan .*clt random.*seed=1.*seed=2.*--new-plan"):
        run_sweep(spec(2))
    st = Store(store)
    analyze(st, "p1")
    assert st.read("feature_stats", "p1").num_rows
    r = run_sweep(spec(2), new_plan=True)
    assert (r.ok, r.skipped) == (2, 0)
    g = st.read("graphs", "p1").to_pylist()
    assert len(g) == 2 and {x["clt"] for x in g} == {spec(2).clt_id()}
    assert st.read("feature_stats", "p1").num_rows == 0  # the old plan's analysis went with its rows
    nodes = st.read("nodes", "p1", columns=["key"]).column("key").to_pylist()
    assert set(nodes) == {x["key"] for x in g}


def test_supernodes_of_a_sweep(store):
    """analyze --supernodes: each graph's automatic groups (the same as auto_supernodes_rows on its rows, with its
    CLT) and the sweep's consensus groups, in the supernodes table; re-running replaces them."""
    from ct_ray.analysis.auto_supernodes import auto_supernodes_rows
    from ct_ray.analysis.diff import load_decoders

    st = Store(store)
    r = analyze(st, "a1", supernodes=True)
    rows = st.read("supernodes", "a1").to_pylist()
    assert len(rows) == r["supernodes"].num_rows > 0
    graph_rows = [x for x in rows if x["key"] is not None]
    assert graph_rows and all(x["method"] == "auto-v1" and x["size"] == len(x["node_ids"]) >= 2 for x in graph_rows)
    g = st.read("graphs", "a1").to_pylist()
    clt = load_decoders(g[0]["clt"], g[0]["model"])
    for key in {x["key"] for x in graph_rows}:
        n, e = st.read("nodes", "a1", keys=[key]), st.read("edges", "a1", keys=[key])
        want = auto_supernodes_rows(n, e, clt=clt)
        assert [(s.name, list(s.nodes)) for s in want.supernodes] == \
               [(x["supernode"], x["node_ids"]) for x in graph_rows if x["key"] == key]
    for x in (x for x in rows if x["key"] is None):  # consensus groups: features of several graphs' groups
        assert x["method"] == "auto-v1-consensus" and x["size"] == len(x["features"]) >= 2 and not x["node_ids"]
    # ct-ray export carries them as Neuronpedia's qParams.supernodes when the explorer saved no grouping
    from ct_ray.attribution.export_files import export_sweep

    key = graph_rows[0]["key"]
    out = Path(tempfile.mkdtemp())
    export_sweep(st, "a1", str(out), keys=[key])
    q = json.loads((out / f"a1-{key}.json").read_text())["qParams"]
    assert q["supernodes"] == [[x["supernode"], *x["node_ids"]] for x in graph_rows if x["key"] == key]
    analyze(st, "a1", supernodes=True)
    assert st.read("supernodes", "a1").num_rows == len(rows)
    analyze(st, "a1")  # without --supernodes the table is left as it is
    assert st.read("supernodes", "a1").num_rows == len(rows)


def test_consensus_groups_join_features_co_grouped_across_graphs():
    import pyarrow as pa

    from ct_ray.analysis.stats import decode_feature, feature_code
    from ct_ray.analysis.sweep_supernodes import sweep_groups

    f = feature_code(0, [1, 1, 2, 3, 4], [5, 6, 7, 8, 9])  # sorted codes
    n_prompts, infl = np.array([4, 4, 4, 10, 10]), np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    pairs = pa.table({"a": [f[0], f[1], f[0], f[3]], "b": [f[1], f[2], f[2], f[4]], "n": [3, 2, 2, 1]})  # f3-f4: once
    t = sweep_groups(pairs, f, n_prompts, infl, decode_feature, ["clt"], lambda i: "→ 'x'").to_pylist()
    assert len(t) == 1 and t[0]["key"] is None and t[0]["layers"] == [1, 1, 2] and t[0]["features"] == [5, 6, 7]
    assert t[0]["influence"] == pytest.approx(0.6) and t[0]["supernode"] == "L1-2 → 'x'"
    # a chain (f0-f1, f1-f2 linked, f0-f2 never co-grouped) does not join f0 and f2 through f1
    chain = pa.table({"a": [f[0], f[1]], "b": [f[1], f[2]], "n": [3, 2]})
    t = sweep_groups(chain, f, n_prompts, infl, decode_feature, ["clt"], lambda i: "").to_pylist()
    assert [x["features"] for x in t] == [[5, 6]]
    rare = pa.table({"a": [f[3]], "b": [f[4]], "n": [4]})  # 4 of 10 graphs: below the consensus of 0.5
    assert sweep_groups(rare, f, n_prompts, infl, decode_feature, ["clt"], lambda i: "").num_rows == 0
