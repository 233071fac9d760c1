import pytest
import torch

from ct_ray import attribute, random_clt
from ct_ray.attribution.replacement import Replacement
from ct_ray.models.capture import capture
from ct_ray.models.tiny import FAMILIES

from ._attr_helpers import assert_exact, autograd_rows

PROMPT = "The cat sat on"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("span,hook", [(None, "resid_mid"), (1, "resid_mid"), (2, "mlp_in")])
def test_exact_attribution(tiny_models, family, span, hook):
    lm = tiny_models[family]
    clt = random_clt(lm, 32, seed=1, span=span, firing_rate=0.1, feature_input_hook=hook)
    cache = capture(lm, lm.encode(PROMPT))
    rep = Replacement(lm, clt, cache)
    _, fin = rep.forward(rep.real_sources())
    logits = rep.logits(fin)
    rel = (logits - cache.logits).abs().max() / cache.logits.abs().max()
    assert rel <= 1e-5, f"replacement logits differ from the real model's: {rel}"

    g = attribute(lm, clt, PROMPT, batch_size=7)
    assert g.n_features > 10
    assert g.nodes.column("kind").to_pylist()[: g.n_features] == ["feature"] * g.n_features
    assert_exact(g)
    # a handful of rows against autograd through the frozen forward: edge by edge, not just the sum
    N = g.n_nodes
    rows = [0, g.n_features // 2, g.n_features - 1, N - 1, N - g.n_logits]
    ref = autograd_rows(lm, clt, g, rows)
    torch.testing.assert_close(g.adjacency[rows], ref, atol=2e-5, rtol=1e-4)


def test_bos_features_excluded(tiny_models):
    lm = tiny_models["llama"]
    clt = random_clt(lm, 32, firing_rate=0.3)
    g = attribute(lm, clt, PROMPT)
    pos = g.column("position")[: g.n_features]
    assert pos.min() >= 1
    err_pos0 = [i for i in range(g.n_features, g.n_features + g.n_errors) if int(g.column("position")[i]) == 0]
    assert not g.adjacency[:, err_pos0].any()  # BOS's MLP output is a constant term


def test_logit_selection(tiny_models):
    lm = tiny_models["qwen2"]
    clt = random_clt(lm, 16)
    g = attribute(lm, clt, PROMPT, max_n_logits=3, desired_logit_prob=0.99)
    assert g.n_logits == 3
    g1 = attribute(lm, clt, PROMPT, max_n_logits=10, desired_logit_prob=1e-6)
    assert g1.n_logits == 1
    p = g.meta["logit_probs"]
    assert p == sorted(p, reverse=True)


def test_token_ids_and_string_agree(tiny_models):
    lm = tiny_models["gemma2"]
    clt = random_clt(lm, 16, firing_rate=0.2)
    a = attribute(lm, clt, PROMPT)
    b = attribute(lm, clt, lm.encode(PROMPT))
    assert torch.equal(a.adjacency, b.adjacency)


def test_max_feature_nodes(tiny_models):
    lm = tiny_models["llama"]
    clt = random_clt(lm, 32, firing_rate=0.2)
    full = attribute(lm, clt, PROMPT)
    part = attribute(lm, clt, PROMPT, max_feature_nodes=20, batch_size=8)
    assert part.n_features == 20 < full.n_features
    assert part.meta["n_active_features"] == full.n_features
    # the selected features are the most influential ones of the full graph, roughly: the top one is in
    infl = full.influence()[: full.n_features]
    top = int(infl.argmax())
    key = lambda g, i: (int(g.column("layer")[i]), int(g.column("position")[i]), int(g.column("feature")[i]))  # noqa
    assert key(full, top) in {key(part, i) for i in range(part.n_features)}


@pytest.mark.real
def test_exact_attribution_smollm2(smollm2):
    clt = random_clt(smollm2, 128, seed=3, firing_rate=0.01)
    cache = capture(smollm2, smollm2.encode("The capital of France is"))
    rep = Replacement(smollm2, clt, cache)
    _, fin = rep.forward(rep.real_sources())
    rel = (rep.logits(fin) - cache.logits).abs().max() / cache.logits.abs().max()
    assert rel <= 1e-5
    g = attribute(smollm2, clt, "The capital of France is")
    assert g.n_features > 50
    assert smollm2.decode([g.meta["logit_tokens"][0]]) == [" Paris"]
    assert_exact(g)
    ref = autograd_rows(smollm2, clt, g, [g.n_features - 1, g.n_nodes - 1])
    torch.testing.assert_close(g.adjacency[[g.n_features - 1, g.n_nodes - 1]], ref, atol=1e-4, rtol=1e-3)
