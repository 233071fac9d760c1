"""Attribution memory bounded by the kept nodes: selection on rectangular rows, the budget check, fused decoders."""

import pytest
import torch

import ct_ray.attribution.budget as B
from ct_ray import attribute, random_clt
from ct_ray.attribution.prune import block_influence, influence
from ct_ray.errors import PromptError

PROMPT = "The cat sat on the mat and looked at the dog"


def _key(g, i):
    return int(g.column("layer")[i]), int(g.column("position")[i]), int(g.column("feature")[i])


def _dense_selection(full, k_max, batch):
    """The iterative selection on the full square graph, with rows of visited features only (the old algorithm)."""
    A, nF, nL, N = full.adjacency, full.n_features, full.n_logits, full.n_nodes
    R = torch.zeros_like(A)
    R[N - nL :] = A[N - nL :]
    visited = torch.zeros(nF, dtype=torch.bool)
    while int(visited.sum()) < k_max:
        inf = influence(R, full.logit_weights)[:nF]
        inf[visited] = -1
        pick = torch.topk(inf, min(batch, k_max - int(visited.sum()))).indices
        R[pick] = A[pick]
        visited[pick] = True
    return torch.nonzero(visited).squeeze(1)


@pytest.mark.parametrize("family,span", [("llama", None), ("gemma2", 1)])
def test_selection_matches_dense_reference(tiny_models, family, span):
    lm = tiny_models[family]
    clt = random_clt(lm, 64, firing_rate=0.2, span=span)
    full = attribute(lm, clt, PROMPT, max_feature_nodes=None)
    part = attribute(lm, clt, PROMPT, max_feature_nodes=30, batch_size=8)
    sel = _dense_selection(full, 30, 8)
    assert part.n_features == 30 < full.n_features
    assert [_key(full, int(i)) for i in sel] == [_key(part, i) for i in range(30)]
    # the kept graph is the full graph restricted to its nodes: rows exact, no feature's edge lost or moved
    keep = torch.cat([sel, torch.arange(full.n_features, full.n_nodes)])
    torch.testing.assert_close(part.adjacency, full.adjacency[keep][:, keep], atol=1e-6, rtol=1e-5)


def test_keeping_every_feature_is_the_full_graph(tiny_models):
    lm = tiny_models["qwen2"]
    clt = random_clt(lm, 32, firing_rate=0.2)
    full = attribute(lm, clt, PROMPT, max_feature_nodes=None)
    n = full.meta["n_active_features"]
    for k in (n, n + 1, 10**9):
        assert torch.equal(attribute(lm, clt, PROMPT, max_feature_nodes=k).adjacency, full.adjacency)


def test_block_influence_matches_square_influence():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        n_src, nL = 60, 4
        layer = torch.sort(torch.randint(0, 6, (n_src,), generator=g)).values
        # sources feed targets at higher layers only (the layered structure of attribution graphs)
        A = torch.randn(n_src + nL, n_src, generator=g) * (torch.rand(n_src + nL, n_src, generator=g) < 0.4)
        t_layer = torch.cat([layer, torch.full((nL,), 6)])
        A = A * (t_layer[:, None] > layer[None, :])
        rows = torch.randperm(n_src, generator=g)[:25]  # only these sources have rows; the others are leaves
        sq = torch.zeros(n_src + nL, n_src + nL)
        sq[n_src:, :n_src] = A[n_src:]
        sq[rows, :n_src] = A[rows]
        w = torch.zeros(n_src + nL)
        w[n_src:] = torch.rand(nL, generator=g)
        ref = influence(sq, w)[:n_src]
        R = torch.cat([A[n_src:], A[rows]])
        blocks = [R[:nL], R[nL : nL + 10], R[nL + 10 :]]
        got = block_influence(blocks, R.abs().sum(1).clamp_min(1e-10), torch.cat([torch.full((nL,), -1), rows]),
                              torch.cat([torch.full((nL,), 6), layer[rows]]), torch.cat([w[n_src:], torch.zeros(25)]),
                              n_src, chunk_bytes=4 * n_src * 3)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rate", [0.2, 0.02])  # 0.02: layers with feature-less positions (gathered, not sliced)
def test_gathered_decoder_chunks_match_cached(tiny_models, monkeypatch, rate):
    lm = tiny_models["llama"]
    clt = random_clt(lm, 48, firing_rate=rate, seed=2)
    cached = attribute(lm, clt, PROMPT, max_feature_nodes=None)
    monkeypatch.setattr(B, "CACHE_FRACTION", 0.0)
    monkeypatch.setattr(B, "CHUNK_BYTES", 1)  # one position per chunk
    chunked = attribute(lm, clt, PROMPT, max_feature_nodes=None)
    torch.testing.assert_close(chunked.adjacency, cached.adjacency, atol=1e-6, rtol=1e-5)


