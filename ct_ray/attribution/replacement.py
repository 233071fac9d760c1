"""The local replacement model of one prompt, and its exact transpose.

With attention patterns and every normalisation denominator frozen at the real forward's values, and the MLPs
replaced by CLT reconstructions (from frozen feature activations) plus frozen error terms, the residual stream is an
affine function of the sources (token embeddings, feature activations, errors). `forward` evaluates it; `backward`
applies its transpose to a batch of read-out vectors, without autograd and without touching the MLPs or the QK path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.adapters import frozen_scales
from ..models.capture import Cache


@dataclass
class Sources:
    """Values of the source nodes: embeddings [P, d] and per-layer MLP contributions [L, P, d]."""

    emb: torch.Tensor
    mlp: torch.Tensor


class Replacement:
    def __init__(self, model, clt, cache: Cache):
        ad = model.adapter
        clt.check_model(ad.n_layers, ad.d_model)
        self.ad, self.clt, self.cache = ad, clt, cache
        self.hook = clt.feature_input_hook
        self.L, self.P, self.d = ad.n_layers, cache.tokens.numel(), ad.d_model
        self.H, self.Hkv, self.dh = ad.n_heads, ad.n_kv_heads, ad.d_head
        self.W = ad.layer_weights()
        self.final = ad.final_norm()
        W_U, b_U = ad.unembed()
        self.W_U, self.b_U = W_U.detach(), (b_U.detach() if b_U is not None else None)
        self.patterns = cache.patterns.float()
        self._freeze_scales()
        self._features()

    # --- frozen constants ----------------------------------------------------------------------------
    def _freeze_scales(self) -> None:
        c = self.cache
        pre = torch.cat([c.resid_pre0[None], c.resid_post[:-1]])
        # the post-attention norm's input is the raw attention output: recomputed from real values
        s_attn, s_mlp, s_post, self.s_final = frozen_scales(self.W, self.final, pre, c.resid_mid, c.resid_post[-1],
                                                            lambda l, s: self._attn_raw(l, pre[l], s))
        self.s_attn, self.s_mlp = torch.stack(s_attn), torch.stack(s_mlp)
        self.s_post = torch.stack(s_post) if s_post is not None else None

    def _features(self) -> None:
        """Feature activations (from the real read points), reconstructions and error terms."""
        c, clt = self.cache, self.clt
        self.pre_acts, self.acts = [], []
        for l in range(self.L):
            h = clt.pre_activation(l, c.read_point(l, self.hook))
            a = clt.act_fn(l, h)
            a[0] = 0  # BOS attention sink: not nodes; its MLP output is a constant term
            self.pre_acts.append(h)
            self.acts.append(a)
        recon = torch.stack(clt.decode(self.acts, active_only=True))
        self.error = c.mlp_out - recon
        self.error[:, 0] = 0
        # the part of each MLP output that is neither a feature nor an error node: b_dec, and BOS's whole output
        self.mlp_const = torch.stack([clt.b_dec[l].detach().expand(self.P, self.d).clone() for l in range(self.L)])
        self.mlp_const[:, 0] = c.mlp_out[:, 0]

    # --- forward --------------------------------------------------------------------------------------
    # the frozen attention sub-block in three steps, on one stream [P, d] or a batch of them [n, P, d]; `bias=False`
    # is its linear part (head loadings push single sources' streams through it)
    def attn_values(self, l: int, x: torch.Tensor, s_attn: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """Value vectors of x at layer l's attention input: [..., P, n_kv, d_head]."""
        W = self.W[l]
        v = W.attn_norm.apply(x, s_attn, with_bias=bias) @ W.W_V.T
        if bias and W.b_V is not None:
            v = v + W.b_V
        return v.unflatten(-1, (self.Hkv, self.dh))

    def attn_mix(self, l: int, v: torch.Tensor) -> torch.Tensor:
        """Each head's frozen pattern applied to value vectors: [..., P, H, d_head] (before W_O)."""
        return torch.einsum("hpq,...qhd->...phd", self.patterns[l][:, : v.shape[-3], : v.shape[-3]],
                            v.repeat_interleave(self.H // self.Hkv, dim=-2))

    def attn_out(self, l: int, z: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """What the heads' outputs z add to the residual, before any post-attention norm: [..., P, d]."""
        o = z.flatten(-2) @ self.W[l].W_O.T
        if bias and self.W[l].b_O is not None:
            o = o + self.W[l].b_O
        return o

    def _attn_raw(self, l: int, x: torch.Tensor, s_attn: torch.Tensor) -> torch.Tensor:
        return self.attn_out(l, self.attn_mix(l, self.attn_values(l, x, s_attn)))

    def forward(self, src: Sources) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual stream of the frozen model: (resid_mid [L, P, d], final residual [P, d])."""
        x = src.emb
        mids = []
        for l in range(self.L):
            o = self._attn_raw(l, x, self.s_attn[l])
            if self.s_post is not None:
                o = self.W[l].attn_post_norm.apply(o, self.s_post[l])
            x = x + o
            mids.append(x)
            x = x + src.mlp[l]
        return torch.stack(mids), x

    def real_sources(self) -> Sources:
        return Sources(self.cache.resid_pre0, self.cache.mlp_out)

    def constant_sources(self) -> Sources:
        return Sources(torch.zeros_like(self.cache.resid_pre0), self.mlp_const)

    def read(self, l: int, mid: torch.Tensor) -> torch.Tensor:
        return mid if self.hook == "resid_mid" else self.W[l].mlp_norm.apply(mid, self.s_mlp[l])

    def logits(self, final_resid: torch.Tensor) -> torch.Tensor:
        y = self.final.apply(final_resid, self.s_final) @ self.W_U.T
        return y + self.b_U if self.b_U is not None else y

    # --- transpose ------------------------------------------------------------------------------------
    def encoder_readout(self, l: int, pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Gradient of feature pre-activations w.r.t. resid_mid[l] at their positions: [n, d]."""
        v = self.clt.W_enc[l][idx].detach()
        if self.hook == "mlp_in":
            v = self.W[l].mlp_norm.vjp(v, self.s_mlp[l][pos])
        return v

    def logit_readout(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Read-out of demeaned logits (logit - mean logit) w.r.t. the final residual at the last position,
        and their constant (bias) parts."""
        w = self.W_U[tokens] - self.W_U.mean(0)
        v = self.final.vjp(w, self.s_final[-1])
        b = torch.zeros(len(tokens))
        if self.b_U is not None:
            b = self.b_U[tokens] - self.b_U.mean()
        if self.final.bias is not None:  # the final norm's bias is read out too
            b = b + w @ self.final.bias
        return v, b

    def attn_vjp(self, l: int, g: torch.Tensor) -> torch.Tensor:
        """Transpose of the frozen attention sub-block (without residual) on g [B, P', d]."""
        W, P = self.W[l], g.shape[1]
        if self.s_post is not None:
            g = W.attn_post_norm.vjp(g, self.s_post[l][:P])
        gz = (g @ W.W_O).view(g.shape[0], P, self.H, self.dh)
        gv = torch.einsum("hpq,bphd->bqhd", self.patterns[l][:, :P, :P], gz)
        if self.Hkv != self.H:
            gv = gv.view(g.shape[0], P, self.Hkv, self.H // self.Hkv, self.dh).sum(3)
        gn = gv.reshape(g.shape[0], P, self.Hkv * self.dh) @ W.W_V
        return W.attn_norm.vjp(gn, self.s_attn[l][:P])

    def backward(self, start_layer: int, inject: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 B: int, P: int, final: tuple[torch.Tensor, torch.Tensor] | None = None,
                 dots: torch.Tensor | None = None,
                 inject_pre: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None):
        """Propagate read-out vectors down the frozen model, from `start_layer` (the batch's top layer) to layer 0.

        inject[l] = (rows, positions, vectors): add `vectors` to the gradient w.r.t. resid_mid[l] of those rows;
        inject_pre[l]: the same w.r.t. resid_pre[l], the input of layer l's attention (the QK read point).
        final = (rows, vectors): read-outs of the final residual at the last position.
        dots [L, P', d]: vectors to dot with the gradient w.r.t. resid_post[l] at each layer and position, while it is
        at hand (the error nodes' columns).
        Returns (grad w.r.t. resid_post[l] for l <= start_layer [P, B, start_layer + 1, d] (zero above: no read-out
        reaches further up), grad w.r.t. resid_pre[0] [B, P, d], the dots [B, L, P] or None). Position-major, so that a
        set of positions' gradients over a range of layers is one gather, ready for a batched matmul.
        """
        G = torch.zeros(B, P, self.d)
        G_post = torch.empty(P, B, start_layer + 1, self.d)
        out = torch.zeros(B, self.L, P) if dots is not None else None
        if final is not None:
            rows, vec = final
            G[rows, P - 1] += vec
        for l in range(start_layer, -1, -1):
            G_post[:, :, l] = G.transpose(0, 1)
            if out is not None:
                out[:, l] = torch.linalg.vecdot(G, dots[l, :P])
            if l in inject:
                rows, pos, vec = inject[l]
                G.index_put_((rows, pos), vec, accumulate=True)
            G = G + self.attn_vjp(l, G)
            if inject_pre and l in inject_pre:
                rows, pos, vec = inject_pre[l]
                G.index_put_((rows, pos), vec, accumulate=True)
        return G_post, G, out
