"""TopK / BatchTopK training (CLTShapeSpec.activation): codes, gradients, export as a JumpReLU CLT. No Ray."""

import json

import pytest
import torch
from safetensors.torch import save_file

from ct_ray import load_clt
from ct_ray.clt.io import save_clt
from ct_ray.clt.training import LossWeights, clt_loss, topk_mask
from ct_ray.errors import CTRayError
from ct_ray.specs import TrainSpec, parse
from ct_ray.train.loop import CKPT_STATE, shard_file
from ct_ray.train.run import assemble
from ct_ray.train.shard import Layout, Shard


def test_topk_codes_shape_and_l0():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 64, generator=g)
    keep, t = topk_mask(h, "topk", 5)
    assert keep.shape == h.shape and (keep.sum(1) == 5).all()
    kth = h.topk(5, 1).values[:, -1]
    assert (h[keep] >= kth.repeat_interleave(5)).all()
    # the threshold a JumpReLU would need for the same mean L0: the batch's (k·n)-th largest pre-activation
    assert float(t) == pytest.approx(float(h.flatten().topk(5 * 50).values[-1]), rel=1e-6)
    keep, t = topk_mask(h, "batchtopk", 5)
    assert int(keep.sum()) == 5 * 50 and keep.sum(1).float().std() > 0  # tokens keep different numbers
    assert float(h[keep].min()) == pytest.approx(float(t), rel=1e-6)
    # fewer positive pre-activations than k: only the positive ones are kept, never a zero or negative
    keep, _ = topk_mask(torch.tensor([[1.0, -1.0, -2.0], [0.5, 0.2, 3.0]]), "topk", 2)
    assert keep.tolist() == [[True, False, False], [True, False, True]]


