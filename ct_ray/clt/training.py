"""The CLT objective and one optimisation step, in a single process (the Ray Train loop shards it by feature).

Loss (Ameisen et al. 2025), on activations scaled to mean norm sqrt(d_model):
    Σ_l ||ŷ_l − y_l||²  +  λ Σ_l Σ_i tanh(c · ||W_dec,i||_concat · a_i)  +  μ Σ_l Σ_i ReLU(θ_i − h_i) · ||W_dec,i||_concat
with JumpReLU trained through a straight-through estimator (rectangle kernel of width `bandwidth` for θ).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .transcoder import CrossLayerTranscoder


class JumpReLU(torch.autograd.Function):
    """a = h · 1[h > θ]; ∂a/∂h = 1[h > θ]; ∂a/∂θ = −(θ/ε) · rect((h − θ)/ε) (pseudo-derivative)."""

    @staticmethod
    def forward(ctx, h, theta, bandwidth: float):
        ctx.save_for_backward(h, theta)
        ctx.bandwidth = bandwidth
        return h * (h > theta)

    @staticmethod
    def backward(ctx, g):
        h, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        gh = g * (h > theta)
        rect = ((h - theta).abs() < eps / 2).to(g.dtype)
        gt = (g * (-(theta / eps) * rect)).sum_to_size(theta.shape)
        return gh, gt, None


class _Codes(torch.autograd.Function):
    """One layer's JumpReLU codes and both penalty terms, with a hand-fused backward:
        a = JumpReLU(h, θ),  S = Σ tanh(c · a · n) / N,  P = Σ ReLU(θ − h) · n / N      (h [N, F], θ, n [F])
    Same values and gradients as composing `JumpReLU` with the autograd expressions (tests/test_train.py), with
    fewer passes over [N, F] and fewer saved [N, F] tensors (on CPU ~10% faster for this part of the step,
    benchmarks/RESULTS.md)."""

    @staticmethod
    def forward(ctx, h, theta, n, c: float, bandwidth: float):
        mask = h > theta
        a = h * mask
        t = torch.tanh(a * (c * n))
        below = h < theta
        r_sum = (theta - h).clamp_min_(0).sum(0)
        N = h.shape[0]
        ctx.save_for_backward(h, theta, n, a, t, mask, below, r_sum)
        ctx.c, ctx.bandwidth = c, bandwidth
        return a, t.sum() / N, (r_sum * n).sum() / N

    @staticmethod
    def backward(ctx, g_a, g_s, g_p):
        h, theta, n, a, t, mask, below, r_sum = ctx.saved_tensors
        N, eps = h.shape[0], ctx.bandwidth
        k = g_s * ctx.c / N
        u = torch.addcmul(torch.ones_like(t), t, t, value=-1.0)  # tanh' = 1 − t²
        g = torch.addcmul(g_a if g_a is not None else torch.zeros_like(t), u, k * n)  # total ∂/∂a
        g_n = k * (u.mul_(a)).sum(0) + (g_p / N) * r_sum
        g_below = (g_p / N) * n  # ∂P/∂h = −n/N where θ > h
        g_h = torch.where(mask, g, torch.where(below, -g_below, 0.0))
        rect = (h - theta).abs_() < eps / 2
        g_theta = -(theta / eps) * torch.where(rect, g, 0.0).sum(0) + g_below * below.sum(0)
        return g_h, g_theta, g_n, None, None


@torch.no_grad()
def topk_mask(h: torch.Tensor, mode: str, k: int, gather=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which codes a TopK / BatchTopK activation keeps, and the batch's JumpReLU-equivalent threshold. h: [n, F].

    topk: each token's k largest positive pre-activations. batchtopk: the k·n largest positive pre-activations of
    the batch (a token keeps any number). The threshold, for both, is the (k·n)-th largest positive pre-activation of
    the batch: a JumpReLU at that threshold keeps exactly BatchTopK's codes and, on average, k per token (for TopK it
    is found among each token's 2k largest, exact unless a token has more than 2k codes above it). `gather(t)`
    (feature-sharded training) concatenates a tensor's last dimension over the feature shards, so the choice is over
    all features; each shard pads its candidates to the same size with −1 (never kept). Ties keep every tied code."""
    r = h.clamp_min(0)
    m = k * r.shape[0]
    if mode == "topk":
        cand = r.topk(min(2 * k, r.shape[1]), dim=1, sorted=False).values
        if gather is not None:
            cand = gather(F.pad(cand, (0, 2 * k - cand.shape[1]), value=-1.0))
            cand = cand.topk(min(2 * k, cand.shape[1]), dim=1, sorted=False).values
        if cand.shape[1] < k:  # fewer features than k: keep every positive code
            return r > 0, r.new_zeros(())
        kth = cand.topk(k, dim=1, sorted=False).values.min(1).values
        flat = cand.reshape(-1)
        t = flat.kthvalue(flat.numel() - m + 1).values
        return (r >= kth[:, None]) & (r > 0), t.clamp_min(0)
    if mode != "batchtopk":
        raise ValueError(f"topk mode must be 'topk' or 'batchtopk', not {mode!r}")
    flat = r.reshape(-1)
    if gather is None:
        t = flat.kthvalue(flat.numel() - m + 1).values if m <= flat.numel() else flat.new_zeros(())
    else:
        cand = flat.topk(min(m, flat.numel()), sorted=False).values
        cand = gather(F.pad(cand, (0, m - cand.numel()), value=-1.0))
        t = cand.topk(m, sorted=False).values.min()
    return (r >= t) & (r > 0), t.clamp_min(0)


