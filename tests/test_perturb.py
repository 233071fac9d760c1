"""Interventions on the spliced model and perturbation validation of attribution graphs."""

import math

import pyarrow as pa
import pytest
import torch

from ct_ray import CrossLayerTranscoder, CTRayError, attribute, random_clt
from ct_ray.attribution.replacement import Replacement, Sources
from ct_ray.models.capture import capture
from ct_ray.perturb import (
    Intervention,
    InterventionError,
    PositionRange,
    Splice,
    SupernodeSet,
    ablate,
    collapse,
    generate,
    intervene,
    node_intervention,
    spearman,
    steer,
    suggest_supernodes,
    supernode_interventions,
    validate,
)
from ct_ray.store.schemas import PERTURBATIONS_SCHEMA

PROMPT = "The cat sat on"


@pytest.fixture(scope="module")
def setup(tiny_models):
    """(model, CLT, full graph, splice) per family, built once."""
    cache = {}

    def get(family, span=None, hook="resid_mid"):
        key = (family, span, hook)
        if key not in cache:
            lm = tiny_models[family]
            clt = random_clt(lm, 32, seed=1, span=span, firing_rate=0.1, feature_input_hook=hook)
            g = attribute(lm, clt, PROMPT)
            cache[key] = (lm, clt, g, Splice(lm, clt, g.meta["tokens"]))
        return cache[key]

    return get


def _node(g, i):
    return int(g.column("layer")[i]), int(g.column("position")[i]), int(g.column("feature")[i])


def _measured(g, sp, res):
    """Changes of every feature node's pre-activation and every logit node's demeaned logit: [B, nF + nL]."""
    nF = g.n_features
    dh = torch.stack([res.pre_acts[l][:, p, f] - sp.clean_pre[l][p, f] for l, p, f in map(lambda i: _node(g, i),
                                                                                         range(nF))], 1)
    return torch.cat([dh, res.logit_delta(g.meta["logit_tokens"])], 1)


# --- exactness ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,span,hook", [("llama", None, "resid_mid"), ("gemma2", None, "resid_mid"),
                                              ("gpt2", 2, "mlp_in")])