@pytest.mark.parametrize("mode", ["topk", "batchtopk"])
def test_topk_across_feature_shards_equals_one_shard(mode):
    """Two feature shards exchanging their candidates (the `gather` of Shard) keep the same codes as one."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(30, 40, generator=g)
    ref, t_ref = topk_mask(h, mode, 4)
    halves = (h[:, :25], h[:, 25:])  # unequal shards, as feature_bounds may give

    def cands(x):  # what the other shard contributes to the gather: its own padded local candidates
        out = {}
        topk_mask(x, mode, 4, gather=lambda c: out.setdefault("c", c))
        return out["c"]

    other = [cands(halves[1]), cands(halves[0])]
    keeps = [topk_mask(x, mode, 4, gather=lambda c, o=o: torch.cat([c, o], -1))
             for x, o in zip(halves, other)]
    assert torch.equal(torch.cat([keeps[0][0], keeps[1][0]], 1), ref)
    assert float(keeps[0][1]) == pytest.approx(float(t_ref)) and float(keeps[1][1]) == pytest.approx(float(t_ref))


def _shard(mode, k=3, **optim):
    spec = TrainSpec.model_validate({"clt": {"n_features": 24, "span": None, "activation": mode, "k": k},
                                     "optim": {"steps": 40, "batch_tokens": 64, "lr": 1e-3, **optim}})
    lay = Layout(3, 8, 24, None, mode, "resid_mid", k=k)
    return spec, Shard(lay, spec.optim)


@pytest.mark.parametrize("mode", ["topk", "batchtopk"])
def test_topk_gradients_flow_and_sparse_equals_dense(mode):
    """Gradients reach encoder, biases and decoders (the thresholds get none: TopK does not read them); the sparse
    decoder gives the same loss and gradients as the dense one (TopK's codes have no straight-through term)."""
    _, sh = _shard(mode)
    clt = sh.clt
    g = torch.Generator().manual_seed(2)
    xs, ys = torch.randn(64, 3, 8, generator=g), torch.randn(64, 3, 8, generator=g)
    res = []
    for sparse in (False, True):
        clt.zero_grad(set_to_none=True)
        loss, parts, acts, _ = clt_loss(clt, xs, ys, LossWeights(1.0), sparse=sparse, topk=(mode, 3))
        loss.backward()
        res.append((loss.detach(), {n: p.grad.clone() for n, p in clt.named_parameters() if p.grad is not None}))
        assert float(parts["sparsity"]) == 0.0 and parts["preact"] > 0  # penalty off, pre-activation loss on
        if mode == "topk":
            assert all(((a != 0).sum(1) <= 3).all() for a in acts)
        else:
            assert all(int((a != 0).sum()) <= 3 * 64 for a in acts)
    (l0, g0), (l1, g1) = res
    assert not any(n.startswith("threshold") for n in g0)
    for prefix in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert any(n.startswith(prefix) and g.abs().sum() > 0 for n, g in g0.items()), prefix
    torch.testing.assert_close(l0, l1, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["topk", "batchtopk"])
def test_topk_preact_loss_is_optional(mode):
    _, sh = _shard(mode, preact=0.0)
    g = torch.Generator().manual_seed(2)
    xs, ys = torch.randn(16, 3, 8, generator=g), torch.randn(16, 3, 8, generator=g)
    _, parts, _, _ = clt_loss(sh.clt, xs, ys, LossWeights(1.0, preact=0.0), topk=(mode, 3))
    assert float(parts["preact"]) == 0.0


@pytest.mark.parametrize("mode,min_jaccard", [("batchtopk", 0.85), ("topk", 0.45)])
def test_topk_export_is_a_jumprelu_clt_with_matching_codes(tmp_path, mode, min_jaccard):
    """Train 30 steps on one batch, export through the checkpoint path (`assemble`, `save_clt`) and load: a JumpReLU
    CLT (one threshold per layer) whose codes on that batch approximate the TopK codes of the trained weights.
    Tolerance: mean L0 within 15% of k, and the active sets' Jaccard overlap ≥ 0.85 for BatchTopK (measured
    0.90-0.95: the threshold is an EMA of the batch's (k·n)-th value that lags the pre-activations' growth) or ≥ 0.45
    for TopK (measured 0.55-0.58 with k = 3 of 24 features: one threshold per layer cannot follow each token's own
    k-th value)."""
    k = 3
    spec, sh = _shard(mode, k, steps=30)
    spec = spec.model_copy(update={"harvest": spec.harvest.model_copy(update={"read_point": "resid_mid"})})
    g = torch.Generator().manual_seed(4)
    xs, ys = torch.randn(256, 3, 8, generator=g), torch.randn(256, 3, 8, generator=g)
    sh.init_from_data(xs)
    for _ in range(spec.optim.steps):
        sh.step(xs, ys, spec.optim.steps)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file(sh.state_tensors(), str(ckpt / shard_file(0, 0)))
    (ckpt / CKPT_STATE).write_text(json.dumps({"sx": [1.0] * 3, "sy": [1.0] * 3, "history": []}))
    clt, _ = assemble(str(ckpt), spec, 3, 8, "test")
    save_clt(clt, str(tmp_path / "clt"))
    loaded = load_clt(str(tmp_path / "clt"))
    assert loaded.activation == "jumprelu" and all((t > 0).all() for t in loaded.threshold)
    for l in range(3):
        assert torch.unique(loaded.threshold[l]).numel() == 1  # one threshold per layer, stored per feature
        h = sh.clt.pre_activation(l, xs[:, l]).detach()
        want, _ = topk_mask(h, mode, k)
        got = loaded.encode(l, xs[:, l]) != 0
        jaccard = float((want & got).sum() / (want | got).sum())
        assert jaccard >= min_jaccard, (l, jaccard)
        assert abs(float(got.sum(1).float().mean()) - k) <= 0.15 * k, (l, float(got.sum(1).float().mean()))


def test_topk_spec_needs_k():
    with pytest.raises(CTRayError, match="k is required"):
        parse(TrainSpec, {"clt": {"activation": "topk"}})
    with pytest.raises(CTRayError, match="k is required"):
        parse(TrainSpec, {"clt": {"activation": "jumprelu", "k": 4}})
    s = parse(TrainSpec, {"clt": {"activation": "batchtopk", "k": 4}})
    assert s.clt.file_activation == "jumprelu"


@pytest.mark.parametrize("sparse", [False, True])
def test_auxk_gradient_reaches_only_dead_latents_and_matches_a_direct_sum(sparse):
    """AuxK (Gao et al. 2024): the dead latents' top codes reconstruct the main error; its gradient reaches the
    dead latents' encoder rows and decoder rows only, and its value is Σ_l ||ê_l − e_l||² / ||e_l − ē_l||² computed
    by hand from the same codes. Sparse and dense decoders agree."""
    from ct_ray.clt.training import auxk_loss

    _, sh = _shard("batchtopk")
    clt = sh.clt
    g = torch.Generator().manual_seed(5)
    xs, err = torch.randn(32, 3, 8, generator=g), torch.randn(32, 3, 8, generator=g)
    dead = [torch.zeros(24, dtype=torch.bool) for _ in range(3)]
    dead[0][[1, 5, 7, 20]] = True
    dead[2][[0, 3]] = True
    hs = [clt.pre_activation(l, xs[:, l]) for l in range(3)]
    loss = auxk_loss(clt, hs, dead, [2, 0, 2], err, sparse)
    loss.backward()
    with torch.no_grad():  # by hand: each token's 2 largest positive dead pre-activations, decoded without bias
        e_hat = torch.zeros_like(err)
        for l in (0, 2):
            h = torch.where(dead[l], hs[l], torch.zeros(()))
            kth = h.topk(2, 1).values[:, -1:]
            a = torch.where((h >= kth) & (h > 0), h, torch.zeros(()))
            for k in range(clt.spans[l]):
                e_hat[:, l + k] += a @ clt.W_dec[l][:, k]
        var = (err - err.mean(0)).pow(2).sum(-1).sum(0)
        want = ((e_hat - err).pow(2).sum(-1).sum(0) / var).sum()
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)
    for l in range(3):
        grad = lambda p: p.grad if p.grad is not None else torch.zeros_like(p)
        rows = grad(clt.W_enc[l]).abs().sum(1) > 0
        assert not rows[~dead[l]].any()
        assert rows.any() == (l != 1)  # layer 1 has no dead latents (k_aux 0)
        assert not (grad(clt.W_dec[l]).flatten(1).abs().sum(1) > 0)[~dead[l]].any()