@dataclass
class LossWeights:
    sparsity: float  # λ (already ramped)
    c: float = 4.0
    preact: float = 3e-6
    bandwidth: float = 2.0
    auxk: float = 0.0  # α of the AuxK loss (applied where `clt_loss` gets `aux`)


class _RowNorm(torch.autograd.Function):
    """Norm of each row block w[i] ([n, ...] -> [n]) with a one-pass backward (g_i / n_i) · w[i].

    The decoder is the largest tensor of a CLT (for a full CLT, L/2 times the encoder) and its norms enter every
    step; autograd's pow/sum/sqrt would allocate and sweep decoder-sized temporaries several times per step."""

    @staticmethod
    def forward(ctx, w):
        n = torch.linalg.vector_norm(w, dim=tuple(range(1, w.dim())))
        ctx.save_for_backward(w, n)
        return n

    @staticmethod
    def backward(ctx, g):
        w, n = ctx.saved_tensors
        scale = torch.where(n > 0, g / n, torch.zeros_like(n))
        return w * scale.view(-1, *([1] * (w.dim() - 1)))


def decoder_norms(clt: CrossLayerTranscoder) -> list[torch.Tensor]:
    """||W_dec,i||_concat: the norm of feature i's decoder vectors concatenated over its output layers."""
    return [_RowNorm.apply(w) for w in clt.W_dec]


class _GatherDecode(torch.autograd.Function):
    """y[t] = Σ_j vals_j · W[feat_j] over the nonzeros j of token t (COO in row-major order, `tok` sorted), with a
    backward that touches only the active rows, in three sparse kernels and no [nnz, d] temporary:
      forward   y      = weighted `embedding_bag` of the rows of W (bags = tokens);
      ∂/∂vals   g_v[j] = g[tok_j] · W[feat_j]: a sampled dense-dense product (`torch.sparse.sampled_addmm`, CSR);
      ∂/∂W      g_W[f] = Σ_{j: feat_j = f} vals_j · g[tok_j]: the same weighted `embedding_bag`, transposed (bags =
                features, the nonzeros sorted by feature), so inactive rows get exact zeros and nothing is scattered.
    W: [n_features, span·d]; g_v and g_W equal the dense products' within float rounding (tests/test_train.py).
    On the 2-core CPU, one thread, 2048 features x 576 x 1024 tokens, forward + backward against the dense matmuls:
    from given indices 17-18x at L0 16, 6x at L0 64; `decode_sparse` (which first finds the nonzeros of dense codes)
    8x and 4x. Bound: each pass streams one decoder row per active code (~50-60 GB/s here), three passes in all
    (benchmarks/train.py decode-kernel, benchmarks/HISTORY.md "Sparse decoding and TopK")."""

    @staticmethod
    def forward(ctx, vals, W, tok, feat, n: int):
        crow = torch.zeros(n + 1, dtype=torch.int64, device=tok.device)
        torch.cumsum(torch.bincount(tok, minlength=n), 0, out=crow[1:])
        ctx.save_for_backward(vals, W, tok, feat, crow)
        return F.embedding_bag(feat, W, crow[:-1], mode="sum", per_sample_weights=vals)

    @staticmethod
    def backward(ctx, g):
        vals, W, tok, feat, crow = ctx.saved_tensors
        g = g.contiguous()
        g_vals = g_W = None
        if ctx.needs_input_grad[0]:
            with warnings.catch_warnings():  # torch warns that CSR support is in beta
                warnings.simplefilter("ignore")
                pattern = torch.sparse_csr_tensor(crow, feat, vals.detach(), (g.shape[0], W.shape[0]),
                                                  check_invariants=False)
            g_vals = torch.sparse.sampled_addmm(pattern, g, W.T, beta=0.0).values()
        if ctx.needs_input_grad[1]:
            fsorted, order = torch.sort(feat)
            fptr = torch.searchsorted(fsorted, torch.arange(W.shape[0], device=feat.device))
            g_W = F.embedding_bag(tok[order], g, fptr, mode="sum", per_sample_weights=vals.detach()[order])
        return g_vals, g_W, None, None, None