def test_constrained_matches_adjacency(setup, family, span, hook):
    """Constrained over all layers, scaling a feature by 1+e moves every downstream pre-activation and demeaned
    logit by e times the graph's adjacency column."""
    lm, clt, g, sp = setup(family, span, hook)
    nF, N, nL = g.n_features, g.n_nodes, g.n_logits
    cols = [0, nF // 3, nF // 2, nF - 1]
    e = 0.75
    rows = [Intervention(features=[_node(g, s)[::2]], positions=_node(g, s)[1], op="scale", value=1 + e)
            for s in cols]
    res = sp.run(rows, "constrained", return_activations=True, batch_size=3)
    meas = _measured(g, sp, res)
    rows_idx = torch.cat([torch.arange(nF), torch.arange(N - nL, N)])
    for b, s in enumerate(cols):
        expected = e * g.adjacency[rows_idx, s]
        torch.testing.assert_close(meas[b], expected, atol=1e-5 * float(expected.abs().max()) + 1e-6, rtol=1e-4)
    # features are clamped: every activation except the intervened one is its clean value
    for b, s in enumerate(cols):
        l, p, f = _node(g, s)
        for ll in range(sp.L):
            diff = res.acts[ll][b] - sp.clean_acts[ll]
            if ll == l:
                assert torch.allclose(diff[p, f], e * sp.clean_acts[l][p, f])
                diff[p, f] = 0
            assert not diff.any()


@pytest.mark.parametrize("family,span,hook", [("llama", None, "resid_mid"), ("gemma2", None, "resid_mid"),
                                              ("gpt2", 2, "mlp_in"), ("qwen3", 1, "resid_mid")])
def test_linear_constrained_path_equals_hooked_pass(setup, family, span, hook):
    """Constrained rows asking for logits only take the change-only pass (`perturb/linear.py`): it equals the
    hooked pass row by row (mixed first layers and positions, several features and positions per row, empty rows,
    output softcap), and a 1+e scaling moves the demeaned logits by e times the graph's adjacency."""
    lm, clt, g, sp = setup(family, span, hook)
    nF, N, nL = g.n_features, g.n_nodes, g.n_logits
    cols = [0, nF // 3, nF // 2, nF - 1]
    e = 0.75
    rows = [[Intervention(features=[_node(g, s)[::2]], positions=_node(g, s)[1], op="scale", value=1 + e)]
            for s in cols]
    rows += [[], [steer(1, 3, 2.0), Intervention(features=[(0, 5), (2, 7)], positions=slice(2, 5), op="add",
                                                   value=1.0)], [ablate(sp.L - 1, 4, positions="all")]]
    for bs in (1, 3, len(rows)):
        fast = sp.run(rows, "constrained", batch_size=bs)
        hooked = sp.run(rows, "constrained", batch_size=bs, linear_path=False)
        scale = float(hooked.logits.abs().max())
        torch.testing.assert_close(fast.logits, hooked.logits, atol=2e-6 * scale, rtol=1e-5)
        torch.testing.assert_close(fast.out_logits, hooked.out_logits, atol=2e-6 * scale, rtol=1e-5)
        assert torch.equal(fast.logits[len(cols)], sp.clean_logits)
        assert torch.equal(fast.out_logits[len(cols)], sp.clean_out_logits)
    # what validation asks for: watched features and, per row, one layer's real MLP output and CLT response
    watch = torch.stack([g.column("layer")[:nF], g.column("position")[:nF], g.column("feature")[:nF]], 1)
    at = [(b * 5) % (sp.L + 1) for b in range(len(rows))]  # includes L: no record for that row
    at[0] = None
    kw = {"watch": watch, "record_mlp_at": at, "batch_size": 4}
    fast_v, hooked_v = sp.run(rows, "constrained", **kw), sp.run(rows, "constrained", linear_path=False, **kw)
    for name in ("logits", "watched_acts", "watched_pre", "mlp_real_at", "mlp_response_at"):
        a, b = getattr(fast_v, name), getattr(hooked_v, name)
        torch.testing.assert_close(a, b, atol=2e-6 * float(b.abs().max()) + 1e-7, rtol=1e-5, msg=name)
    assert hooked_v.mlp_real is None and not fast_v.mlp_real_at[0].any()
    meas = fast.logit_delta(g.meta["logit_tokens"])
    for b, s in enumerate(cols):
        expected = e * g.adjacency[N - nL :, s]
        torch.testing.assert_close(meas[b], expected, atol=1e-5 * float(expected.abs().max()) + 1e-6, rtol=1e-4)
    # constrained over a layer range only, or with activations asked for: the hooked pass (same answers)
    part = sp.run(rows, {"mode": "constrained", "layers": [0, 1]}, batch_size=len(rows))
    assert torch.equal(part.logits, sp.run(rows, {"mode": "constrained", "layers": [0, 1]}, batch_size=len(rows),
                                           linear_path=False).logits)


@pytest.mark.parametrize("mode", ["free", "constrained", {"mode": "free", "freeze_attention": True}])
def test_set_to_own_value_changes_nothing(setup, mode):
    lm, clt, g, sp = setup("llama")
    rows = []
    for s in (0, g.n_features - 1):
        l, p, f = _node(g, s)
        rows.append([Intervention(features=[(l, f)], positions=p, op="set", value=float(sp.clean_acts[l][p, f]))])
    for row in rows:
        res = sp.run([row], mode, return_activations=True)
        assert torch.equal(res.logits[0], sp.clean_logits)
        assert torch.equal(res.out_logits[0], sp.clean_out_logits)
        assert all(torch.equal(res.acts[l][0], sp.clean_acts[l]) for l in range(sp.L))
        assert float(res.kl()[0]) == 0.0


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "gemma3"])
def test_free_mode_without_intervention_is_the_real_model(setup, family):
    lm, clt, g, sp = setup(family)
    toks = sp.tokens[None]
    real_last = lm.model(toks, use_cache=False, logits_to_keep=1).logits[0, -1]
    res = sp.run([[]], all_positions=True)
    assert torch.equal(res.all_logits[0], capture(lm, sp.tokens).logits)  # pre-softcap, every position
    assert torch.equal(sp.baseline().out_logits[0], real_last)
    # also when every layer is computed through the hooks (no skipping of clean layers), with attention frozen,
    # and in constrained mode: every change is exactly zero
    for kw in ({}, {"freeze_attention": True}, {"mode": "constrained"}):
        assert torch.equal(sp.baseline(skip_clean_layers=False, **kw).out_logits[0], real_last)


