"""The explorer in headless Debian Chromium (playwright-core from web/node_modules drives /usr/bin/chromium) against
`ct-ray serve` on a tiny sweep built here with the sweep runner and `ct-ray features` (tiny model, random CLT)."""

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from ct_ray.explorer.server import STATIC_DIR, make_server

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
    """A two-prompt sweep with perturbations and the feature dashboards of its (random) CLT."""
    if not (WEB / "node_modules" / "playwright-core").is_dir() or not os.path.exists(os.path.join(STATIC_DIR, "app.js")):
        pytest.fail("the explorer page is not built: run `make setup` (npm ci + build in web/)")
    from ct_ray.features import parse_features_spec, run_features
    from ct_ray.store.tables import Store
    from ct_ray.sweep import parse_sweep_spec, run_sweep

    tmp = tmp_path_factory.mktemp("explorer")
    store = str(tmp / "store")
    rclt = {"features": 24, "seed": 3, "firing_rate": 0.15}
    spec = parse_sweep_spec({"sweep_id": "tiny", "model": str(tiny_dir), "random_clt": rclt, "storage": store,
                             "prompts": ["The cat sat on the", "Paris is in"], "resources": {"workers": 1, "num_cpus": 1},
                             "attribution": {"max_n_logits": 3, "batch_size": 64},
                             "perturbation": {"top_k": 3, "interventions": [{"op": "scale", "value": -1}]}})
    r = run_sweep(spec)
    assert r.ok == 2
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(f"The cat sat on the mat {i} times, and Paris is in France." for i in range(10)))
    run_features(parse_features_spec({"model": str(tiny_dir), "random_clt": rclt, "corpus": [str(corpus)],
                                      "context_len": 16, "n_contexts": 12, "top_k": 4, "window": 8, "storage": store}))
    g = Store(store).read("graphs", "tiny").to_pylist()
    row = next(x for x in g if x["prompt"] == "The cat sat on the")
    return {"store": store, "row": row, "tmp": tmp, "model": str(tiny_dir), "rclt": rclt}


def _graph_json(sweep, path):
    """The same prompt's pruned graph as circuit-tracer / Neuronpedia JSON (what ct-ray attribute --out writes)."""
    from ct_ray import attribute, load_model, random_clt

    lm = load_model(sweep["model"])
    r = sweep["rclt"]
    clt = random_clt(lm, r["features"], seed=r["seed"], firing_rate=r["firing_rate"])
    p = attribute(lm, clt, "The cat sat on the", max_n_logits=3, batch_size=64).prune()
    return p.to_json(str(path))


def test_explorer_in_chromium(tiny_sweep):
    srv = make_server(tiny_sweep["store"], port=0, allow_write=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    row = tiny_sweep["row"]
    gj = _graph_json(tiny_sweep, tiny_sweep["tmp"] / "graph.json")
    try:
        p = subprocess.run(["node", "e2e/explorer.mjs", f"http://127.0.0.1:{srv.server_address[1]}", "tiny", row["key"],
                            os.environ.get("CT_RAY_SCREENSHOTS", ""), str(tiny_sweep["tmp"] / "graph.json")],
                           cwd=WEB, capture_output=True, text=True, timeout=90, env={**os.environ, "CHROMIUM": CHROMIUM})
    finally:
        srv.shutdown()
        srv.server_close()
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["errors"] == []
    assert out["listed"] == 2
    # the stored (pruned) graph, whole: every node and edge of its rows
    assert out["full"] == [row["n_nodes_pruned"], row["n_edges_pruned"]]
    assert out["restored"] == out["full"]
    assert out["node_th"][0] < out["full"][0] and out["both_th"][1] < out["node_th"][1]
    # a feature's dashboard: top contexts with the max token highlighted
    assert out["top_contexts"] > 0 and out["highlighted_tokens"] == out["top_contexts"]
    assert "density" in out["feature_text"]
    # supernodes: saved to the store (server started with --allow-write) and shown again after a reload
    assert out["selected"] == "selected: 2" and out["save_status"] == "saved"
    assert out["after_reload"] == ["my group (2)"] and len(out["in_supernode"]) == 2
    # perturbation results: one predicted-vs-measured point per measured row
    assert out["pert_points"] > 0
    # a graph JSON file opened in the page: the same graph as the export holds
    assert out["file"] == [len(gj["nodes"]), len(gj["links"])]
