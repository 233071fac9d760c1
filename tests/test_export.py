"""Graph JSON export for the circuit-tracer / Neuronpedia viewers: in-memory graphs and sweeps (`ct-ray export`),
checked against Neuronpedia's published graph JSON schema and circuit-tracer's graph-metadata.json index."""

import json

import jsonschema
import numpy as np
import pytest

from ct_ray import attribute, load_clt, load_model
from ct_ray.attribution.export import (
    cumulative_influence,
    graph_json,
    scan_id,
    supernode_params,
    viewer_node_threshold,
)
from ct_ray.cli import main as cli_main
from ct_ray.store.tables import Store
from ct_ray.sweep import parse_sweep_spec, read_prompts, run_sweep

# Neuronpedia's graph JSON schema (draft-07), encoded here from
# https://github.com/hijohnnylin/neuronpedia/blob/main/apps/webapp/app/api/graph/graph-schema.json
# (no PyPI package ships it: neither `neuronpedia` 1.2.1 nor `circuit-tracer` 0.5.0): its required fields and types,
# plus what the issue asks of ct_ray's files on top (influence in [0, 1], supernodes as [name, *node ids]).
_STR, _INT, _NUM = {"type": "string"}, {"type": "integer"}, {"type": "number"}
GRAPH_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": ["metadata", "qParams", "nodes", "links"],
    "properties": {
        "metadata": {
            "type": "object",
            "required": ["slug", "scan", "prompt_tokens", "prompt"],
            "properties": {
                "slug": _STR,
                "scan": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._\-]*$"},  # a model id, not a path
                "prompt_tokens": {"type": "array", "items": _STR},
                "prompt": _STR,
                "feature_details": {"type": "object", "properties": {
                    "feature_json_base_url": _STR, "neuronpedia_source_set": _STR,
                    "neuronpedia_lorsa_source_set": _STR}},
                "node_threshold": _NUM,
                "info": {"type": "object", "properties": {
                    "description": _STR, "creator_name": _STR, "creator_url": _STR, "source_urls": {"type": "array"},
                    "generator": {"type": "object", "properties": {"name": _STR, "version": _STR, "url": _STR,
                                                                    "email": _STR}},
                    "create_time_ms": _NUM}},
                "generation_settings": {"type": "object", "properties": {
                    "max_n_logits": _INT, "desired_logit_prob": _NUM, "batch_size": _INT, "max_feature_nodes": _INT}},
                "pruning_settings": {"type": "object", "properties": {"node_threshold": _NUM, "edge_threshold": _NUM}},
            },
        },
        "qParams": {
            "type": "object",
            "properties": {
                "pinnedIds": {"type": "array", "items": _STR},
                "supernodes": {"type": "array", "items": {"type": "array", "items": _STR, "minItems": 2}},
                "linkType": _STR, "clickedId": _STR, "sg_pos": _STR,
            },
        },
        "nodes": {"type": "array", "items": {
            "type": "object",
            "required": ["node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp"],
            "properties": {
                "node_id": _STR, "feature": {"type": ["integer", "null"]}, "layer": {"type": ["string", "integer"]},
                "ctx_idx": _INT, "feature_type": _STR, "jsNodeId": _STR, "clerp": _STR,
                "influence": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "activation": {"type": ["number", "null"]},
                # QK tracing (the published schema's prefixItems, as draft-07 tuple items)
                "qk_tracing_results": {
                    "type": "object",
                    "required": ["pair_wise_contributors", "top_q_marginal_contributors", "top_k_marginal_contributors"],
                    "properties": {
                        "pair_wise_contributors": {"type": "array", "items": {
                            "type": "array", "minItems": 3, "maxItems": 3, "items": [_STR, _STR, _NUM]}},
                        "top_q_marginal_contributors": {"type": "array", "items": {
                            "type": "array", "minItems": 2, "maxItems": 2, "items": [_STR, _NUM]}},
                        "top_k_marginal_contributors": {"type": "array", "items": {
                            "type": "array", "minItems": 2, "maxItems": 2, "items": [_STR, _NUM]}},
                    },
                },
            },
        }},
        "qk_only_nodes": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["node_id", "feature_type", "layer", "ctx_idx", "jsNodeId", "clerp"],
            "properties": {"node_id": _STR, "feature": {"type": ["integer", "null"]},
                           "layer": {"type": ["string", "integer"]}, "ctx_idx": _INT, "feature_type": _STR,
                           "jsNodeId": _STR, "clerp": _STR, "activation": {"type": ["number", "null"]}}}},
        "links": {"type": "array", "items": {
            "type": "object", "required": ["source", "target", "weight"],
            "properties": {"source": _STR, "target": _STR, "weight": _NUM},
        }},
    },
}
# circuit-tracer's local server lists graphs from DIR/graph-metadata.json: {"graphs": [Metadata, ...]}
# (circuit_tracer/frontend/utils.py add_graph_metadata; assets/index.html reads slug, scan, prompt, node_threshold)
INDEX_SCHEMA = {"type": "object", "required": ["graphs"], "properties": {"graphs": {"type": "array", "items": {
    "type": "object", "required": ["slug", "scan", "prompt", "prompt_tokens"],
    "properties": {"slug": _STR, "scan": _STR, "prompt": _STR, "node_threshold": _NUM}}}}}


