"""Automatic supernodes (ct_ray/analysis/auto_supernodes.py) on tiny random models built in code."""

import re

import numpy as np
import pyarrow as pa
import pytest
import torch

from ct_ray import attribute, random_clt
from ct_ray.analysis.auto_supernodes import auto_supernodes, auto_supernodes_rows, indirect_influence, supernode_rows
from ct_ray.attribution import prune as _prune
from ct_ray.perturb import collapse

PROMPT = "The cat sat on the mat"
NAME = re.compile(r'^L\d+(-\d+)? [→⊣] ".*"( \(\d+\))?$', re.S)
EXPLORER_NAME = re.compile(r"^[^\x00-\x1f\x7f<>]{1,64}$")  # what the explorer saves (ct_ray/explorer/api.py)


@pytest.fixture(scope="module")
def setup(tiny_models):
    """(model, CLT, full graph, pruned graph) per family, built once."""
    cache = {}

    def get(family="llama"):
        if family not in cache:
            lm = tiny_models[family]
            clt = random_clt(lm, 32, seed=1, firing_rate=0.1)
            g = attribute(lm, clt, PROMPT)
            cache[family] = (lm, clt, g, g.prune())
        return cache[family]

    return get


def _kinds(g, sset):
    kind = dict(zip(g.nodes.column("node_id").to_pylist(), g.nodes.column("kind").to_pylist()))
    return [kind[n] for s in sset.supernodes for n in s.nodes]


def _flow_kept(p, sset) -> float:
    """Fraction of the pruned graph's logit-influence flow (pruning's edge scores) on edges a collapse keeps."""
    A, w = p.adjacency.double(), p.logit_weights.double()
    out = _prune.influence(p.adjacency, p.logit_weights).double() + w  # what flows out of each target
    flow = A.abs() / A.abs().sum(1, keepdim=True).clamp_min(1e-10) * out[:, None]
    intra = sum(float(flow[np.ix_(m, m)].sum()) for m in sset.resolve(p).values())
    return 1 - intra / float(flow.sum())


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_groups_disjoint_features_deterministic(setup, family):
    lm, clt, g, p = setup(family)
    a = auto_supernodes(p, clt=clt)
    assert a.supernodes, "a random CLT's features recur over positions: some groups exist"
    assert a == auto_supernodes(p, clt=clt)  # deterministic
    members = [n for s in a.supernodes for n in s.nodes]
    assert len(members) == len(set(members))  # disjoint
    assert set(_kinds(p, a)) == {"feature"}
    assert all(len(s.nodes) >= 2 for s in a.supernodes)
    assert all(NAME.match(s.name) and EXPLORER_NAME.match(s.name) for s in a.supernodes), [s.name for s in a.supernodes]
    assert len({s.name for s in a.supernodes}) == len(a.supernodes)
    # layer ranges in the names are the members'
    layer = dict(zip(p.nodes.column("node_id").to_pylist(), p.nodes.column("layer").to_pylist()))
    for s in a.supernodes:
        lo, hi = min(layer[n] for n in s.nodes), max(layer[n] for n in s.nodes)
        assert s.name.startswith(f"L{lo}-{hi} " if lo != hi else f"L{lo} ")
    # without the CLT (graph only) and on the full graph: still valid groupings
    for sset, graph in ((auto_supernodes(p), p), (auto_supernodes(g, clt=clt, threshold=0.3), g)):
        assert set(_kinds(graph, sset)) <= {"feature"}
        assert all(len(s.nodes) >= 2 for s in sset.supernodes)
    # a larger threshold merges more
    n = lambda t: sum(len(s.nodes) for s in auto_supernodes(p, clt=clt, threshold=t).supernodes)
    assert n(0.05) <= n(0.5) <= n(1.5)


def test_rows_entry_point_equals_graph(setup):
    lm, clt, g, p = setup("llama")
    want = auto_supernodes(p, clt=clt)
    # pruned rows (`graph_rows: pruned`): every row kept
    nodes = p.nodes.append_column("key", pa.array(["k"] * p.n_nodes)).append_column("kept", pa.array([True] * p.n_nodes))
    assert auto_supernodes_rows(nodes, p.edges(), p.meta["logit_probs"], clt=clt) == want
    # full-graph rows with the kept flags, shuffled, as a sweep writes them with `graph_rows: full`
    kept_n = np.isin(g.nodes.column("node").to_numpy(), p.nodes.column("node").to_numpy())
    ge, pe = g.edges(), p.edges()
    code = lambda e: e.column("source").to_numpy().astype(np.int64) * g.n_nodes + e.column("target").to_numpy()
    full_nodes = g.with_influence().nodes.append_column("kept", pa.array(kept_n))
    full_edges = ge.append_column("kept", pa.array(np.isin(code(ge), code(pe))))
    perm = np.random.default_rng(0).permutation(full_nodes.num_rows)
    got = auto_supernodes_rows(full_nodes.take(pa.array(perm)), full_edges, None, clt=clt)
    assert got == want
    # influence missing from the rows: computed from the pruned edges instead (another number, still a grouping)
    no_infl = nodes.drop_columns(["influence"])
    s = auto_supernodes_rows(no_infl, p.edges(), p.meta["logit_probs"], clt=clt)
    assert all(len(x.nodes) >= 2 for x in s.supernodes)
    # rows of the supernodes table
    t = supernode_rows(want, nodes, key="k")
    assert t.num_rows == len(want.supernodes) and t.column("size").to_pylist() == [len(x.nodes) for x in want.supernodes]
    assert t.column("method").to_pylist()[0] == "auto-v1"