def test_auxk_trains_latents_that_lose_every_token():
    """A Shard whose first 12 latents of each layer lose every token to the others (those get b_enc + 20): without
    AuxK (and without the pre-activation loss, which pushes every latent under θ up) their encoder rows never move;
    with AuxK (α 1/32, dead after 64 tokens) they are trained from the step they count as dead. The revival itself
    is measured on SmolLM2 (benchmarks/RESULTS.md, CLT training)."""
    g = torch.Generator().manual_seed(6)
    xs = torch.randn(64, 3, 8, generator=g)
    ys = torch.randn(64, 3, 8, generator=g)
    moved = {}
    for alpha in (0.0, 1 / 32):
        _, sh = _shard("batchtopk", steps=10, auxk_alpha=alpha, dead_tokens=64, preact=0.0)
        sh.init_from_data(xs)
        with torch.no_grad():
            for l in range(3):
                sh.clt.b_enc[l][12:] += 20.0
        w0 = [w.detach()[:12].clone() for w in sh.clt.W_enc]
        for _ in range(10):
            stats = sh.step(xs, ys, 10)
        moved[alpha] = [float((w.detach()[:12] - w_0).abs().amax(1).gt(0).float().mean())
                        for w, w_0 in zip(sh.clt.W_enc, w0)]
        assert ("auxk" in stats) == (alpha > 0)
    assert moved[0.0] == [0.0] * 3 and all(m == 1.0 for m in moved[1 / 32]), moved
    assert (sh.since_fired[:, :12] >= 64).all() and "since_fired" in sh.state_tensors()
