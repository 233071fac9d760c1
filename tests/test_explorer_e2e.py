"""The explorer in headless Debian Chromium (playwright-core from web/node_modules drives /usr/bin/chromium) against
`ct-ray serve` on a tiny sweep built here with the sweep runner and `ct-ray features` (tiny model, random CLT), with
attention attribution (head loadings, QK), its analysis (`analyze`: feature_stats, circuit_paths), automatic
supernodes and a second sweep (no attention attribution) diffed against it."""

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from ct_ray.explorer.server import STATIC_DIR, make_server
from ct_ray.store.tables import Store

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "web"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def _skip_reason():
    if not shutil.which("node"):
        return "node is not installed (CI installs it; see .ci/run)"
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is missing (.ci/run installs Debian's chromium)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


@pytest.fixture(scope="module")
def tiny_sweep(ray_local, tiny_dir, tmp_path_factory):
    """A two-prompt sweep with perturbations, head loadings and QK, and the feature dashboards of its (random) CLT."""
    if not (WEB / "node_modules" / "playwright-core").is_dir() or not os.path.exists(os.path.join(STATIC_DIR, "app.js")):
        pytest.fail("the explorer page is not built: run `make setup` (npm ci + build in web/)")
    from ct_ray.features import parse_features_spec, run_features
    from ct_ray.sweep import parse_sweep_spec, run_sweep

    tmp = tmp_path_factory.mktemp("explorer")
    store = str(tmp / "store")
    rclt = {"features": 24, "seed": 3, "firing_rate": 0.15}
    spec = parse_sweep_spec({"sweep_id": "tiny", "model": str(tiny_dir), "random_clt": rclt, "storage": store,
                             "prompts": ["The cat sat on the", "Paris is in"], "resources": {"workers": 1, "num_cpus": 1},
                             "attribution": {"max_n_logits": 8, "batch_size": 64, "heads": True, "qk": True},
                             "perturbation": {"top_k": 3, "interventions": [{"op": "scale", "value": -1},
                                                                            {"op": "scale", "value": -1, "mode": "free"}]}})
    r = run_sweep(spec)
    assert r.ok == 2
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(f"The cat sat on the mat {i} times, and Paris is in France." for i in range(10)))
    run_features(parse_features_spec({"model": str(tiny_dir), "random_clt": rclt, "corpus": [str(corpus)],
                                      "context_len": 16, "n_contexts": 12, "top_k": 4, "window": 8, "storage": store}))
    # a second sweep of the same model and CLT, pruned harder, sharing two prompts: for the diff view
    spec_b = parse_sweep_spec({"sweep_id": "tiny-b", "model": str(tiny_dir), "random_clt": rclt, "storage": store,
                               "prompts": ["Paris is in", "The cat sat on the", "A dog ran"],
                               "resources": {"workers": 1, "num_cpus": 1}, "pruning": {"node_threshold": 0.5},
                               "attribution": {"max_n_logits": 3, "batch_size": 64}})
    assert run_sweep(spec_b).ok == 3
    st = Store(store)
    g = st.read("graphs", "tiny").to_pylist()
    row = next(x for x in g if x["prompt"] == "The cat sat on the")
    _analyse(st, row["key"])
    return {"store": store, "row": row, "tmp": tmp, "model": str(tiny_dir), "rclt": rclt}


