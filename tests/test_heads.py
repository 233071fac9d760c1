"""Head loadings and QK attribution (attribution/heads.py, attribution/qk.py): exact decompositions, checked
against interventions on the frozen replacement model, on every tiny family and on the real default model."""

import pytest
import torch

from ct_ray.attribution.attribute import _features, attribute
from ct_ray.attribution.heads import NO_HEAD, OTHER_HEADS, head_loadings
from ct_ray.attribution.qk import BIAS, QKItem, QKMaps, _top_pairs, qk_attribution, rotary, select_items
from ct_ray.attribution.replacement import Replacement, Sources
from ct_ray.clt.transcoder import random_clt
from ct_ray.models.capture import capture
from ct_ray.models.tiny import FAMILIES

PROMPT = "Hello world, the cat sat"


def _setup(model, full=False, seed=0):
    clt = random_clt(model, 256, seed=seed)
    g = attribute(model, clt, PROMPT, max_feature_nodes=None if full else 7500)
    rep = Replacement(model, clt, capture(model, torch.tensor(g.meta["tokens"])))
    return clt, g, rep


def _assert_heads_exact(hl, rtol=1e-5):
    err = hl.residual()
    scale = hl.scale() + torch.from_numpy(hl.edge).double().abs()
    assert torch.all(err <= rtol * scale + 1e-6), f"max violation {float((err - rtol * scale).max())}"


@pytest.mark.parametrize("family", FAMILIES)
def test_head_loadings_sum_to_edges(tiny_models, family):
    model = tiny_models[family]
    _, g, rep = _setup(model)
    for graph in (g, g.prune(0.8, 0.98)):
        hl = head_loadings(rep, graph)
        assert len(hl.edge) == graph.n_edges
        _assert_heads_exact(hl)
        # rows: a residual-path row per edge, the top heads, the rest in one row; each edge's rows sum to it
        rows = hl.rows(top=3).to_pandas()
        assert (rows["head"] == NO_HEAD).sum() == graph.n_edges
        assert rows.groupby(["source", "target"]).size().max() <= 5
        sums = rows.groupby(["source", "target"])["weight"].sum()
        edges = graph.edges().to_pandas().set_index(["source", "target"])["weight"]
        torch.testing.assert_close(torch.tensor(sums.loc[edges.index].values), torch.tensor(edges.values),
                                   atol=1e-5, rtol=1e-4)
        assert (rows["head"] == OTHER_HEADS).any() or rep.L * rep.H <= 3