def check_graph(data: dict):
    jsonschema.validate(data, GRAPH_SCHEMA)
    # every QK contributor resolves to a node or to qk_only_nodes (the published schema's promise)
    known = {n["node_id"] for n in data["nodes"]} | set(data.get("qk_only_nodes", {}))
    for n in data["nodes"]:
        for lst in (n.get("qk_tracing_results") or {}).values():
            assert all(i in known for entry in lst for i in entry[:-1])
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids))
    idset = set(ids)
    assert all(x["source"] in idset and x["target"] in idset for x in data["links"])
    # the viewers' slider starts at metadata.node_threshold (test_viewer_node_threshold): it shows some nodes
    th = data["metadata"]["node_threshold"]
    assert 0 < th <= 1 and (not shown_ids(data) or shown_ids(data, th))


def shown_ids(data: dict, threshold: float = 1.0) -> set[str]:
    """The feature and error nodes the viewers show at `threshold` (influence <= it; all when unknown)."""
    return {n["node_id"] for n in data["nodes"] if n["feature_type"] not in ("embedding", "logit")
            and (n["influence"] is None or n["influence"] <= threshold)}


def pruned_ids(nodes: list[dict], threshold: float) -> set[str]:
    """ct_ray's pruning rule (prune.py) over node rows: the smallest most influential set of feature and error
    nodes whose share of their influence reaches `threshold`."""
    ranked = sorted((n for n in nodes if n["kind"] in ("feature", "error")), key=lambda n: -n["influence"])
    total, acc, out = sum(n["influence"] for n in ranked), 0.0, set()
    for n in ranked:
        out.add(n["node_id"])
        acc += n["influence"]
        if acc >= threshold * total * (1 - 1e-9):
            break
    return out


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return load_model(tiny_dir)