def _analyse(st, key):
    """feature_stats + circuit_paths of 'tiny' (`ct-ray analyze`), automatic supernodes of one of its graphs (the
    supernodes table) and the graph diffs of 'tiny' vs 'tiny-b' (`ct-ray diff`). 'tiny-b' stays unanalysed."""
    import pyarrow.compute as pc

    from ct_ray.analysis.analyze import analyze
    from ct_ray.analysis.auto_supernodes import auto_supernodes_rows, supernode_rows
    from ct_ray.analysis.diff import diff_sweeps
    from ct_ray.store.commit import append_rows

    r = analyze(st, "tiny")
    assert r["features"] > 0 and r["paths"] > 0
    nodes, edges = st.read("nodes", "tiny", keys=[key]), st.read("edges", "tiny", keys=[key])
    sset = auto_supernodes_rows(nodes, edges, threshold=0.9)
    if not sset.supernodes:  # a random CLT can leave nothing alike: two groups by layer instead, the same row format
        from ct_ray.perturb.supernodes import SupernodeSet

        feats = nodes.filter(pc.equal(nodes.column("kind"), "feature")).to_pylist()
        by_layer: dict = {}
        for n in feats:
            by_layer.setdefault(n["layer"], []).append(n["node_id"])
        sset = SupernodeSet.model_validate({"supernodes": [{"name": f"layer {l}", "nodes": ids}
                                                           for l, ids in sorted(by_layer.items()) if ids]})
    append_rows(st, "supernodes", "tiny", supernode_rows(sset, nodes, key=key))
    d = diff_sweeps(st, "tiny", "tiny-b")
    assert d["n_prompts"] == 2


def _graph_json(sweep, path):
    """The same prompt's pruned graph as circuit-tracer / Neuronpedia JSON (what ct-ray attribute --heads --out
    writes: links with their head loadings)."""
    from ct_ray import attribute, load_model, random_clt
    from ct_ray.attribution.attention import attention_attribution
    from ct_ray.attribution.export import graph_json

    lm = load_model(sweep["model"])
    r = sweep["rclt"]
    clt = random_clt(lm, r["features"], seed=r["seed"], firing_rate=r["firing_rate"])
    p = attribute(lm, clt, "The cat sat on the", max_n_logits=3, batch_size=64).prune()
    data = graph_json(p, attention=attention_attribution(lm, clt, p))
    path.write_text(json.dumps(data))
    return data