@pytest.mark.parametrize("span,layer", [(1, 1), (None, 0), (None, 1)])
def test_ablating_a_layer_replaces_its_reconstruction_by_the_bias(tiny_models, span, layer):
    """Reference: attribution's frozen replacement model with the layer's features removed from the decoder sum
    (for a per-layer transcoder: that layer's MLP output becomes b_dec + error)."""
    lm = tiny_models["qwen2"]
    clt = random_clt(lm, 16, seed=2, span=span, firing_rate=0.2)
    tokens = lm.encode(PROMPT)
    sp = Splice(lm, clt, tokens)
    P = sp.P
    iv = Intervention(features=[(layer, f) for f in range(16)], positions="all", op="set", value=0.0)
    res = sp.run([[iv]], "constrained", return_activations=True)

    rep = Replacement(lm, clt, capture(lm, tokens))
    acts = [a.clone() for a in rep.acts]
    acts[layer].zero_()
    b_dec = torch.stack([clt.b_dec[l] for l in range(sp.L)])[:, None]
    mlp = torch.stack(clt.decode(acts)) - b_dec + rep.mlp_const + rep.error
    if span == 1:
        expect = rep.error[layer] + clt.b_dec[layer]
        torch.testing.assert_close(mlp[layer, 1:], expect[1:])
    mids, fin = rep.forward(Sources(rep.cache.resid_pre0, mlp))
    ref_logits = rep.logits(fin)[-1]
    scale = float(ref_logits.abs().max())
    torch.testing.assert_close(res.logits[0], ref_logits, atol=1e-5 * scale, rtol=1e-5)
    for l in range(layer + 1, sp.L):
        ref_h = rep.read(l, mids[l]) @ clt.W_enc[l].T + clt.b_enc[l]
        torch.testing.assert_close(res.pre_acts[l][0, 1:], ref_h[1:], atol=1e-4, rtol=1e-4)
    assert not res.acts[layer][0].any()
    assert P > 2


def test_batched_rows_equal_single_rows(setup):
    lm, clt, g, sp = setup("gemma3")
    rows = [[ablate(*_node(g, s)[::2], positions=_node(g, s)[1])] for s in range(0, g.n_features, 11)][:3]
    rows.append([steer(1, 3, 2.0), Intervention(features=[(0, 5)], positions=slice(2, 5), op="add", value=1.0)])
    for mode in ("free", "constrained"):
        batched = sp.run(rows, mode, batch_size=3, return_activations=True)
        unskipped = sp.run(rows, mode, batch_size=5, skip_clean_layers=False)
        torch.testing.assert_close(batched.logits, unskipped.logits, atol=1e-5, rtol=1e-5)
        for b, row in enumerate(rows):
            one = sp.run([row], mode, return_activations=True)
            torch.testing.assert_close(batched.logits[b], one.logits[0], atol=1e-5, rtol=1e-5)
            for l in range(sp.L):
                torch.testing.assert_close(batched.pre_acts[l][b], one.pre_acts[l][0], atol=1e-5, rtol=1e-5)


def test_free_mode_recomputes_downstream_features(setup):
    lm, clt, g, sp = setup("llama")
    l, p, f = _node(g, 0)  # a layer-0 feature
    assert l == 0
    iv = [steer(l, f, -3.0, positions=p)]
    free = sp.run([iv], "free", return_activations=True)
    cons = sp.run([iv], "constrained", return_activations=True)
    later = range(l + 1, sp.L)
    assert any((free.acts[ll][0] != sp.clean_acts[ll]).any() for ll in later)
    assert all(torch.equal(cons.acts[ll][0], sp.clean_acts[ll]) for ll in later)
    # nothing before the intervention can change, so a range starting at its layer is "all layers"
    s1 = int(torch.nonzero(g.column("layer")[: g.n_features] == 1)[0])
    iv1 = [steer(1, _node(g, s1)[2], -3.0, positions=_node(g, s1)[1])]
    torch.testing.assert_close(sp.run([iv1], "constrained", layers=(1, sp.L - 1)).logits,
                               sp.run([iv1], "constrained").logits, atol=1e-6, rtol=1e-6)
    # positions before the intervened one never change (causal)
    assert all(torch.equal(free.pre_acts[ll][0, :p], sp.clean_pre[ll][:p]) for ll in range(sp.L))
    # a partial constrained range runs free after it
    part = sp.run([iv], "constrained", layers=(0, 0), return_activations=True)
    assert any((part.acts[ll][0] != sp.clean_acts[ll]).any() for ll in later)