def test_in_memory_json_passes_schema(lm, clt_dir):
    g = attribute(lm, load_clt(clt_dir), "The cat sat on", max_n_logits=5, batch_size=64)
    p = g.prune()
    for data in (graph_json(p, slug="t"), graph_json(g, slug="full"), graph_json(p, slug="t", full=g)):
        check_graph(data)
        m = data["metadata"]
        assert m["scan"] == scan_id(str(lm.name)) and "/" not in m["scan"]
        assert clt_dir not in json.dumps(data)  # no local path anywhere (the CLT is named by its directory)
        assert m["info"]["transcoder_set"] == "my_clt"
        assert "feature_details" in m and m["generation_settings"]["max_n_logits"] == 5
        gs = m["generation_settings"]  # integers where the schema says so (a None is left out, never null)
        assert all(isinstance(v, int) for k, v in gs.items() if k != "desired_logit_prob")
    # circuit-tracer's definition: cumulative over the full graph; the kept nodes are the top of it
    exact = graph_json(p, full=g)
    infl = [n["influence"] for n in exact["nodes"] if n["influence"] is not None]
    assert 0 < max(infl) <= 1 and exact["metadata"]["node_threshold"] < 1
    capped = attribute(lm, load_clt(clt_dir), "The cat sat on", max_n_logits=5, batch_size=64, max_feature_nodes=7)
    gs = graph_json(capped.prune())["metadata"]["generation_settings"]
    assert gs["max_feature_nodes"] == 7 and isinstance(gs["max_feature_nodes"], int)


def test_cumulative_influence_clamped():
    # influences whose float32 cumulative sum over their float32 total reached 1.0000001 in the previous export
    rng = np.random.default_rng(4)
    x = (rng.exponential(size=int(rng.integers(5, 3000))) ** 3).astype(np.float32)
    c = cumulative_influence(x)
    assert c.min() >= 0 and c.max() <= 1 and c.max() == pytest.approx(1)
    c = cumulative_influence(np.array([0.1] * 10 + [0.0, np.nan], dtype=np.float32))
    assert c[-1] == c[-2] == 1.0 and c[0] == pytest.approx(0.1)  # no influence (NaN, 0): last
    assert cumulative_influence(np.full(3, np.nan)) is None


def test_scan_is_a_model_id(tmp_path):
    assert scan_id("smollm2-135m") == "smollm2-135m-instruct"  # the built-in's hub id HuggingFaceTB/SmolLM2-...
    assert scan_id("google/gemma-2-2b") == "gemma-2-2b"
    d = tmp_path / "Local Copy"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"_name_or_path": "HuggingFaceTB/SmolLM2-135M"}))
    assert scan_id(str(d)) == "smollm2-135m"
    (d / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path)}))  # a path: not a hub id
    assert scan_id(str(d)) == "local-copy"
    assert scan_id("/gone/models/My_Model/") == "my_model" and scan_id(None) == "model"


def test_supernode_params():
    sn, pinned = supernode_params([{"name": "a", "nodes": ["x", "y"]}, ["b", "z", "gone"], ["c", "gone"]],
                                  {"x", "y", "z"})
    assert sn == [["a", "x", "y"], ["b", "z"]] and pinned == ["x", "y", "z"]


def test_attribute_out_lists_the_graph(tiny_dir, clt_dir, tmp_path, capsys):
    out = tmp_path / "att"
    for slug in ("one", "two", "one"):  # a second slug adds an entry; the same slug again replaces its entry
        rc = cli_main(["attribute", "The cat sat on", "--model", str(tiny_dir), "--clt", clt_dir, "--out", str(out),
                       "--slug", slug, "--quiet", "--max-n-logits", "5", "--batch-size", "64"])
        assert rc == 0
    index = json.loads((out / "graph-metadata.json").read_text())
    jsonschema.validate(index, INDEX_SCHEMA)
    assert [g["slug"] for g in index["graphs"]] == ["one", "two"]
    data = json.loads((out / "one.json").read_text())
    check_graph(data)
    assert data["metadata"]["node_threshold"] < 1  # influence over the full graph, as circuit-tracer writes it
    capsys.readouterr()
    assert cli_main(["attribute", "x", "--model", str(tiny_dir), "--clt", clt_dir, "--out", str(out), "--slug", "../up",
                     "--quiet"]) == 2
    assert "slug '../up'" in capsys.readouterr().err