def test_explorer_in_chromium(tiny_sweep):
    srv = make_server(tiny_sweep["store"], port=0, allow_write=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    row = tiny_sweep["row"]
    gj = _graph_json(tiny_sweep, tiny_sweep["tmp"] / "graph.json")
    st = Store(tiny_sweep["store"])
    attn = _attention_case(st, row["key"])
    try:
        p = subprocess.run(["node", "e2e/explorer.mjs", f"http://127.0.0.1:{srv.server_address[1]}", "tiny", row["key"],
                            os.environ.get("CT_RAY_SCREENSHOTS", ""), str(tiny_sweep["tmp"] / "graph.json"), "tiny-b",
                            json.dumps(attn["arg"])],
                           cwd=WEB, capture_output=True, text=True, timeout=150, env={**os.environ, "CHROMIUM": CHROMIUM})
    finally:
        srv.shutdown()
        srv.server_close()
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["errors"] == []
    assert out["listed"] == 5  # both sweeps
    # it opens pruned at the thresholds the sweep pruned with (PruneSpec's defaults): ct_ray's pruning rule over the
    # stored rows, then the strongest edges up to 98% of |weight|
    assert out["opened_sliders"] == {"th": [0.8, 0.98], "values": [0.8, 0.98], "shown": ["0.80", "0.98"]}
    assert out["opened"] == expected_view(st, "tiny", row["key"], 0.8, 0.98)
    assert out["opened"][0] < row["n_nodes_pruned"]
    check_labels(out["labels"], min_labels=5)
    # at 1: the stored (pruned) graph, whole: every node and edge of its rows
    assert out["full"] == [row["n_nodes_pruned"], row["n_edges_pruned"]]
    assert out["restored"] == out["full"]
    assert out["node_th"][0] < out["full"][0] and out["both_th"][1] < out["node_th"][1]
    # a feature's dashboard: top contexts with the max token highlighted
    assert out["top_contexts"] > 0 and out["highlighted_tokens"] == out["top_contexts"]
    assert "density" in out["feature_text"]
    # supernodes: saved to the store (server started with --allow-write) and shown again after a reload
    assert out["selected"] == "selected: 2" and out["save_status"] == "saved"
    assert out["after_reload"] == ["my group (2)"] and len(out["in_supernode"]) == 2
    # perturbation results: one predicted-vs-measured point per measured row, constrained and free rows apart
    _check_perturbations(out, st.read("perturbations", "tiny", keys=[row["key"]]).to_pylist())
    # a graph JSON file opened in the page: the same graph as the export holds, opened where the viewers open it
    md = gj["metadata"]
    assert out["file_total"] == out["file"] == [len(gj["nodes"]), len(gj["links"])]
    assert out["file_sliders"]["th"] == [md["node_threshold"], md["pruning_settings"]["edge_threshold"]] == [
        md["node_threshold"], 0.98]
    assert out["file_opened"][0] == sum(n["feature_type"] in ("embedding", "logit") or n["influence"] <= md["node_threshold"]
                                        for n in gj["nodes"]) < len(gj["nodes"])
    check_labels(out["file_labels"], min_labels=3)
    assert out["file_edge_hits"] == sum(bool(link.get("heads")) for link in gj["links"]) > 0  # its links' heads
    _check_attention(out, attn, row)
    # automatic supernodes: the groups of the supernodes table, their members coloured; hand-made editing still works
    auto = st.read("supernodes", "tiny", keys=[row["key"]]).to_pylist()
    assert out["auto_groups"] == len(auto) > 0
    assert out["auto_members"] == len({n for a in auto for n in a["node_ids"]})
    assert out["auto_off_members"] == 0
    top = max(auto, key=lambda a: abs(a["influence"] or 0))  # listed first: "use" copies it
    assert f"{auto_name(top['supernode'])} ({len(top['node_ids'])})" in out["after_use"]
    assert out["save_after_use"] == "saved"
    saved = st.read_json(f"_sweeps/tiny/supernodes/{row['key']}.json")["supernodes"]
    assert [s["name"] for s in saved] == [s.rsplit(" (", 1)[0] for s in out["after_use"]]
    # the overview: histograms over the ok graphs, recurring features (dashboard + top graphs), recurring paths
    assert out["ov_hist"] == [2, 2] and out["ov_bars"] == [2, 2]
    fs = st.read("feature_stats", "tiny")
    assert out["ov_features"] == min(25, fs.num_rows) and out["ov_top_graphs"] > 0 and out["ov_dash"] > 0
    assert out["ov_paths"] > 0 and out["path_selected"] > 0
    assert out["ov_b_command"].startswith("ct-ray analyze tiny-b --store ")
    # the diff: both graphs of the prompt, drawn side by side, and its graph_diffs row
    b = next(x for x in st.read("graphs", "tiny-b").to_pylist() if x["prompt"] == "The cat sat on the")
    assert out["diff_nodes"] == [row["n_nodes_pruned"], b["n_nodes_pruned"]]
    assert out["diff_row"] == "1" and "edge change L1" in out["diff_text"]
    assert out["diff_prompts"] == 2


def expected_view(st, sweep, key, node_th, edge_th) -> list[int]:
    """[nodes, edges] the page draws of a stored graph at these thresholds: embeddings and logits, the smallest most
    influential set of feature / error nodes whose share of their influence reaches node_th (ct_ray's pruning rule),
    then among the edges between them the strongest up to edge_th of their |weight|."""
    nodes = st.read("nodes", sweep, keys=[key]).to_pylist()
    ranked = sorted((n for n in nodes if n["kind"] in ("feature", "error")), key=lambda n: -max(0.0, n["influence"] or 0))
    total = sum(max(0.0, n["influence"] or 0) for n in ranked) or 1
    shown, acc = {n["node"] for n in nodes if n["kind"] not in ("feature", "error")}, 0.0
    for n in ranked:
        if acc / total >= node_th - 1e-9:
            break
        shown.add(n["node"])
        acc += max(0.0, n["influence"] or 0)
    w = sorted((abs(e["weight"]) for e in st.read("edges", sweep, keys=[key]).to_pylist()
                if e["source"] in shown and e["target"] in shown), reverse=True)
    tot, acc, kept = sum(w) or 1, 0.0, 0
    for x in w:
        acc += x
        kept += acc / tot <= edge_th + 1e-9
    return [len(shown), kept]


def check_labels(got, min_labels):
    """One label per logit, level text inside the drawing, no two boxes overlapping; long tokens truncated, the
    whole token in the tooltip."""
    labels = got["labels"]
    assert len(labels) == got["logits"] >= min_labels
    l0, t0, r0, b0 = got["svg"]
    for i, a in enumerate(labels):
        la, ta, ra, ba = a["box"]
        assert l0 <= la < ra <= r0 and t0 <= ta < ba <= b0, a
        assert ba - ta < 20, a  # level, one line high (a slanted label's box is as tall as it is long)
        for b in labels[i + 1:]:
            lb, tb, rb, bb = b["box"]
            assert ra <= lb or rb <= la or ba <= tb or bb <= ta, (a, b)
        token = a["title"].rsplit(" p=", 1)[0]
        shown = a["text"].rsplit(" ", 1)[0]
        assert shown == token if len(token) <= 16 else (len(shown) == 16 and shown.endswith("…")
                                                          and token.startswith(shown[:-1]))
        assert a["title"].endswith(f"({a['id']})")


def _check_perturbations(out, rows):
    """Two figures, constrained and free rows apart, each with ticks on both axes, axis titles and its own sign
    agreement and Spearman's rho; the constrained one says it is exact by construction."""
    from scipy.stats import spearmanr

    ok = [r for r in rows if r["status"] == "ok" and r["predicted_delta"] is not None and r["measured_delta"] is not None]
    assert out["pert_points"] == len(ok) > 0
    figs = {f["mode"]: f for f in out["pert"]}
    assert sorted(figs) == ["constrained", "free"]
    for mode, f in figs.items():
        pts = [r for r in ok if (r["mode"] == "constrained") == (mode == "constrained")]
        assert f["points"] == f["circles"] == len(pts) > 0, mode
        agree = sum(np.sign(r["predicted_delta"]) == np.sign(r["measured_delta"]) for r in pts)
        assert f["agree"] == agree and "sign agreement " in f["caption"] and f"% ({agree}/{len(pts)})" in f["caption"]
        rho = spearmanr([r["predicted_delta"] for r in pts], [r["measured_delta"] for r in pts]).statistic
        if len(pts) >= 3 and np.isfinite(rho):
            assert f["spearman"] == pytest.approx(rho, abs=1e-6) and f"Spearman ρ {rho:.3f}" in f["caption"]
        assert len(f["xticks"]) >= 3 and len(f["yticks"]) >= 3
        assert all(np.isfinite(float(t.replace("−", "-"))) for t in f["xticks"] + f["yticks"])
        assert f["axis_titles"] == ["predicted Δ (graph)", "measured Δ (model)"]
        assert f["title"].startswith(("Constrained mode" if mode == "constrained" else "Free mode") + f": {len(pts)} ")
    assert "exact by construction" in figs["constrained"]["caption"].lower()
    assert "exact by construction" not in figs["free"]["caption"].lower()
    n_c = sum(r["mode"] == "constrained" for r in ok)
    assert f"{n_c} in constrained mode, {len(ok) - n_c} in free mode" in out["pert_summary"]


def auto_name(name: str) -> str:
    """What the page names a hand-made copy of an automatic group (the server refuses < and > in names)."""
    return name.replace("<", "‹").replace(">", "›").strip()[:64].strip()


def _attention_case(st, key) -> dict:
    """What the page should show of the graph's attention attribution: the strongest edge with head rows (node ids
    and its rows) and the node with the most explained scores (its QK rows); a graph of tiny-b, which has none."""
    node_id = dict(zip(*(st.read("nodes", "tiny", columns=["node", "node_id"], keys=[key]).column(c).to_pylist()
                         for c in ("node", "node_id"))))
    edges = st.read("edges", "tiny", keys=[key]).to_pylist()
    heads = st.read("edge_heads", "tiny", keys=[key]).to_pylist()
    qk = st.read("qk_attributions", "tiny", keys=[key]).to_pylist()
    assert heads and qk, "the sweep computed no attention attribution"
    with_heads = {(h["source"], h["target"]) for h in heads if h["layer"] >= 0}
    e = max((e for e in edges if (e["source"], e["target"]) in with_heads), key=lambda e: abs(e["weight"]))
    rows = [h for h in heads if (h["source"], h["target"]) == (e["source"], e["target"])]
    targets = sorted({r["target"] for r in qk})
    t = max(targets, key=lambda x: sum(r["target"] == x for r in qk))
    key_b = next(g["key"] for g in st.read("graphs", "tiny-b").to_pylist() if g["status"] == "ok")
    return {"arg": {"edge": [node_id[e["source"]], node_id[e["target"]]], "qk_node": node_id[t], "key_b": key_b},
            "edge": e, "rows": rows, "qk": [r for r in qk if r["target"] == t],
            "qk_nodes": sorted(node_id[x] for x in targets), "node_ids": set(node_id.values())}


def _check_attention(out, attn, row):
    """Selecting an edge lists its head loadings; selecting the QK node lists its scores, pairs and marginals."""
    def label(h):
        return f"L{h['layer']}.H{h['head']}" if h["layer"] >= 0 else "other heads" if h["head"] == -2 else "residual path"

    assert out["attn_none"] == {"hits": 0, "ringed": 0, "hidden": [True, True]}  # tiny-b: no attention data
    assert out["attn_b_opened_at"] == [0.5, 0.98]  # tiny-b pruned at node_threshold 0.5: its sliders open there
    assert out["attn_flags"] == ["1", len(attn["qk_nodes"])]
    assert out["edge_hits"] == row["n_edges_pruned"] and out["qk_ringed"] == attn["qk_nodes"]
    # the edge: one row per stored row, by |weight|, the largest bar full; they sum to the edge's weight
    s, t = attn["arg"]["edge"]
    assert out["edge_panel"] == f"{s}>{t}" and out["edge_selected"] == [[s, t]]
    want = sorted(attn["rows"], key=lambda h: -abs(h["weight"]))
    assert [r[0] for r in out["head_rows"]] == [label(h) for h in want]
    assert [r[1] for r in out["head_rows"]] == pytest.approx([h["weight"] for h in want], abs=6e-4)
    assert out["head_rows"][0][2] == pytest.approx(100) and all(0 <= r[2] <= 100 for r in out["head_rows"])
    assert "residual path" in [r[0] for r in out["head_rows"]]
    assert f"{attn['edge']['weight']:+.3f}" in out["head_text"]
    # the node: each explained score (layer, head, query -> key, score, attention weight) and its terms
    qk = attn["qk"]
    ids = sorted({(r["layer"], r["head"], r["query_position"], r["key_position"]) for r in qk})
    assert out["qk_panel"] == attn["arg"]["qk_node"] and [tuple(d["id"]) for d in out["qk_scores"]] == ids
    for d in out["qk_scores"]:
        rs = [r for r in qk if (r["layer"], r["head"], r["query_position"], r["key_position"]) == tuple(d["id"])]
        assert d["n"] == [sum(r["role"] == role for r in rs) for role in ("pair", "query", "key")]
        assert f"score {rs[0]['score']:.3f}" in d["title"] and f"attention {rs[0]['pattern']:.3f}" in d["title"]
        assert d["title"].startswith(f"L{rs[0]['layer']}.H{rs[0]['head']} ")
    srcs = [x for r in qk for x in ((r["query_source"], r["key_source"]) if r["role"] == "pair"
                                    else (r["query_source"],) if r["role"] == "query" else (r["key_source"],))]
    assert out["qk_src"] == {"in_graph": sum(x in attn["node_ids"] for x in srcs), "bias": srcs.count("bias"),
                             "off_graph": sum(x not in attn["node_ids"] and x != "bias" for x in srcs)}
    assert out["qk_src"]["in_graph"] > 0
    for nid, text in out["qk_labels"]:  # contributors in the graph by name, e.g. 'L0 #15 "c"@14 0_15_14'
        assert nid in attn["node_ids"] and text.endswith(nid) and text != nid
    assert out["attn_closed"] == [True, True]