def test_budget_error_names_what_fits(tiny_models):
    lm = tiny_models["llama"]
    clt = random_clt(lm, 64, firing_rate=0.2)
    with pytest.raises(B.GraphTooLargeError, match="memory budget") as e:
        attribute(lm, clt, PROMPT, memory_budget=1000)
    assert isinstance(e.value, PromptError)  # a sweep worker records it as an error row
    need = attribute(lm, clt, PROMPT, max_feature_nodes=20).meta["memory_estimate_bytes"]
    with pytest.raises(B.GraphTooLargeError, match=r"max_feature_nodes <= \d+ would fit") as e:
        attribute(lm, clt, PROMPT, max_feature_nodes=None, memory_budget=need)
    fit = int(str(e.value).split("max_feature_nodes <= ")[1].split()[0])
    assert fit >= 20
    g = attribute(lm, clt, PROMPT, max_feature_nodes=fit, memory_budget=need)
    assert g.meta["memory_estimate_bytes"] <= need


def test_budget_from_environment(monkeypatch):
    monkeypatch.setenv("CT_RAY_ATTRIBUTION_MEMORY", "1.5G")
    assert B.default_budget() == int(1.5 * 2**30)
    monkeypatch.setenv("CT_RAY_ATTRIBUTION_MEMORY", "lots")
    with pytest.raises(PromptError, match="CT_RAY_ATTRIBUTION_MEMORY"):
        B.default_budget()
    monkeypatch.delenv("CT_RAY_ATTRIBUTION_MEMORY")
    assert 0 < B.default_budget() < B.available_bytes()


def test_many_active_features_few_kept(tiny_models):
    """~10^5 active features: a square matrix over them would need tens of GB; the kept rows need a few MB."""
    lm = tiny_models["llama"]
    clt = random_clt(lm, 1024, firing_rate=0.25)
    g = attribute(lm, clt, "x" * 12 + PROMPT * 2, max_feature_nodes=16, batch_size=8)
    n = g.meta["n_active_features"]
    assert n > 50_000 and g.n_features == 16
    assert g.meta["memory_estimate_bytes"] < 4 * n * n / 50  # vs. an n x n float32 matrix
    assert torch.isfinite(g.adjacency).all() and g.adjacency[-g.n_logits :].abs().sum() > 0


def test_defaults_and_threads():
    import inspect

    from ct_ray.specs import AttributionSpec

    assert inspect.signature(attribute).parameters["max_feature_nodes"].default == B.DEFAULT_MAX_FEATURE_NODES
    assert AttributionSpec().max_feature_nodes == B.DEFAULT_MAX_FEATURE_NODES
    assert AttributionSpec(max_feature_nodes=None).max_feature_nodes is None
    assert B.streams_for(128, 2) == 2 and B.streams_for(8, 2) == 1 and B.streams_for(128, 1) == 1
    assert B.streams_for(128, 4, "meta") == 1  # not a CPU
    before = torch.get_num_threads()
    with B.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.real
def test_issue_scale_smollm2(smollm2):
    """The issue's case (SmolLM2, random_clt(2048, firing_rate=0.01), a 32-token prompt): ~3e4 active features,
    whose square matrix alone was 16 GB; with 48 kept features the rows are exact direct effects (autograd)."""
    from ._attr_helpers import autograd_rows

    clt = random_clt(smollm2, 2048, firing_rate=0.01)
    ids = smollm2.encode("The history of the city begins with a small settlement on the river, where traders met "
                         "to exchange salt, grain and cloth over many")[:32]
    g = attribute(smollm2, clt, ids, max_feature_nodes=48, batch_size=16, memory_budget=2**30)
    n = g.meta["n_active_features"]
    assert n > 20_000 and g.n_features == 48
    assert g.meta["memory_estimate_bytes"] <= 2**30 < 4 * n * n / 8  # 1 GiB; the old n x n matrix was ~9 GB
    rows = [0, g.n_features - 1, g.n_nodes - 1]
    torch.testing.assert_close(g.adjacency[rows], autograd_rows(smollm2, clt, g, rows), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("max_feature_nodes,batch_size", [(None, 32), (20, 32), (20, 8)])
def test_row_streams_give_the_single_stream_graph(tiny_models, max_feature_nodes, batch_size):
    """Rows computed by 3 streams at once (interleaved parts of each batch, one thread each) equal one stream's,
    and the caller's thread count is restored; batches too small to split run as one stream on 3 threads."""
    lm = tiny_models["gemma2"]
    clt = random_clt(lm, 64, seed=2, firing_rate=0.05)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = attribute(lm, clt, PROMPT, max_feature_nodes=max_feature_nodes, batch_size=batch_size)
        torch.set_num_threads(3)
        three = attribute(lm, clt, PROMPT, max_feature_nodes=max_feature_nodes, batch_size=batch_size)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert one.nodes.column("node_id").equals(three.nodes.column("node_id")) and 20 <= one.n_features
    torch.testing.assert_close(three.adjacency, one.adjacency, rtol=1e-5, atol=1e-6)