def _frozen_forward(rep, src, mask=None, frozen=None):
    """rep.forward with head `mask = (layer, head, position)` removed from its layer's output at that position, and
    the attention outputs of the layers above replaced by `frozen` (those of an unmasked run). Returns (mids, the
    attention outputs of each layer)."""
    x, mids, outs = src.emb, [], []
    for l in range(rep.L):
        W = rep.W[l]
        n = W.attn_norm.apply(x, rep.s_attn[l])
        v = n @ W.W_V.T
        if W.b_V is not None:
            v = v + W.b_V
        v = v.view(-1, rep.Hkv, rep.dh).repeat_interleave(rep.H // rep.Hkv, dim=1)
        z = torch.einsum("hpq,qhd->phd", rep.patterns[l], v)
        if mask is not None and l == mask[0]:
            z = z.clone()
            z[mask[2], mask[1]] = 0
        o = z.reshape(-1, rep.H * rep.dh) @ W.W_O.T
        if W.b_O is not None:
            o = o + W.b_O
        if rep.s_post is not None:
            o = W.attn_post_norm.apply(o, rep.s_post[l])
        if mask is not None and frozen is not None and l > mask[0]:
            o = frozen[l]
        outs.append(o)
        x = x + o
        mids.append(x)
        x = x + src.mlp[l]
    return torch.stack(mids), outs


@pytest.mark.parametrize("family", FAMILIES)
def test_zeroing_a_head_changes_a_target_as_its_loadings_predict(tiny_models, family):
    """Constrained mode (feature activations and errors clamped, patterns and norms frozen: linear): removing head h
    of layer l at a feature's position, with the heads above held at their values, changes the feature's
    pre-activation by minus the sum of that head's loadings over every source."""
    model = tiny_models[family]
    clt, g, rep = _setup(model, full=True)
    hl = head_loadings(rep, g)
    layer, pos, feat = g.column("layer"), g.column("position"), g.column("feature")
    t = g.n_features - 1  # a feature of the top layer with sources below
    lt, pt, it = int(layer[t]), int(pos[t]), int(feat[t])
    assert lt >= 1
    real, const = rep.real_sources(), rep.constant_sources()

    def pre_act(mids):
        return float(rep.read(lt, mids[lt])[pt] @ clt.W_enc[lt][it])

    base_r, outs_r = _frozen_forward(rep, real)
    base_c, outs_c = _frozen_forward(rep, const)
    sel = hl.target == int(g.nodes.column("node")[t].as_py())
    checked = 0
    for l in range(lt + 1):
        for h in range(rep.H):
            m_r, _ = _frozen_forward(rep, real, (l, h, pt), outs_r)
            m_c, _ = _frozen_forward(rep, const, (l, h, pt), outs_c)
            delta = (pre_act(m_r) - pre_act(m_c)) - (pre_act(base_r) - pre_act(base_c))
            predicted = -float(hl.heads[sel, l, h].double().sum())
            scale = float(hl.heads[sel].abs().sum())
            assert abs(delta - predicted) <= 1e-5 * scale + 1e-6, (l, h, delta, predicted)
            checked += 1
    assert checked == (lt + 1) * rep.H


@pytest.mark.parametrize("family", FAMILIES)
def test_qk_terms_sum_to_the_real_score(tiny_models, family):
    model = tiny_models[family]
    _, g, rep = _setup(model)
    gp = g.prune(0.8, 0.98)
    hl = head_loadings(rep, gp)
    items = select_items(model, rep, gp, hl, topk=4)
    assert items
    nodes = set(gp.nodes.column("node").to_pylist())
    assert all(it.target in nodes for it in items)
    for r in qk_attribution(model, rep, items, top=5):
        assert abs(r.score - r.decomposed) <= 1e-5 * r.scale + 1e-6
        assert abs(float(r.key_terms.sum()) - r.score) <= 1e-5 * float(r.key_terms.abs().sum()) + 1e-6
        assert len(r.pairs) == 5 and len(r.query_side) <= 5
        assert abs(r.pairs[0][2]) >= abs(r.pairs[-1][2])
        assert r.ids[-1] == BIAS
    # the recomputed scores are the model's: softmax (after any softcap) reproduces every real pattern row
    maps = QKMaps(model, rep, rotary(model, rep.cache.tokens))
    p = rep.P - 1
    for l in range(rep.L):
        cap = maps.weights(l).softcap
        for h in range(rep.H):
            s = torch.tensor([maps.score(l, h, p, k) for k in range(rep.P)], dtype=torch.float64)
            if cap:
                s = cap * torch.tanh(s / cap)
            pat = rep.patterns[l, h, p].double()
            on = pat > 1e-4
            d = s[on] - pat[on].log()
            assert float(d.max() - d.min()) < 1e-4


def test_qk_pairs_are_the_exact_top():
    """The pruned search for the largest pairwise terms finds the brute-force top."""
    torch.manual_seed(0)
    Cq = torch.randn(16, 300, dtype=torch.float64)
    Ck = torch.randn(16, 280, dtype=torch.float64)
    T = 0.5 * Cq.T @ Ck
    want = T.abs().flatten().topk(9).values
    got = torch.tensor([abs(v) for _, _, v in _top_pairs(Cq, Ck, 0.5, 9)], dtype=torch.float64)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_scaling_a_query_side_source_moves_the_score_as_predicted(tiny_models, family):
    """A feature after the key position reaches only the query side (causal attention): scaling its activation by a
    changes the score by (a - 1) x its query-side marginal, exactly under frozen norms."""
    model = tiny_models[family]
    clt, g, rep = _setup(model)
    P = rep.P
    item = QKItem(rep.L - 1, 1, P - 1, 2)
    (r,) = qk_attribution(model, rep, [item])
    f_layer, f_pos, f_idx, f_act = _features(rep)  # the first source columns, in this order
    cand = [j for j in range(len(f_layer)) if f_pos[j] > item.key and f_layer[j] < item.layer]
    j = max(cand, key=lambda j: abs(float(r.query_terms[j])))
    a = -1.5
    mlp = rep.cache.mlp_out.clone()
    dec = clt.W_dec[int(f_layer[j])][int(f_idx[j])].detach()  # [span, d]
    lo = int(f_layer[j])
    mlp[lo : lo + dec.shape[0], int(f_pos[j])] += (a - 1) * float(f_act[j]) * dec[: rep.L - lo]
    mids, _ = rep.forward(Sources(rep.cache.resid_pre0, mlp))
    x_new = mids[item.layer - 1] + mlp[item.layer - 1]
    maps = QKMaps(model, rep, rotary(model, rep.cache.tokens))
    kv = item.head // (rep.H // rep.Hkv)
    q = maps.vector(item.layer, x_new[item.query], item.query, item.head, "q").double()
    k = maps.vector(item.layer, maps.x_real[item.layer, item.key], item.key, kv, "k").double()
    new = maps.weights(item.layer).scaling * float(q @ k)
    predicted = r.score + (a - 1) * float(r.query_terms[j])
    assert abs(new - predicted) <= 1e-5 * r.scale + 1e-6
    assert abs(float(r.query_terms[j])) > 0


def test_heads_and_qk_on_smollm2(smollm2):
    """The real default model (GQA: 9 query heads over 3 KV heads, RoPE)."""
    clt = random_clt(smollm2, 128, seed=3, firing_rate=0.01)
    g = attribute(smollm2, clt, "The capital of France is").prune(0.8, 0.98)
    rep = Replacement(smollm2, clt, capture(smollm2, torch.tensor(g.meta["tokens"])))
    assert rep.H == 9 and rep.Hkv == 3
    hl = head_loadings(rep, g)
    _assert_heads_exact(hl)
    items = select_items(smollm2, rep, g, hl, topk=3, max_keys=1)
    res = qk_attribution(smollm2, rep, items)
    assert len(res) == 3
    for r in res:
        assert abs(r.score - r.decomposed) <= 1e-5 * r.scale + 1e-6


def test_head_loadings_check_their_memory_first(tiny_models):
    from ct_ray.attribution.budget import GraphTooLargeError

    _, g, rep = _setup(tiny_models["llama"])
    with pytest.raises(GraphTooLargeError, match="head loadings of .* edges need"):
        head_loadings(rep, g, memory_budget=10_000)