def gather_decode(vals: torch.Tensor, W: torch.Tensor, tok: torch.Tensor, feat: torch.Tensor, n: int) -> torch.Tensor:
    """[n, W.shape[1]]: Σ over each token's nonzeros (tok sorted) of vals · W[feat]; see `_GatherDecode`. Falls back to
    autograd's `embedding_bag` for dtypes the sampled product does not take (e.g. bfloat16 on the CPU)."""
    if vals.dtype in (torch.float32, torch.float64):
        return _GatherDecode.apply(vals, W, tok, feat, n)
    offsets = torch.searchsorted(tok, torch.arange(n, device=tok.device))
    return F.embedding_bag(feat, W, offsets, mode="sum", per_sample_weights=vals)


class _Take(torch.autograd.Function):
    """a.view(-1)[flat] for distinct indices; the backward writes the gradient with one scatter into zeros
    (autograd's indexing backward accumulates, which costs a sort)."""

    @staticmethod
    def forward(ctx, a, flat):
        ctx.save_for_backward(flat)
        ctx.shape = a.shape
        return a.reshape(-1)[flat]

    @staticmethod
    def backward(ctx, g):
        (flat,) = ctx.saved_tensors
        out = g.new_zeros(math.prod(ctx.shape))
        return out.index_copy_(0, flat, g).view(ctx.shape), None


class _BandGrad(torch.autograd.Function):
    """Zeros [n, W.shape[1]] whose backward gives the activations the gradient the dense product would, g · Wᵀ, at
    the positions of `band` (inactive codes within JumpReLU's bandwidth below θ) and nowhere else. The codes there
    are 0, so the forward adds nothing and W gets no gradient; θ's straight-through estimator reads it (one dense
    product per layer in the backward: the rest of the step stays sparse)."""

    @staticmethod
    def forward(ctx, a, W, band):
        ctx.save_for_backward(W, band)
        return a.new_zeros(a.shape[0], W.shape[1])

    @staticmethod
    def backward(ctx, g):
        W, band = ctx.saved_tensors
        return (g @ W.T).mul_(band), None, None


