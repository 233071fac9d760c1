"""Constrained interventions as one pass over the change of the residual stream (the fast path of `Splice.run`).

When every layer from a batch's first intervened layer to the last is constrained (norm denominators and attention
patterns frozen, MLP outputs clamped to their clean value plus the intervened features' decoder writes), the spliced
model is affine in the intervention. Only the change of the residual stream needs propagating; per layer it is
    Δ += OV_frozen(norm_lin(Δ))        (post-attention norm applied to the result where the family has one)
    Δ += Σ dv · W_dec[l'→l][f]         (the decoder rows of the intervened features of layers l' <= l)
and the logits change by W_U · final_norm_lin(Δ_last). This is exactly what the hooked pass computes in that case
(the tests compare the two), without the hooked pass's costs: clean values never enter (nothing large cancels), the
MLPs, norms and the module stack are not run, and the attention projections only see the (row, position)s a row's
change can have reached: positions from its first intervened position on, layers after its first intervened one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.hooks import module


@dataclass
class LinearOut:
    logits: torch.Tensor  # [B, V] pre-softcap, last position
    out_logits: torch.Tensor  # [B, V] output logits
    watched_acts: torch.Tensor | None = None  # [B, n]
    watched_pre: torch.Tensor | None = None  # [B, n]
    mlp_real_at: torch.Tensor | None = None  # [B, P, d]
    mlp_response_at: torch.Tensor | None = None  # [B, P, d]


@torch.no_grad()
def constrained_pass(sp, ops: dict, B: int, watch: torch.Tensor | None = None,
                     mlp_at: torch.Tensor | None = None) -> LinearOut:
    """B constrained intervention rows of `sp` (a `Splice`), given their compiled per-layer ops: the logits at the
    last position (rows without ops return the clean logits exactly); optionally the activations and
    pre-activations of the `watch` (layer, position, feature) triples, and per row b, at layer `mlp_at[b]` (L: none),
    the real MLP's output on the spliced MLP input and the CLT's own response (see `InterventionResult`)."""
    L, P, d, dev = sp.L, sp.P, sp.d, sp.device
    clean, clean_out = sp.clean_logits, sp.clean_out_logits
    res = LinearOut(clean.expand(B, -1).clone(), clean_out.expand(B, -1).clone())
    if watch is not None:  # clean values, then the layers a change reaches overwrite theirs
        pre = torch.zeros(len(watch), dtype=sp.cdtype, device=dev)
        act = torch.zeros(len(watch), dtype=sp.cdtype, device=dev)
        for l in watch[:, 0].unique().tolist():
            j = torch.nonzero(watch[:, 0] == l).squeeze(1)
            pre[j] = sp.clean_pre[l][watch[j, 1], watch[j, 2]]
            act[j] = sp.clean_acts[l][watch[j, 1], watch[j, 2]]
        res.watched_pre, res.watched_acts = pre.expand(B, -1).clone(), act.expand(B, -1).clone()
    if mlp_at is not None:
        res.mlp_real_at = sp.mlp_out[mlp_at.clamp(max=L - 1)].clone()
        res.mlp_real_at[mlp_at >= L] = 0
        res.mlp_response_at = torch.zeros(B, P, d, dtype=sp.cdtype, device=dev)
    if not ops:
        return res
    dt = sp.mlp_out.dtype
    # per row: its first intervened layer and position; a row's change is zero before both
    row_l = torch.full((B,), L, dtype=torch.long, device=dev)
    row_p = torch.full((B,), P, dtype=torch.long, device=dev)
    writes = []  # (source layer, flat (row, position) index, decoder rows scaled by the change [n, span, d])
    for l, o in ops.items():
        row_l.scatter_reduce_(0, o.rows, torch.full_like(o.rows, l), "amin")
        row_p.scatter_reduce_(0, o.rows, o.pos, "amin")
    p0 = int(row_p.min())
    Q = P - p0  # positions before the batch's first intervened one never change: they are left out
    for l, o in ops.items():
        cur = sp.clean_acts[l][o.pos, o.feat]
        dv = (o.apply(cur) - cur).to(sp.W_dec[l].dtype)
        writes.append((l, o.rows * Q + (o.pos - p0), (sp.W_dec[l][o.feat] * dv[:, None, None]).to(dt)))
    delta = torch.zeros(B * Q, d, dtype=dt, device=dev)
    pos = torch.arange(p0, P, device=dev)
    reach = pos[None, :] >= row_p[:, None]  # [B, Q]
    H, Hkv, dh = sp.H, sp.Hkv, sp.dh
    v = torch.zeros(B * Q, Hkv * dh, dtype=dt, device=dev)
    first = min(ops)
    for l in range(first, L):
        W = sp.W[l]
        if l > first:
            # attention: rows whose change entered at an earlier layer, at the positions it can have reached
            idx = torch.nonzero((reach & (row_l < l)[:, None]).reshape(-1)).squeeze(1)
            full = idx.numel() == B * Q
            x = delta if full else delta[idx]
            p_idx = pos.repeat(B) if full else pos[idx % Q]
            n = W.attn_norm.apply(x, sp.s_attn[l][p_idx].to(dt), with_bias=False)
            if full:
                v.copy_(n @ W.W_V.T)
            else:
                v.zero_()
                v[idx] = n @ W.W_V.T
            pat = sp.patterns[l][:, p0:, p0:].to(dt).reshape(Hkv, H // Hkv, Q, Q)
            z = torch.einsum("kgpq,bqkd->bpkgd", pat, v.view(B, Q, Hkv, dh)).reshape(B * Q, H * dh)
            a = (z if full else z[idx]) @ W.W_O.T
            if W.attn_post_norm is not None:
                a = W.attn_post_norm.apply(a, sp.s_post[l][p_idx].to(dt), with_bias=False)
            if full:
                delta += a
            else:
                delta.index_add_(0, idx, a)
        if watch is not None or mlp_at is not None:
            _records(sp, l, ops.get(l), delta.view(B, Q, d), p0, row_p, res, watch, mlp_at)
        for ls, r, rows in writes:  # the clamped MLP outputs: decoder writes of the intervened features
            if 0 <= l - ls < rows.shape[1]:
                delta.index_add_(0, r, rows[:, l - ls])
    last = sp.final.apply(delta.view(B, Q, d)[:, -1], sp.s_final[-1].to(dt), with_bias=False)
    W_U = sp.lm_head.weight
    dlog = (last.to(W_U.dtype) @ W_U.T).to(clean.dtype)
    res.logits = clean + dlog
    cap = sp.ad.logit_softcap
    if not cap:  # written as changes so that a row without change returns the clean output bit for bit
        res.out_logits = clean_out + dlog.to(clean_out.dtype)
    else:
        soft = lambda x: torch.tanh(x.double() / cap) * cap  # noqa: E731
        res.out_logits = (clean_out.double() + (soft(res.logits) - soft(clean))).to(clean_out.dtype)
    return res


def _read_change(sp, l: int, mid: torch.Tensor, p_idx: torch.Tensor) -> torch.Tensor:
    """Change of layer l's CLT read point for a change `mid` of resid_mid at positions `p_idx` (frozen MLP norm)."""
    if sp.clt.feature_input_hook == "resid_mid":
        return mid.to(sp.cdtype)
    W = sp.W[l]
    return W.mlp_norm.apply(mid, sp.s_mlp[l][p_idx].to(mid.dtype), with_bias=False).to(sp.cdtype)