def test_intervene_and_positions(setup):
    lm, clt, g, sp = setup("llama")
    res = intervene(lm, clt, g.meta["tokens"], [ablate(1, 2), steer(2, 3, 2.0, positions=[-1, 2])],
                    return_activations=True)
    assert res.logits.shape == (1, lm.adapter.vocab_size())
    assert sp.positions("all") == list(range(1, sp.P))
    assert sp.positions(PositionRange(start=0, stop=3)) == [1, 2]
    assert sp.positions(-1) == [sp.P - 1]
    assert sp.positions([1, -2]) == [1, sp.P - 2]
    assert Intervention(features=(1, 2), positions=range(2, 4), value=0).positions == [2, 3]
    # node_intervention targets the node's own layer, feature and position
    iv = node_intervention(g, 3, "scale", 0.5)
    assert iv.features == [_node(g, 3)[::2]] and iv.positions == _node(g, 3)[1]


@pytest.mark.parametrize(
    "bad,message",
    [
        (dict(features=[(7, 0)], positions=1, value=0.0), "layer 7"),
        (dict(features=[(0, 999)], positions=1, value=0.0), "feature 999"),
        (dict(features=[(0, 1)], positions=99, value=0.0), "position 99"),
        (dict(features=[(0, 1)], positions=0, value=0.0), "BOS"),
        (dict(features=[(0, 1)], positions={"start": 3, "stop": 99}, value=0.0), "outside the prompt"),
        (dict(features=[(0, 1)], positions=1, value=float("nan")), "finite"),
        (dict(features=[(0, 1)], positions=1, value=float("inf")), "finite"),
        (dict(features=[], positions=1, value=1.0), "at least one"),
        (dict(features=[(0, 1)], positions=[], value=1.0), "empty list of positions"),
        (dict(features=[(0, 1)], positions=1, op="multiply", value=1.0), "op"),
        (dict(features=[(0, 1)], value=1.0, extra=3), "extra"),
    ],
)
def test_bad_interventions(setup, bad, message):
    lm, clt, g, sp = setup("llama")
    with pytest.raises(CTRayError, match=message):
        sp.run([[bad]])
    with pytest.raises(CTRayError, match=message):
        intervene(lm, clt, PROMPT, [bad])


def test_bad_calls(setup):
    lm, clt, g, sp = setup("llama")
    with pytest.raises(InterventionError, match="finite"):
        Intervention(features=[(0, 1)], value=float("nan"))
    with pytest.raises(InterventionError, match="empty list of interventions"):
        sp.run([])
    with pytest.raises(InterventionError, match="empty list of interventions"):
        intervene(lm, clt, PROMPT, [])
    with pytest.raises(InterventionError, match="twice"):
        sp.run([[ablate(0, 1, positions=2), steer(0, 1, 2.0, positions=[2, 3])]])
    with pytest.raises(InterventionError, match="layer range"):
        sp.run([[ablate(0, 1)]], "constrained", layers=(0, 9))
    with pytest.raises(InterventionError, match="only applies"):
        sp.run([[ablate(0, 1)]], "free", layers=(0, 1))
    with pytest.raises(InterventionError, match="mode"):
        sp.run([[ablate(0, 1)]], "sideways")
    with pytest.raises(InterventionError, match="feature nodes"):
        node_intervention(g, g.n_nodes - 1)
    with pytest.raises(CTRayError, match="CLT shape mismatch"):
        Splice(lm, CrossLayerTranscoder(sp.L, 32, 8), PROMPT)