def decode_sparse(clt: CrossLayerTranscoder, acts: list[torch.Tensor], with_bias: bool = True,
                  band: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Same result as `clt.decode`, touching only the decoder rows of active features, forward and backward
    (`_GatherDecode`). The activations' gradient is then nonzero only where they are; the dense product also gives
    one where a code is 0, which JumpReLU's straight-through estimator of θ reads within the bandwidth: `band`
    (per layer, [n, F] bool: inactive codes within the bandwidth) adds exactly that gradient (`_BandGrad`), so θ's
    gradient equals the dense path's (without it θ misses the reconstruction's pull down and only the sparsity
    term's push up: thresholds drift up and latents die)."""
    n, d = acts[0].shape[0], clt.d_model
    out: list[torch.Tensor | None] = [None] * clt.n_layers
    for ls, a in enumerate(acts):
        if band is not None and band[ls] is not None and a.requires_grad:
            z = _BandGrad.apply(a, clt.W_dec[ls].reshape(clt.d_tc[ls], -1), band[ls]).view(n, clt.spans[ls], d)
            for k, zk in enumerate(z.unbind(1)):
                out[ls + k] = zk if out[ls + k] is None else out[ls + k] + zk
        flat = torch.nonzero((a != 0).view(-1)).squeeze(1)  # row-major: tokens sorted, as the bags need
        if flat.numel() == 0:
            continue
        tok = torch.div(flat, a.shape[1], rounding_mode="floor")
        feat = flat - tok * a.shape[1]
        vals = _Take.apply(a, flat)  # keeps the graph to the activations
        y = gather_decode(vals, clt.W_dec[ls].reshape(clt.d_tc[ls], -1), tok, feat, n).view(n, clt.spans[ls], d)
        for k, yk in enumerate(y.unbind(1)):  # (indexing y[:, k] would cost a y-sized zero fill per k in backward)
            out[ls + k] = yk if out[ls + k] is None else out[ls + k] + yk
    out = [o if o is not None else acts[0].new_zeros(n, d) for o in out]
    if with_bias:
        out = [o + clt.b_dec[l] for l, o in enumerate(out)]
    return out


def decode_dense(clt: CrossLayerTranscoder, acts: list[torch.Tensor], with_bias: bool = True) -> list[torch.Tensor]:
    out = clt.decode(acts)
    if not with_bias:
        out = [o - clt.b_dec[l] for l, o in enumerate(out)]
    return out


def auxk_loss(clt: CrossLayerTranscoder, hs: list[torch.Tensor], dead: list[torch.Tensor], k_aux: list[int],
              err: torch.Tensor, sparse: bool, reduce_recon=None, gather=None) -> torch.Tensor:
    """AuxK (Gao et al. 2024): each token's `k_aux[l]` largest positive pre-activations among the dead latents of
    layer l (`dead[l]`, [F] bool) reconstruct the main reconstruction's error `err` ([n, L, d], no gradient);
    Σ_l ||ê_l − e_l||² / ||e_l − ē_l||². The only gradient dead latents get: it pulls their encoders towards
    directions the live latents miss. Layers with k_aux 0 take no part (every feature shard gets the same k_aux)."""
    codes = []
    for l, h in enumerate(hs):
        if k_aux[l] <= 0:
            codes.append(h.new_zeros(h.shape))
            continue
        hd = h.masked_fill(~dead[l], 0.0)
        keep, _ = topk_mask(hd, "topk", k_aux[l], gather)
        codes.append(hd * keep)
    rec = decode_sparse(clt, codes, with_bias=False) if sparse else decode_dense(clt, codes, with_bias=False)
    e_hat = torch.stack(rec, 1)
    if reduce_recon is not None:
        e_hat = reduce_recon(e_hat)
    var = (err - err.mean(0)).pow(2).sum(-1).sum(0).clamp_min(1e-12)
    return ((e_hat - err).pow(2).sum(-1).sum(0) / var).sum()


def clt_loss(clt: CrossLayerTranscoder, xs: torch.Tensor, ys: torch.Tensor, w: LossWeights, sparse: bool = True,
             reduce_recon=None, topk: tuple[str, int] | None = None, gather=None,
             aux: tuple[list[torch.Tensor], list[int]] | None = None):
    """xs, ys: [n, L, d] scaled inputs and targets. Returns (loss, parts dict, acts, ŷ).

    `reduce_recon(tensor)` lets a feature-sharded caller sum the partial reconstructions [n, L, d] across workers
    before the MSE;
    the sparsity terms stay local to the features a worker owns.
    `topk = (mode, k)`: TopK / BatchTopK codes (`topk_mask`) instead of the CLT's own activation, no sparsity
    penalty (L0 is fixed by k); the pre-activation loss, when `w.preact > 0`, reads the CLT's thresholds (the running
    estimate of the smallest kept activation, which the caller keeps: `parts["topk_threshold"]`, [L]) and gives
    them no gradient. `gather`: see `topk_mask`. `aux = (dead masks, k_aux per layer)`: adds `w.auxk` × `auxk_loss`."""
    L = clt.n_layers
    norms = decoder_norms(clt)
    band = None
    if topk is not None:
        acts, thr, preact, hs = [], [], torch.zeros((), dtype=xs.dtype, device=xs.device), []
        for l in range(L):
            h = clt.pre_activation(l, xs[:, l])
            hs.append(h)
            keep, t = topk_mask(h, topk[0], topk[1], gather)
            acts.append(h * keep)
            thr.append(t)
            if w.preact > 0:
                theta = clt.threshold[l].detach().to(h.dtype)
                preact = preact + ((theta - h).clamp_min(0).sum(0) * norms[l]).sum() / h.shape[0]
        sparsity = torch.zeros((), dtype=xs.dtype, device=xs.device)
    elif clt.activation == "jumprelu":
        hs = [clt.pre_activation(l, xs[:, l]) for l in range(L)]
        acts, sp, pa = zip(*(_Codes.apply(h, clt.threshold[l].to(xs.dtype), norms[l], w.c, w.bandwidth)
                             for l, h in enumerate(hs)))
        sparsity, preact = sum(sp), sum(pa)
        if sparse:  # where θ's estimator needs the reconstruction gradient of a code that is 0 (see decode_sparse)
            with torch.no_grad():
                band = [((h - t) > -w.bandwidth / 2) & (h <= t) for h, t in
                        ((h, clt.threshold[l].to(h.dtype)) for l, h in enumerate(hs))]
    else:
        hs = [clt.pre_activation(l, xs[:, l]) for l in range(L)]
        acts = [torch.relu(h) for h in hs]
        sparsity, preact = sum(torch.tanh(w.c * a * n).sum(-1).mean() for a, n in zip(acts, norms)), torch.zeros(())
    if sparse:
        recon = decode_sparse(clt, list(acts), with_bias=reduce_recon is None, band=band)
    else:
        recon = decode_dense(clt, list(acts), with_bias=reduce_recon is None)
    y_hat = torch.stack(recon, 1)
    if reduce_recon is not None:  # one collective for all layers
        y_hat = reduce_recon(y_hat) + torch.stack(list(clt.b_dec))
    mse = (y_hat - ys).pow(2).sum(-1).mean(0).sum()  # Σ_l E||ŷ_l − y_l||²
    loss = mse + w.sparsity * sparsity + w.preact * preact
    parts = {"mse": mse.detach(), "sparsity": sparsity.detach(), "preact": preact.detach()}
    if aux is not None and w.auxk > 0 and any(k > 0 for k in aux[1]):
        la = auxk_loss(clt, hs, aux[0], aux[1], (ys - y_hat).detach(), sparse, reduce_recon, gather)
        loss = loss + w.auxk * la
        parts["auxk"] = la.detach()
    if topk is not None:
        parts["topk_threshold"] = torch.stack(thr).detach()
    return loss, parts, acts, y_hat.detach()


def init_clt(clt: CrossLayerTranscoder, seed: int, threshold: float = 0.03) -> None:
    """The paper's initialisation: W_enc ~ U(±1/sqrt(n_features)), W_dec ~ U(±1/sqrt(L·d)), θ = 0.03."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for l in range(clt.n_layers):
            n = clt.d_tc[l]
            clt.W_enc[l].copy_((torch.rand(clt.W_enc[l].shape, generator=g) * 2 - 1) / math.sqrt(n))
            b = 1.0 / math.sqrt(clt.n_layers * clt.d_model)
            clt.W_dec[l].copy_((torch.rand(clt.W_dec[l].shape, generator=g) * 2 - 1) * b)
            clt.b_enc[l].zero_()
            clt.b_dec[l].zero_()
            clt.threshold[l].fill_(threshold)


@torch.no_grad()
def init_b_enc_from_data(clt: CrossLayerTranscoder, xs: torch.Tensor, target_rate: float) -> None:
    """Set b_enc so that each feature fires on about `target_rate` of the tokens in `xs` ([n, L, d], scaled)."""
    for l in range(clt.n_layers):
        h = (xs[:, l] @ clt.W_enc[l].T).float()  # [n, d_tc]
        # torch.quantile refuses inputs over 2**24 elements (a GPU-sized batch x 16k features): go by feature chunks
        step = max(1, 2**24 // max(1, h.shape[0]))
        q = torch.cat([torch.quantile(h[:, i: i + step], 1.0 - target_rate, dim=0) for i in range(0, h.shape[1], step)])
        thr = clt.threshold[l] if clt.activation == "jumprelu" else torch.zeros_like(q)
        clt.b_enc[l].copy_(thr - q)


def fvu(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained per layer: E||ŷ − y||² / E||y − E y||²; [n, L, d] -> [L]."""
    err = (y_hat - y).pow(2).sum(-1).mean(0)
    var = (y - y.mean(0)).pow(2).sum(-1).mean(0).clamp_min(1e-12)
    return err / var