def test_rows_of_other_writers_export():
    """Rows with flat settings, unreadable params, null activations/probabilities (e.g. a benchmark's or an older
    writer's) still make a valid file."""
    import datetime as dt

    import pyarrow as pa

    from ct_ray.attribution.export_files import graph_from_rows

    nodes = pa.table({"node": [0, 1, 2, 3], "node_id": ["0_5_1", "0_-1_1", "E_7_1", "2_9_1"],
                      "kind": ["feature", "error", "embedding", "logit"], "layer": [0, 0, -1, 2],
                      "position": [1, 1, 1, 1], "feature": [5, -1, -1, -1], "token": [7, 7, 7, 9],
                      "token_str": ["a", "a", "a", None], "activation": [None, 1.0, 1.0, 2.0],
                      "probability": [None, None, None, None], "influence": [0.5, 0.2, 0.3, 0.0],
                      "kept": [True, True, True, None]})
    edges = pa.table({"source": [2, 1, 0], "target": [0, 3, 3], "weight": [1.0, 0.5, 2.0], "kept": [True] * 3})
    row = {"key": "k", "prompt": "a", "token_strs": ["<s>", "a"], "logit_tokens": [9], "model": "/local/x",
           "clt": "/local/clt", "created_at": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)}
    for params in ('{"max_n_logits": 3, "node_threshold": 0.7}', "not json", None):
        data = graph_from_rows({**row, "params": params}, nodes, edges, slug="s")
        check_graph(data)
        assert data["metadata"]["scan"] == "x" and "/local" not in json.dumps(data)
    assert data["nodes"][0]["activation"] is None and data["nodes"][-1]["clerp"] == 'Output "" (p=0.000)'
    flat = graph_from_rows({**row, "params": '{"max_n_logits": 3, "node_threshold": 0.7}'}, nodes, edges, slug="s")
    assert flat["metadata"]["generation_settings"] == {"max_n_logits": 3}
    assert flat["metadata"]["pruning_settings"] == {"node_threshold": 0.7}
    # cumulative influence over all nodes: feature 0.5, embedding 0.8, error 1.0; the viewers open the graph pruned
    # at its threshold by ct_ray's rule over the feature and error nodes (shares 0.5, 0.2: 71%, 100%)
    assert flat["metadata"]["node_threshold"] == 0.5  # 0.7: the feature alone reaches it, the error node is hidden
    for params, want in (('{"attribution": {"max_n_logits": 3}, "pruning": {"node_threshold": 0.9, '
                          '"edge_threshold": 0.95}, "graph_rows": "pruned"}', {"node_threshold": 0.9, "edge_threshold": 0.95}),
                         ("[1, 2]", {}), ("not json", {})):
        m = graph_from_rows({**row, "params": params}, nodes, edges, slug="s")["metadata"]
        assert m["pruning_settings"] == want  # a sweep's params nest them; unknown ones are left out
        assert m["node_threshold"] == 1.0  # 0.9, or PruneSpec's 0.8 when unknown: both nodes
    assert m["generation_settings"] == {}


def test_viewer_node_threshold():
    # influence 0.4 (feature), 0.3 (embedding), 0.2 (error), 0.1 (feature): cumulative 0.4, 0.7, 0.9, 1.0; the
    # feature / error shares 0.4, 0.2, 0.1 reach 57%, 86%, 100% of theirs
    cum, ranked = cumulative_influence(np.array([0.4, 0.3, 0.2, 0.1])), [True, False, True, True]
    assert viewer_node_threshold(cum, ranked, 0.8) == pytest.approx(0.9)  # feature and error shown, not the last
    assert viewer_node_threshold(cum, ranked) == pytest.approx(0.9)  # PruneSpec's default: 0.8
    assert viewer_node_threshold(cum, ranked, 0.5) == pytest.approx(0.4)
    assert viewer_node_threshold(cum, ranked, 1.0) == pytest.approx(1.0)
    assert viewer_node_threshold(cum[[0, 1, 2]], ranked[:3], 0.8, kept_set=True) == pytest.approx(0.9)  # all shown
    assert viewer_node_threshold(cum[[0, 1]], ranked[:2], 0.8, kept_set=True) == 0.8
    assert viewer_node_threshold([], [], 0.6) == 0.6 and viewer_node_threshold([0.5], [False]) == 0.8