def test_planted_duplicate_features_group_together(tiny_models):
    """Two features with identical encoder and decoder rows fire together with equal activations: same role, one
    group, with or without the CLT blocks; collapsing by the groups keeps >= 90% of the logit influence."""
    lm = tiny_models["llama"]
    clt = random_clt(lm, 32, seed=3, firing_rate=0.1)
    p0 = attribute(lm, clt, PROMPT).prune()
    nF = p0.n_features
    top = int(torch.argmax(p0.column("influence")[:nF]))
    l, f = int(p0.column("layer")[top]), int(p0.column("feature")[top])
    active = set(p0.column("feature")[:nF][p0.column("layer")[:nF] == l].tolist())
    twin = next(i for i in range(clt.d_tc[l]) if i not in active and i != f)
    with torch.no_grad():
        for w in (clt.W_enc, clt.b_enc, clt.threshold, clt.W_dec):
            w[l][twin] = w[l][f]
    p = attribute(lm, clt, PROMPT).prune()
    ids = p.nodes.column("node_id").to_pylist()
    pairs = [(f"{l}_{f}_{q}", f"{l}_{twin}_{q}") for q in range(len(p.meta["tokens"]))
             if f"{l}_{f}_{q}" in ids and f"{l}_{twin}_{q}" in ids]
    assert pairs, "the twin features are nodes of the pruned graph"
    for kw in ({"clt": clt}, {}):
        sset = auto_supernodes(p, **kw)
        group = {n: s.name for s in sset.supernodes for n in s.nodes}
        for a, b in pairs:
            assert a in group and group[a] == group.get(b), (a, b, kw.keys())
        assert _flow_kept(p, sset) >= 0.9
        # collapse sums edges: each logit's total input (its attribution) is unchanged
        c = collapse(p, sset)
        nL = p.n_logits
        torch.testing.assert_close(c.adjacency[-nL:].double().sum(1), p.adjacency[-nL:].double().sum(1),
                                   rtol=1e-5, atol=1e-5)


def test_indirect_influence_matches_series(setup):
    lm, clt, g, p = setup("llama")
    layer = p.column("layer").numpy().astype(np.int64)
    N, nL = p.n_nodes, p.n_logits
    logits = np.arange(N - nL, N)
    B = indirect_influence(p.adjacency, layer, logits, absolute=True)
    w = torch.tensor(p.meta["logit_probs"])
    torch.testing.assert_close(w @ B, _prune.influence(p.adjacency, p.logit_weights), rtol=1e-4, atol=1e-6)
    # signed: the series Σ_k Ã^k on a few rows
    At = p.adjacency.double() / p.adjacency.abs().double().sum(1, keepdim=True).clamp_min(1e-10)
    rows = np.array([0, p.n_features // 2, N - 1])
    M = indirect_influence(p.adjacency, layer, rows).double()
    cur = torch.eye(N, dtype=torch.float64)[rows]
    total = torch.zeros_like(cur)
    for _ in range(int(layer.max()) + 3):
        cur = cur @ At
        total += cur
    torch.testing.assert_close(M, total, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="layers"):
        bad = p.adjacency.clone()
        bad[0, p.n_features - 1] = 1.0  # an edge from a node at the same or a higher layer
        bad[p.n_features - 1, 0] = 1.0
        indirect_influence(bad, layer, logits)


def test_contexts_block_and_options(setup):
    lm, clt, g, p = setup("llama")
    nF = p.n_features
    layer, feat = p.column("layer")[:nF].tolist(), p.column("feature")[:nF].tolist()
    units = sorted(set(zip(layer, feat)))
    # features rows: units 0 and 1 share their top contexts, the others have contexts of their own
    ctx = lambda ids: [{"context": c, "doc": 0, "offset": 0, "position": 1, "activation": 2.0 - 0.1 * k, "quantile": None,
                        "start": 0, "tokens": ["a"], "acts": [1.0]} for k, c in enumerate(ids)]
    rows = [{"layer": l, "feature": f, "top_contexts": ctx([1, 2, 3] if i < 2 else [100 + 3 * i, 101 + 3 * i])}
            for i, (l, f) in enumerate(units)]
    features = pa.Table.from_pylist(rows)
    only_ctx = {"logits": 0, "targets": 0, "decoder": 0, "encoder": 0, "contexts": 1}
    sset = auto_supernodes(p, features=features, weights=only_ctx, threshold=0.01)
    ids = p.nodes.column("node_id").to_pylist()
    both = {ids[i] for i in range(nF) if (layer[i], feat[i]) in units[:2]}
    groups = [set(s.nodes) for s in sset.supernodes]
    assert any(both <= gr for gr in groups)
    # every group is units 0/1 or one feature at several positions (same contexts)
    for gr in groups:
        us = {tuple(int(x) for x in n.split("_")[:2]) for n in gr}
        assert us <= set(units[:2]) or len(us) == 1
    with pytest.raises(ValueError, match="unknown block"):
        auto_supernodes(p, weights={"nope": 1})
    with pytest.raises(ValueError, match="no block"):
        auto_supernodes(p, weights={"logits": 0, "targets": 0})
    with pytest.raises(ValueError, match="threshold"):
        auto_supernodes(p, threshold=-1)
    with pytest.raises(ValueError, match="min_size"):
        auto_supernodes(p, min_size=1)
    big = auto_supernodes(p, clt=clt, min_size=3)
    assert all(len(s.nodes) >= 3 for s in big.supernodes)