# --- generation -----------------------------------------------------------------------------------------------
def test_generation(setup):
    lm, clt, g, sp = setup("llama")
    base = generate(lm, clt, PROMPT, None, 4)
    toks = lm.encode(PROMPT)
    for _ in range(4):  # the real model's greedy continuation
        nxt = lm.model(toks[None], use_cache=False, logits_to_keep=1).logits[0, -1].argmax()
        toks = torch.cat([toks, nxt[None]])
    assert base.tokens == toks.tolist()
    assert len(base.new_tokens) == 4 and base.text == "".join(lm.decode(base.new_tokens))
    steered = generate(lm, clt, PROMPT, [Intervention(features=[(0, f) for f in range(32)], op="scale", value=-8.0)],
                       4)
    assert steered.tokens[: sp.P] == base.tokens[: sp.P] and steered.new_tokens != base.new_tokens


# --- validation -----------------------------------------------------------------------------------------------
def test_validate_full_graph_constrained_is_exact(setup):
    lm, clt, g, sp = setup("llama")
    v = validate(lm, clt, g, top_k=4, mode="constrained")
    m = v.metrics
    assert m["n_interventions"] == 12 and m["n_targets"] == 4
    assert m["logit_spearman"] > 0.999 and m["logit_sign_agreement"] == 1.0
    assert m["feature_spearman"] > 0.999 and m["feature_sign_agreement"] > 0.99
    torch.testing.assert_close(v.predicted_logits, v.measured_logits, atol=1e-4, rtol=1e-4)
    assert v.table.schema.equals(PERTURBATIONS_SCHEMA)  # one row type: a sweep's perturbations table
    assert v.table.num_rows == 12 * g.n_logits
    t = v.table.to_pylist()[0]
    assert t["node_id"] == v.targets[0].name and t["op"] == "set" and t["mode"] == "constrained"
    assert t["node"] == v.targets[0].nodes[0] and t["supernode"] is None and t["status"] == "ok"
    assert t["target_kind"] == "logit" and t["target_token"] == g.meta["logit_tokens"][0]
    assert math.isclose(t["kl"], float(v.kl[0]), rel_tol=1e-6)
    # the top targets are the most influential features
    infl = g.influence()[: g.n_features]
    assert v.targets[0].nodes == [int(infl.argmax())]


def test_validate_pruned_free_mode_with_supernodes(setup):
    lm, clt, g, sp = setup("gemma2")
    p = g.prune(0.8, 0.98)
    sset = suggest_supernodes(p)
    v = validate(lm, clt, p, top_k=3, mode="free", supernodes=sset, ops=[("set", 0.0), ("scale", 2.0)])
    m = v.metrics
    assert m["n_targets"] == 3 + len(sset.supernodes)
    for k in ("logit_spearman", "logit_sign_agreement", "feature_spearman", "kl_influence_spearman",
              "faithfulness_cosine", "faithfulness_nmse"):
        assert math.isfinite(m[k]), k
    assert -1 <= m["faithfulness_cosine"] <= 1 and m["faithfulness_nmse"] >= 0
    assert m["n_ablations"] == m["n_targets"]
    assert v.table.num_rows == m["n_interventions"] * p.n_logits
    rows = v.table.to_pylist()
    assert {r["supernode"] for r in rows if r["node"] is None} == {s.name for s in sset.supernodes}
    assert all((r["node"] is None) != (r["supernode"] is None) for r in rows)


def test_sweep_perturbation_rows_are_validation_rows(setup):
    """The sweep's perturbation job is `validate` on the plan's nodes, one call per mode: its rows are the
    perturbations table's, indexed by the plan's interventions, with the measured logits and KL filled in."""
    from ct_ray.perturb import perturbation_rows
    from ct_ray.specs import PerturbationPlan
    from ct_ray.sweep.perturbation import finish_rows, select_nodes

    lm, clt, g, sp = setup("llama")
    plan = PerturbationPlan(top_k=2, interventions=[{"op": "scale", "value": -1.0, "mode": "constrained"},
                                                    {"op": "set", "value": 0.0, "mode": "free"},
                                                    {"op": "scale", "value": 2.0, "mode": "constrained"}])
    nodes = select_nodes(g.prune(0.8, 0.98), plan)
    plan = plan.model_copy(update={"nodes": nodes})
    t = finish_rows(perturbation_rows(lm, clt, g, plan), g, "k", plan.plan_hash())
    rows = t.to_pylist()
    assert len(rows) == 3 * len(nodes) * g.n_logits
    assert {r["node"] for r in rows} == set(nodes) and {r["key"] for r in rows} == {"k"}
    for r in rows:
        iv = plan.interventions[r["intervention"]]
        assert (r["op"], r["value"], r["mode"]) == (iv.op, iv.value, iv.mode) and r["status"] == "ok"
        for c in ("node_id", "interventions", "logit_before", "logit_after", "prob_before", "prob_after", "kl",
                  "target_str", "predicted_direct", "measured_delta", "baseline"):
            assert r[c] is not None, c
    # constrained rows are exact: the graph's prediction is the measured change
    cons = [r for r in rows if r["mode"] == "constrained"]
    pred = torch.tensor([r["predicted_delta"] for r in cons])
    torch.testing.assert_close(pred, torch.tensor([r["measured_delta"] for r in cons]), atol=1e-4, rtol=1e-3)


