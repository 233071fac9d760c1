import pytest
import torch

from ct_ray import attribute, random_clt
from ct_ray.attribution.prune import influence, mass_threshold, prune


def _ref_threshold(scores, frac):
    s = torch.sort(scores.double(), descending=True).values
    c = torch.cumsum(s, 0) / s.sum()
    return float(s[min(int(torch.searchsorted(c, frac)), len(s) - 1)])


def _ref_prune(A, w, n_feat, n_fixed, nt, et):
    """circuit-tracer's dense algorithm, as a reference."""
    norm = lambda M: M.abs() / M.abs().sum(1, keepdim=True).clamp(min=1e-10)  # noqa: E731

    def infl(M, w):
        cur = w @ M
        tot = cur.clone()
        while cur.any():
            cur = cur @ M
            tot += cur
        return tot

    ni = infl(norm(A), w)
    nm = ni >= _ref_threshold(ni[: len(ni) - n_fixed], nt)
    nm[-n_fixed:] = True
    P = A.clone()
    P[~nm] = 0
    P[:, ~nm] = 0
    Np = norm(P)
    es = Np * (infl(Np, w) + w)[:, None]
    em = (es >= _ref_threshold(es.flatten(), et)) & (es > 0)
    old = None
    while old is None or not torch.equal(old, nm):
        old = nm.clone()
        em[~nm] = False
        em[:, ~nm] = False
        nm[:-n_fixed] &= em[:, :-n_fixed].any(0)
        nm[:n_feat] &= em[:n_feat].any(1)
    return nm


def _random_dag(n, n_fixed_logits, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g) * (torch.rand(n, n, generator=g) < 0.3)
    A = torch.tril(A, -1)  # acyclic: every edge goes from an earlier node to a later one
    w = torch.zeros(n)
    w[-n_fixed_logits:] = torch.rand(n_fixed_logits, generator=g)
    return A, w


@pytest.mark.parametrize("frac", [0.0, 0.3, 0.8, 0.98, 0.999])
def test_mass_threshold_matches_sort(frac):
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        x = torch.rand(int(torch.randint(1, 3000, (1,), generator=g)), generator=g) ** 4
        x[torch.rand(x.shape, generator=g) < 0.4] = 0
        if x.sum() == 0:
            continue
        tau = mass_threshold(lambda x=x: iter(x.split(257)), frac)
        assert (x >= tau).sum() == (x >= _ref_threshold(x, frac)).sum()


def test_prune_matches_reference_on_random_dags():
    for seed in range(3):
        A, w = _random_dag(150, 5, seed)
        n_feat, n_fixed = 100, 20
        res = prune(A, w, n_feat, n_fixed, 0.8, 0.98)
        ref = _ref_prune(A, w, n_feat, n_fixed, 0.8, 0.98)
        assert torch.equal(res.node_mask, ref)


@pytest.fixture(scope="module")
def graph(tiny_models):
    lm = tiny_models["llama"]
    return attribute(lm, random_clt(lm, 48, firing_rate=0.15), "Pruning keeps what matters")


def test_scores_and_fixed_nodes(graph):
    full = graph.scores()
    pruned = graph.prune()
    for s in (full, pruned.scores()):
        assert 0.0 <= s["replacement_score"] <= 1.0 and 0.0 <= s["completeness_score"] <= 1.0
    kinds = pruned.nodes.column("kind").to_pylist()
    assert kinds.count("embedding") == graph.n_embeddings and kinds.count("logit") == graph.n_logits
    assert pruned.n_nodes < graph.n_nodes and pruned.n_edges < graph.n_edges


def test_prune_monotone_in_thresholds(graph):
    sizes = [graph.prune(t, 0.98).n_nodes for t in (0.3, 0.5, 0.8, 0.95)]
    assert sizes == sorted(sizes)
    edges = [graph.prune(0.8, t).n_edges for t in (0.5, 0.8, 0.95, 0.99)]
    assert edges == sorted(edges)


def test_prune_rejects_bad_thresholds(graph):
    with pytest.raises(ValueError):
        graph.prune(1.5)


def test_influence_is_chunk_independent(graph):
    import ct_ray.attribution.prune as P

    a = influence(graph.adjacency, graph.logit_weights)
    old = P.CHUNK
    P.CHUNK = 7
    try:
        b = influence(graph.adjacency, graph.logit_weights)
    finally:
        P.CHUNK = old
    torch.testing.assert_close(a, b)
