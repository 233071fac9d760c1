import json

import pytest
import torch

from ct_ray import Graph, attribute, random_clt


@pytest.fixture(scope="module")
def graph(tiny_models):
    lm = tiny_models["gpt2"]
    return attribute(lm, random_clt(lm, 32, firing_rate=0.2), "Graphs travel well")


def test_save_load_roundtrip(graph, tmp_path):
    graph.save(str(tmp_path / "g"))
    back = Graph.load(str(tmp_path / "g"))
    assert torch.equal(back.adjacency, graph.adjacency)
    assert back.nodes.to_pandas().equals(graph.nodes.to_pandas())  # NaN-aware
    assert back.meta["tokens"] == graph.meta["tokens"]
    assert back.scores() == graph.scores()
    assert not list(tmp_path.glob(".g.tmp*"))  # atomic write leaves nothing behind


def test_json_export(graph, tmp_path):
    pruned = graph.prune()
    data = pruned.to_json(str(tmp_path / "graph.json"), slug="t")
    on_disk = json.loads((tmp_path / "graph.json").read_text())
    assert on_disk == data
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids)), "node ids must be unique"
    js = [n["jsNodeId"] for n in data["nodes"] if n["feature_type"] != "cross layer transcoder"]
    assert len(js) == len(set(js))
    idset = set(ids)
    assert all(link["source"] in idset and link["target"] in idset for link in data["links"])
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert {"embedding", "logit"} <= kinds
    assert data["metadata"]["prompt_tokens"][1:] == list("Graphs travel well")
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert sum(n["is_target_logit"] for n in logits) == 1
    # Neuronpedia's graph schema; scan a model id; influence a cumulative share in [0, 1]
    from .test_export import check_graph

    check_graph(data)
    assert "/" not in data["metadata"]["scan"] and "feature_details" in data["metadata"]


def test_error_ids_never_collide_with_features():
    from ct_ray.attribution.graph import node_ids

    # circuit-tracer 0.5.0 gives error (layer 1, pos 3) the id of feature (layer 0, index 1, pos 3)
    ids = node_ids(["feature", "error"], [0, 1], [3, 3], [1, -1], [5, 5], n_layers=2)
    assert ids[0] != ids[1]


def test_edges_table(graph):
    e = graph.edges()
    assert e.num_rows == graph.n_edges
    assert set(e.column("target").to_pylist()) <= set(range(graph.n_nodes))