# --- sweeps ---------------------------------------------------------------------------------------------------
PROMPTS = ["The cat sat on", "Once upon a time", "1 2 3 4", ""]  # the empty prompt is an error row


def _spec(tiny_dir, clt_dir, store, sweep_id, prompts, **kw):
    return parse_sweep_spec({"sweep_id": sweep_id, "model": str(tiny_dir), "clt": clt_dir, "prompts": prompts,
                             "storage": str(store), "resources": {"workers": 1, "num_cpus": 1},
                             "attribution": {"max_n_logits": 5, "batch_size": 64}, **kw})


@pytest.fixture(scope="module")
def sweeps(ray_local, tiny_dir, clt_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("export_store") / "store"
    pruned = _spec(tiny_dir, clt_dir, store, "s1", PROMPTS)
    full = _spec(tiny_dir, clt_dir, store, "s-full", PROMPTS[:1], graph_rows="full")
    # two runs of s1 (the second finishes it): its rows are in several data files
    r0, r1, r2 = run_sweep(_spec(tiny_dir, clt_dir, store, "s1", PROMPTS[:2])), run_sweep(pruned), run_sweep(full)
    assert (r0.ok, r1.skipped, r1.ok, r1.failed, r2.ok) == (2, 2, 1, 1, 1)
    keys = {it.prompt: it.key for it in read_prompts(pruned)[0]}
    return {"store": str(store), "keys": keys, "full_key": read_prompts(full)[0][0].key,
            "attribution": pruned.attribution.attribute_kwargs()}


def _export(capsys, *args):
    rc = cli_main(["export", "--no-progress", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_export_sweep_files_index_and_idempotence(sweeps, lm, clt_dir, tmp_path, capsys):
    out = tmp_path / "graphs"
    rc, so, _ = _export(capsys, "--store", sweeps["store"], "--sweep", "s1", "--all", "--out", str(out))
    assert rc == 0 and "exported 3 graph(s)" in so and "3 written" in so
    index = json.loads((out / "graph-metadata.json").read_text())
    jsonschema.validate(index, INDEX_SCHEMA)
    ok_keys = [sweeps["keys"][p] for p in PROMPTS[:3]]
    assert [g["slug"] for g in index["graphs"]] == [f"s1-{k}" for k in ok_keys]  # in prompt order, errors skipped
    assert sorted(p.name for p in out.iterdir()) == sorted(["graph-metadata.json"] + [f"s1-{k}.json" for k in ok_keys])
    clt, st = load_clt(clt_dir), Store(sweeps["store"])
    hidden = 0
    for prompt, key in zip(PROMPTS, ok_keys):
        data = json.loads((out / f"s1-{key}.json").read_text())
        check_graph(data)
        assert data["metadata"]["scan"] == scan_id(str(lm.name)) and data["metadata"]["prompt"] == prompt
        assert index["graphs"][ok_keys.index(key)] == {k: data["metadata"][k] for k in index["graphs"][0]}
        # the same file as exporting the graph computed in memory (nodes, links, influence, settings)
        mem = graph_json(attribute(lm, clt, prompt, **sweeps["attribution"]).prune(), slug=f"s1-{key}")
        assert data["nodes"] == mem["nodes"] and data["links"] == mem["links"]
        for k in ("scan", "prompt_tokens", "prompt", "node_threshold", "pruning_settings"):
            assert data["metadata"][k] == mem["metadata"][k], k
        # the thresholds the sweep pruned with (its spec's: PruneSpec's defaults); influence is over the pruned
        # graph (graph_rows: pruned), so the viewers prune it once more at 0.8 (ct_ray's rule over the stored
        # rows' influence) instead of opening it whole
        assert data["metadata"]["pruning_settings"] == {"node_threshold": 0.8, "edge_threshold": 0.98}
        shown = shown_ids(data, data["metadata"]["node_threshold"])
        assert shown == pruned_ids(st.read("nodes", "s1", keys=[key]).to_pylist(), 0.8) & shown_ids(data)
        hidden += len(shown_ids(data)) - len(shown)
        gs, mgs = data["metadata"]["generation_settings"], mem["metadata"]["generation_settings"]
        assert gs["batch_size"] == 64 and {k: gs[k] for k in mgs if k in gs} == {k: mgs[k] for k in gs if k in mgs}
        assert data["metadata"]["info"]["create_time_ms"] > 0 and data["metadata"]["title_prefix"] == "s1"
    assert hidden > 0

    # a re-run writes nothing and leaves the same bytes; an index of other graphs keeps them
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    rc, so, _ = _export(capsys, "--store", sweeps["store"], "--sweep", "s1", "--all", "--out", str(out))
    assert rc == 0 and "0 written, 3 unchanged" in so
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
    rc, so, _ = _export(capsys, "--store", sweeps["store"], "--sweep", "s-full", "--keys", sweeps["full_key"],
                        "--out", str(out))
    assert rc == 0 and "lists 4" in so
    assert not list(out.glob(".*tmp*"))  # atomic writes leave nothing behind


def test_export_reads_each_data_file_once(sweeps, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from ct_ray.attribution.export_files import export_sweep

    reads, real = [], pq.ParquetFile.read

    def read(self, columns=None, **kw):  # (file, whether the read is of the key column alone)
        reads.append((self.metadata.num_rows, self.metadata.serialized_size, tuple(columns or ()) == ("key",)))
        return real(self, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read", read)
    r = export_sweep(Store(sweeps["store"]), "s1", str(tmp_path / "once"))
    assert r["graphs"] == 3
    files = {(n, sz) for n, sz, _ in reads}
    assert len(files) >= 4, reads  # the test needs a sweep with several node and edge data files
    for f in files:  # its key column once, its rows once (a scan per key or batch would read it again)
        assert reads.count((*f, True)) == 1 and reads.count((*f, False)) == 1, reads


def test_export_full_rows_use_circuit_tracer_influence(sweeps, lm, clt_dir, tmp_path, capsys):
    out = tmp_path / "full"
    key = sweeps["full_key"]
    rc, _, _ = _export(capsys, "--store", sweeps["store"], "--sweep", "s-full", "--keys", key, "--out", str(out),
                       "--scan", "smollm2-135m", "--neuronpedia-source-set", "my-clt")
    assert rc == 0
    data = json.loads((out / f"s-full-{key}.json").read_text())
    check_graph(data)
    assert data["metadata"]["scan"] == "smollm2-135m"
    assert data["metadata"]["feature_details"] == {"neuronpedia_source_set": "my-clt"}
    g = attribute(lm, load_clt(clt_dir), PROMPTS[0], **sweeps["attribution"])
    mem = graph_json(g.prune(), full=g)  # kept nodes, influence over the full graph
    assert data["nodes"] == mem["nodes"] and data["links"] == mem["links"]
    assert data["metadata"]["node_threshold"] == mem["metadata"]["node_threshold"] < 1
    # influence over the full graph: the exported nodes are the pruned set already, and all of them show
    assert data["metadata"]["pruning_settings"] == {"node_threshold": 0.8, "edge_threshold": 0.98}
    assert shown_ids(data, data["metadata"]["node_threshold"]) == shown_ids(data)


def test_sweep_spec_export_dir(sweeps, tiny_dir, clt_dir, tmp_path, capsys):
    import yaml

    out = tmp_path / "from_spec"
    spec = {"sweep_id": "s1", "model": str(tiny_dir), "clt": clt_dir, "prompts": PROMPTS, "storage": sweeps["store"],
            "attribution": {"max_n_logits": 5, "batch_size": 64}, "export_dir": str(out)}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert cli_main(["sweep", str(tmp_path / "spec.yaml"), "--no-progress"]) == 0  # all committed: no worker starts
    assert "graph JSON: 3 graph(s)" in capsys.readouterr().out
    index = json.loads((out / "graph-metadata.json").read_text())
    assert len(index["graphs"]) == 3 and all((out / f"{g['slug']}.json").exists() for g in index["graphs"])


def test_export_to_s3(sweeps, s3, capsys):
    import fsspec

    url = f"s3://{s3['bucket']}/exported"
    args = ["--store", sweeps["store"], "--sweep", "s1", "--all", "--out", url, "--endpoint-url", s3["endpoint"]]
    rc, so, _ = _export(capsys, *args)
    assert rc == 0 and "3 written" in so
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3["endpoint"]})
    index = json.loads(fs.cat_file(f"{url}/graph-metadata.json"))
    for g in index["graphs"]:
        check_graph(json.loads(fs.cat_file(f"{url}/{g['slug']}.json")))
    rc, so, _ = _export(capsys, *args)
    assert rc == 0 and "0 written, 3 unchanged" in so


def test_explorer_supernodes_reach_qparams(sweeps, tmp_path, capsys):
    from ct_ray.explorer.api import ExplorerAPI

    st = Store(sweeps["store"])
    key = sweeps["keys"][PROMPTS[0]]
    ids = [n for n in st.read("nodes", "s1", columns=["node_id", "kind"], keys=[key]).to_pylist()
           if n["kind"] == "feature"]
    group = [n["node_id"] for n in ids[:2]]
    api = ExplorerAPI(st, allow_write=True)
    api.put_supernodes({"sweep": "s1", "key": key}, json.dumps({"supernodes": [{"name": "grp", "nodes": group}]}).encode())
    saved = st.read_json(f"_sweeps/s1/supernodes/{key}.json")
    assert saved["qParams"] == {"supernodes": [["grp", *group]], "pinnedIds": group}
    out = tmp_path / "sn"
    rc, _, _ = _export(capsys, "--store", sweeps["store"], "--sweep", "s1", "--keys", key, "--out", str(out))
    data = json.loads((out / f"s1-{key}.json").read_text())
    check_graph(data)
    assert rc == 0 and data["qParams"]["supernodes"] == [["grp", *group]] and data["qParams"]["pinnedIds"] == group


def test_export_bad_input(sweeps, tmp_path, capsys):
    st, out = sweeps["store"], str(tmp_path / "o")
    err_key = sweeps["keys"][""]
    (tmp_path / "file").write_text("x")
    bad_index = tmp_path / "bad"
    bad_index.mkdir()
    (bad_index / "graph-metadata.json").write_text("[1, 2]")
    cases = [
        (["--store", st, "--sweep", "s1", "--out", out], "give --keys"),
        (["--store", st, "--sweep", "s1", "--all", "--keys", "x", "--out", out], "give --keys"),
        (["--store", st, "--sweep", "nope", "--all", "--out", out], "no committed graphs in sweep 'nope'"),
        (["--store", st, "--sweep", "s1", "--keys", "deadbeef", "--out", out], "not a committed graph"),
        (["--store", st, "--sweep", "s1", "--keys", err_key, "--out", out], "only 'ok' graphs export"),
        (["--store", st, "--sweep", "s1", "--all", "--out", str(tmp_path / "file")], "is a file"),
        (["--store", st, "--sweep", "s1", "--all", "--out", str(bad_index)], "not a graph-metadata.json index"),
        (["--store", st, "--sweep", "s1", "--all", "--out", out, "--scan", "/home/me/model"], "never a path"),
        (["--store", str(tmp_path / "empty"), "--sweep", "s1", "--all", "--out", out], "no committed graphs"),
    ]
    for args, msg in cases:
        rc, so, se = _export(capsys, *args)
        assert rc == 2 and msg in se and se.count("\n") == 1 and se.startswith("ct-ray: error:"), (args, se)
    assert not (tmp_path / "o").exists()