def _records(sp, l: int, ops, delta: torch.Tensor, p0: int, row_p: torch.Tensor, res: LinearOut, watch,
             mlp_at) -> None:
    """Watched features and MLP records of layer l, from the change of resid_mid `delta` [B, Q, d] (positions
    p0..P-1), as the hooked pass computes them in a constrained layer."""
    B, Q, d = delta.shape
    if watch is not None:
        j = torch.nonzero((watch[:, 0] == l) & (watch[:, 1] >= p0)).squeeze(1)
        if j.numel():
            p, f = watch[j, 1], watch[j, 2]
            dr = _read_change(sp, l, delta[:, p - p0], p)  # [B, n, d]
            res.watched_pre[:, j] = sp.clean_pre[l][p, f] + torch.einsum("bnd,nd->bn", dr, sp.W_enc[l][f])
        j = torch.nonzero(watch[:, 0] == l).squeeze(1)
        if ops is not None and j.numel():  # clamped activations: the clean ones with this layer's ops applied
            hit = (ops.pos[:, None] == watch[j, 1][None]) & (ops.feat[:, None] == watch[j, 2][None])
            i, k = torch.nonzero(hit, as_tuple=True)
            new = ops.apply(sp.clean_acts[l][ops.pos, ops.feat])
            res.watched_acts[ops.rows[i], j[k]] = new[i].to(res.watched_acts.dtype)
    if mlp_at is not None:
        rows = torch.nonzero(mlp_at == l).squeeze(1)
        if rows.numel():
            # only where the row's change can have arrived: its positions from its first intervened one on
            r, q = torch.nonzero(torch.arange(p0, sp.P, device=delta.device)[None] >= row_p[rows][:, None],
                                 as_tuple=True)
            b, p = rows[r], q + p0
            mid = delta[b, q]  # [n, d]
            y = (sp.mlp_in[l][p] + sp.W[l].mlp_norm.apply(mid, sp.s_mlp[l][p].to(mid.dtype), with_bias=False)
                 ).to(sp.mlp_in.dtype)
            mlp, mlp_out = module(sp.ad, "mlp", l), module(sp.ad, "mlp_out", l)
            out = mlp(y)
            if mlp_out is not mlp:
                out = mlp_out(out)
            out = out[0] if isinstance(out, tuple) else out
            res.mlp_real_at[b, p] = out.to(res.mlp_real_at.dtype)
            h = sp.clean_pre[l][p] + _read_change(sp, l, mid, p) @ sp.W_enc[l].T  # positions >= 1: never BOS
            a = sp._fire(l, h)
            # few activations change (only active features, or ones crossing the threshold): decode just those
            diff = a - sp.clean_acts[l][p]
            i, f = torch.nonzero(diff, as_tuple=True)
            resp = torch.zeros(len(p), d, dtype=sp.W_dec[l].dtype, device=delta.device)
            resp.index_add_(0, i, sp.W_dec[l][f, 0] * diff[i, f][:, None])
            res.mlp_response_at[b, p] = resp.to(res.mlp_response_at.dtype)