def test_validate_rejects_a_graph_of_another_clt(setup):
    lm, clt, g, sp = setup("llama")
    other = random_clt(lm, 32, seed=9, firing_rate=0.1)
    with pytest.raises(CTRayError, match="another CLT"):
        validate(lm, other, g, top_k=2)
    with pytest.raises(CTRayError, match="top_k"):
        validate(lm, clt, g, top_k=0)
    with pytest.raises(CTRayError, match="ops"):
        validate(lm, clt, g, spec={"ops": [["scale", float("nan")]]})
    v = validate(lm, clt, g, spec={"top_k": 1, "ops": [["scale", 0.5]], "mode": {"mode": "free"}})
    assert v.metrics["n_interventions"] == 1 and v.metrics["mode"] == "free"


def test_spearman():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([0.0, 0.0, 5.0])) == pytest.approx(1.0)
    assert math.isnan(spearman(x, torch.ones(4)))


# --- supernodes -----------------------------------------------------------------------------------------------
def test_supernodes(setup):
    lm, clt, g, sp = setup("llama")
    ids = g.nodes.column("node_id").to_pylist()
    sset = SupernodeSet.parse([{"name": "a", "nodes": ids[:3]}, {"name": "b", "nodes": [ids[5]]}])
    cg = collapse(g, sset)
    assert cg.labels[:2] == ["a", "b"] and len(cg.labels) == g.n_nodes - 2
    A = g.adjacency
    inside = A[:3, :3].sum()
    torch.testing.assert_close(cg.adjacency.sum(), A.sum() - inside - A[5, 5], atol=1e-3, rtol=1e-5)
    j = cg.labels.index(ids[g.n_nodes - 1])  # a logit node: its edge from "a" sums the members' edges
    torch.testing.assert_close(cg.adjacency[j, 0], A[g.n_nodes - 1, :3].sum())
    assert isinstance(cg.edges(), pa.Table)

    ivs = supernode_interventions(g, sset, "a", "scale", 0.0)
    assert [iv.features[0] for iv in ivs] == [_node(g, i)[::2] for i in range(3)]
    res = sp.run([ivs], "constrained", return_activations=True)
    for i in range(3):
        l, p, f = _node(g, i)
        assert res.acts[l][0, p, f] == 0

    for bad, message in [([{"name": "x", "nodes": ["nope"]}], "not in the graph"),
                         ([{"name": "x", "nodes": [ids[0]]}, {"name": "y", "nodes": [ids[0]]}], "both"),
                         ([{"name": "x", "nodes": [ids[0]]}, {"name": "x", "nodes": [ids[1]]}], "unique"),
                         ([{"name": "x", "nodes": []}], "nodes")]:
        with pytest.raises(CTRayError, match=message):
            collapse(g, bad)
    with pytest.raises(CTRayError, match="only feature nodes"):
        supernode_interventions(g, [{"name": "e", "nodes": [ids[g.n_features]]}], "e")


def test_suggested_supernodes_group_same_feature(setup):
    lm, clt, g, sp = setup("llama")
    sset = suggest_supernodes(g)
    assert sset.supernodes
    by_feature = {}
    for i in range(g.n_features):
        l, p, f = _node(g, i)
        by_feature.setdefault((l, f), set()).add(g.nodes.column("node_id")[i].as_py())
    for s in sset.supernodes:
        if s.name.startswith("L"):
            l, f = (int(x[1:]) for x in s.name.split("/"))
            assert set(s.nodes) == by_feature[(l, f)]
    # a plain spec: round-trips through JSON, so users can edit it
    again = SupernodeSet.parse(sset.model_dump(mode="json"))
    assert again == sset


# --- CLI ------------------------------------------------------------------------------------------------------
def test_cli_perturb(capsys, tiny_dir, tmp_path):
    import pyarrow.parquet as pq

    from ct_ray.cli import main
    from ct_ray.models import load_model

    lm = load_model(str(tiny_dir))
    clt = random_clt(lm, 16, seed=0)
    graph_dir = str(tmp_path / "graph")
    attribute(lm, clt, "hello there").save(graph_dir)
    code = main(["perturb", "--model", str(tiny_dir), "--random-clt", "16", "--graph", graph_dir, "--top-k", "3",
                 "--out", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "predicted" in out.out and "spearman" in out.out
    t = pq.read_table(tmp_path / "out" / "perturbations.parquet")
    assert t.schema.equals(PERTURBATIONS_SCHEMA) and t.num_rows > 0
    code = main(["perturb", "--model", str(tiny_dir), "--random-clt", "16", "--prompt", "hello there", "--top-k", "2",
                 "--mode", "free", "--ops", "scale:0"])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--random-clt", "16"], "exactly one of --graph"),
        (["--random-clt", "16", "--prompt", "hi", "--graph", "/x"], "exactly one of --graph"),
        (["--prompt", "hi"], "--random-clt"),
        (["--random-clt", "16", "--prompt", "hi", "--ops", "scale:nan"], "finite"),
        (["--random-clt", "16", "--prompt", "hi", "--ops", "zap:1"], "bad --ops"),
        (["--random-clt", "16", "--prompt", "hi", "--top-k", "0"], "--top-k"),
        (["--random-clt", "16", "--prompt", "hi", "--layers", "0:9"], "layer range"),
        (["--random-clt", "16", "--graph", "/nonexistent/graph"], "no graph at"),
        (["--random-clt", "8", "--graph", "{graph}"], "another CLT"),
    ],
)
def test_cli_perturb_bad_input(capsys, tiny_dir, tmp_path, argv, message):
    from ct_ray.cli import main
    from ct_ray.models import load_model

    graph_dir = str(tmp_path / "graph")
    if "{graph}" in argv:
        lm = load_model(str(tiny_dir))
        attribute(lm, random_clt(lm, 16, seed=0), "hello there").save(graph_dir)
    argv = [a.format(graph=graph_dir) for a in argv]
    code = main(["perturb", "--model", str(tiny_dir), "--no-progress", *argv])  # no attribution bar on stderr
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1


# --- the real default model -----------------------------------------------------------------------------------
@pytest.mark.real
def test_smollm2_interventions(smollm2):
    clt = random_clt(smollm2, 128, seed=3, firing_rate=0.01)
    g = attribute(smollm2, clt, "The capital of France is")
    sp = Splice(smollm2, clt, g.meta["tokens"])
    real = smollm2.model(sp.tokens[None], use_cache=False, logits_to_keep=1).logits[0, -1]
    assert torch.equal(sp.baseline().out_logits[0], real)
    # constrained over all layers: the measured change is e times the adjacency column, feature by feature
    nF, N, nL = g.n_features, g.n_nodes, g.n_logits
    cols = [nF // 4, nF // 2]
    res = sp.run([steer(*_node(g, s)[::2], 1.5, positions=_node(g, s)[1]) for s in cols], "constrained",
                 return_activations=True)
    meas = _measured(g, sp, res)
    rows_idx = torch.cat([torch.arange(nF), torch.arange(N - nL, N)])
    for b, s in enumerate(cols):
        expected = 0.5 * g.adjacency[rows_idx, s]
        torch.testing.assert_close(meas[b], expected, atol=1e-4 * float(expected.abs().max()) + 1e-5, rtol=1e-3)
    v = validate(smollm2, clt, g.prune(), top_k=3, mode="free")
    assert math.isfinite(v.metrics["logit_spearman"]) and v.table.num_rows == 9 * g.n_logits
