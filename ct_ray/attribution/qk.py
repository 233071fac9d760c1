"""QK attribution: why a head attended where it did, as an exact bilinear sum over the graph's sources.

Attention patterns are frozen in the local replacement model, so the pre-softmax score of head h at layer l between
query position p and key position k is a bilinear form of the residual stream at the attention's input,
resid_pre[l]:

    score = scaling * <Q(x[p]), K(x[k])>,   Q(x) = rope_p(q_norm(W_Q,h norm(x) + b_Q,h))   (K alike, kv(h))

With the attention pre-norm's and the q/k norms' denominators frozen at the real forward's values (as every other
norm), and RoPE a fixed rotation per position, Q and K are affine, and resid_pre[l] is the sum of the sources'
contributions plus constant terms (biases, the BOS sink). Each query coordinate is a read-out of resid_pre[l] at p:
one transposed pass (`RowEngine.rows(pre=True)`) gives every source's contribution to it, exactly as an adjacency
row. So with C_q [d_head, S] and C_k [d_head, S] (the constant part as one more column, "bias"):

    score = scaling * sum_{s, s'} <C_q[:, s], C_k[:, s']>          (pairwise terms)
          = scaling * sum_s <C_q[:, s], k>  = scaling * sum_s' <q, C_k[:, s']>   (query-, key-side marginals)

Gemma 2's attention softcap comes after: the decomposed score is the one before it. Sources are every active
feature (not only the graph's kept ones), error nodes and token embeddings, so the terms sum to the real score.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..models.hooks import Hooks, forward
from . import budget as _budget
from .replacement import Replacement
from .rows import RowEngine

BIAS = "bias"  # the constant terms' id in QK results (biases, the BOS sink's MLP output)


@dataclass
class QKItem:
    """One attention score to explain: head `head` of layer `layer`, query position `query`, key position `key`;
    `target` is the graph node (its `node` id) whose incoming edges this head carries most at that position."""

    layer: int
    head: int
    query: int
    key: int
    target: int = -1


@dataclass
class QKResult:
    item: QKItem
    score: float  # the real pre-softmax score (before any softcap), from the real forward's values
    decomposed: float  # the sum of the terms below (equal to `score` within fp32 tolerance)
    pattern: float  # the real attention weight
    pairs: list[tuple[str, str, float]] = field(default_factory=list)  # top (query source, key source, term)
    query_side: list[tuple[str, float]] = field(default_factory=list)  # top query-side marginals
    key_side: list[tuple[str, float]] = field(default_factory=list)  # top key-side marginals
    scale: float = 0.0  # the magnitudes summed (query-side marginals): the tolerance of |score - decomposed|
    ids: list[str] = field(default_factory=list, repr=False)  # source ids, the last one BIAS
    query_terms: torch.Tensor | None = field(default=None, repr=False)  # [S + 1] every query-side marginal
    key_terms: torch.Tensor | None = field(default=None, repr=False)  # [S + 1] every key-side marginal


def rotary(model, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """The (cos, sin) [P, d_head] each layer's attention was given in the real forward (None: no RoPE)."""
    ad = model.adapter
    got: list = [None] * ad.n_layers

    def grab(l):
        def fn(mod, args, kwargs):
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                got[l] = (pe[0][0].detach().float().cpu(), pe[1][0].detach().float().cpu())
        return fn

    with Hooks(model) as h:
        for l in range(ad.n_layers):
            h.handles.append(ad.module("attn", l).register_forward_pre_hook(grab(l), with_kwargs=True))
        forward(model, tokens[None].to(next(model.model.parameters()).device), logits=False)
    return got


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class QKMaps:
    """The affine maps from resid_pre[l] to one head's rotated query / key vectors, with frozen denominators."""

    def __init__(self, model, rep: Replacement, rope: list):
        self.ad, self.rep, self.rope = model.adapter, rep, rope
        self._w: dict[int, object] = {}
        c = rep.cache
        self.x_real = torch.cat([c.resid_pre0[None], c.resid_post[:-1]]).float()  # [L, P, d]: resid_pre[l]

    def weights(self, l: int):
        if l not in self._w:
            self._w[l] = self.ad.qk_weights(l)
        return self._w[l]

    def _linear(self, l: int, x: torch.Tensor, pos: int, head: int, side: str, bias: bool) -> torch.Tensor:
        """W_Q,h (or W_K) applied to the frozen pre-norm of x, plus its bias: the vector before any q/k norm."""
        rep, w, dh = self.rep, self.weights(l), self.rep.dh
        W, b = (w.W_Q, w.b_Q) if side == "q" else (w.W_K, w.b_K)
        y = rep.W[l].attn_norm.apply(x, rep.s_attn[l][pos], with_bias=bias) @ W[head * dh : (head + 1) * dh].float().T
        if bias and b is not None:
            y = y + b[head * dh : (head + 1) * dh].float()
        return y

    def _project(self, l: int, x: torch.Tensor, pos: int, head: int, side: str, bias: bool) -> torch.Tensor:
        w = self.weights(l)
        y = self._linear(l, x, pos, head, side, bias)
        norm = w.q_norm if side == "q" else w.k_norm
        if norm is not None:  # per-head norm, denominator frozen at the real vector's
            real = self._linear(l, self.x_real[l, pos], pos, head, side, True)
            y = norm.apply(y, norm.scale(real), with_bias=bias)
        if self.rope[l] is not None:
            cos, sin = self.rope[l][0][pos], self.rope[l][1][pos]
            y = y * cos + _rotate_half(y) * sin
        return y

    def vector(self, l: int, x: torch.Tensor, pos: int, head: int, side: str) -> torch.Tensor:
        """The (affine) query or key vector of the stream value x [d] at `pos`."""
        return self._project(l, x, pos, head, side, bias=True)

    def readouts(self, l: int, pos: int, head: int, side: str) -> torch.Tensor:
        """[d_head, d]: row i reads coordinate i of the (rotated) vector off resid_pre[l] at `pos` (the linear part)."""
        eye = torch.eye(self.rep.d)
        return self._project(l, eye, pos, head, side, bias=False).T.contiguous()

    def score(self, l: int, head: int, query: int, key: int) -> float:
        """The real pre-softmax score (before any softcap)."""
        kv = head // (self.rep.H // self.rep.Hkv)
        q = self.vector(l, self.x_real[l, query], query, head, "q").double()
        k = self.vector(l, self.x_real[l, key], key, kv, "k").double()
        return float(self.weights(l).scaling * (q @ k))


def source_ids(engine: RowEngine, f_layer, f_pos, f_idx, tokens: list[int]) -> list[str]:
    """Node ids (Neuronpedia form) of the engine's source columns, then BIAS for the constant column."""
    rep = engine.rep
    L, P = rep.L, rep.P
    ids = [f"{l}_{i}_{p}" for l, p, i in zip(f_layer.tolist(), f_pos.tolist(), f_idx.tolist())]
    ids += [f"{l}_-1_{p}" for l in range(L) for p in range(P)]
    ids += [f"E_{tokens[p]}_{p}" for p in range(P)]
    return ids + [BIAS]


def _top_pairs(Cq: torch.Tensor, Ck: torch.Tensor, scaling: float, k: int) -> list[tuple[int, int, float]]:
    """The k largest |scaling * <Cq[:, i], Ck[:, j]>| over all (i, j), exactly: candidates grow from the largest
    column norms until Cauchy-Schwarz bounds every pair outside them below the k-th best found."""
    nq, nk = Cq.norm(dim=0), Ck.norm(dim=0)
    oq, ok = torch.argsort(nq, descending=True), torch.argsort(nk, descending=True)
    m = 64
    while True:
        mq, mk = min(m, len(oq)), min(m, len(ok))
        T = scaling * (Cq[:, oq[:mq]].T @ Ck[:, ok[:mk]])
        kk = min(k, T.numel())
        vals, flat = T.abs().flatten().topk(kk)
        tau = float(vals[-1]) if kk else 0.0
        outside = 0.0
        if mq < len(oq):
            outside = max(outside, float(nq[oq[mq]] * nk[ok[0]]))
        if mk < len(ok):
            outside = max(outside, float(nq[oq[0]] * nk[ok[mk]]))
        if abs(scaling) * outside <= tau or (mq == len(oq) and mk == len(ok)):
            return [(int(oq[i // mk]), int(ok[i % mk]), float(T.flatten()[i])) for i in flat.tolist()]
        m *= 4


@torch.no_grad()
def qk_attribution(model, rep: Replacement, items: list[QKItem], *, top: int = 10, batch_size: int = 1024,
                   engine: RowEngine | None = None, memory_budget: int | None = None) -> list[QKResult]:
    """Decompose the pre-softmax score of each item over every source of `rep`'s prompt (see the module docs)."""
    from .attribute import _features

    if not items:
        return []
    feats = _features(rep)
    budget = _budget.default_budget(rep.cache.resid_mid.device) if memory_budget is None else int(memory_budget)
    if engine is None:
        engine = RowEngine(rep, *feats, chunk_bytes=_budget.CHUNK_BYTES)
        if engine.decoder_bytes() <= int(budget * _budget.CACHE_FRACTION):
            engine.fill_cache(engine.decoder_bytes())  # decoder rows gathered once, not per batch of read-outs
    # read-out rows per backward pass sized as attribution sizes its batches: the gradient buffers within their share
    batch_size = _budget.batch_size_for(batch_size, rep.P, rep.L, rep.d, engine.S, budget)
    ids = source_ids(engine, *feats[:3], rep.cache.tokens.tolist())
    maps = QKMaps(model, rep, rotary(model, rep.cache.tokens))
    G = rep.H // rep.Hkv
    # constant stream: the frozen model on the constant sources (biases included) at each attention input
    cmids, _ = rep.forward(rep.constant_sources())
    c_pre = torch.cat([torch.zeros_like(rep.cache.resid_pre0)[None], cmids[:-1] + rep.mlp_const[:-1]])

    # every (layer, side, head, position) read-out, each d_head rows, in batches of rows
    wanted: dict[tuple, None] = {}
    for it in items:
        wanted[(it.layer, "q", it.head, it.query)] = None
        wanted[(it.layer, "k", it.head // G, it.key)] = None
    contrib: dict[tuple, torch.Tensor] = {}
    keys = list(wanted)
    per = max(1, batch_size // rep.dh)
    for i in range(0, len(keys), per):
        part = keys[i : i + per]
        vecs = torch.cat([maps.readouts(l, p, h, side) for l, side, h, p in part])
        t_layer = torch.cat([torch.full((rep.dh,), l) for l, _, _, _ in part])
        t_pos = torch.cat([torch.full((rep.dh,), p) for _, _, _, p in part])
        rows = engine.rows(t_layer, t_pos, vecs, pre=True)  # [n * d_head, S]
        for j, key in enumerate(part):
            l, side, h, p = key
            const = maps.vector(l, c_pre[l, p], p, h, side)
            contrib[key] = torch.cat([rows[j * rep.dh : (j + 1) * rep.dh], const[:, None]], 1).double()  # [dh, S+1]

    out = []
    for it in items:
        Cq = contrib[(it.layer, "q", it.head, it.query)]
        Ck = contrib[(it.layer, "k", it.head // G, it.key)]
        scaling = maps.weights(it.layer).scaling
        q, k = Cq.sum(1), Ck.sum(1)
        qm, km = scaling * (Cq.T @ k), scaling * (q @ Ck)
        res = QKResult(it, maps.score(it.layer, it.head, it.query, it.key), float(qm.sum()),
                       float(rep.patterns[it.layer, it.head, it.query, it.key]), scale=float(qm.abs().sum()),
                       ids=ids, query_terms=qm, key_terms=km)
        res.pairs = [(ids[a], ids[b], v) for a, b, v in _top_pairs(Cq, Ck, scaling, top)]
        res.query_side = _top_marginals(qm, ids, top)
        res.key_side = _top_marginals(km, ids, top)
        out.append(res)
    return out


def _top_marginals(m: torch.Tensor, ids: list[str], k: int) -> list[tuple[str, float]]:
    vals, idx = m.abs().topk(min(k, len(m)))
    return [(ids[i], float(m[i])) for i, v in zip(idx.tolist(), vals.tolist()) if v > 0]


def select_items(model, rep: Replacement, graph, loadings, *, top_fraction: float = 0.6, topk: int = 10,
                 max_keys: int = 3) -> list[QKItem]:
    """The attention scores worth explaining in `graph`: the (layer, head, query position) triples carrying the most
    head-loading mass (the fewest covering `top_fraction` of it, at most `topk`), and for each the key positions
    that deliver most of what the graph's targets read through that head (the fewest covering `top_fraction`, at
    most `max_keys`)."""
    from .heads import head_outputs, target_readouts

    mass = loadings.head_mass  # [L, H, P]
    total = float(mass.sum())
    if total <= 0:
        return []
    vals, flat = mass.flatten().sort(descending=True)
    n = int(torch.searchsorted(torch.cumsum(vals, 0), torch.tensor([top_fraction * total])).item()) + 1
    n = max(1, min(n, topk, int((vals > 0).sum())))
    L, H, P = mass.shape
    kind = graph.nodes.column("kind").to_pylist()
    node = graph.nodes.column("node").to_numpy()
    layer, pos = graph.column("layer").long(), graph.column("position").long()
    feat, token = graph.column("feature").long(), graph.column("token").long()
    is_t = np.isin(np.asarray(kind), ["feature", "logit"])
    tgt = torch.from_numpy(np.nonzero(is_t)[0])
    vt = target_readouts(rep, [kind[i] for i in tgt.tolist()], layer[tgt], pos[tgt], feat[tgt], token[tgt])
    # per target node, |loading| through one (layer, head): summed over its edges when an item needs it
    t_ids, t_of_edge = np.unique(loadings.target, return_inverse=True)
    t_of_edge = torch.from_numpy(t_of_edge)

    def by_target(l: int, h: int) -> dict[int, float]:
        m = torch.zeros(len(t_ids)).index_add_(0, t_of_edge, loadings.heads[:, l, h].abs())
        return dict(zip(t_ids.tolist(), m.tolist()))
    maps = QKMaps(model, rep, [None] * rep.L)
    items = []
    for f in flat[:n].tolist():
        l, h, p = f // (H * P), (f // P) % H, f % P
        at = (pos[tgt] == p) & (layer[tgt].clamp(max=L - 1) >= l)
        if not at.any():
            continue
        sel = tgt[at]
        o = head_outputs(rep, l, vt[at], pos[sel])[:, h]  # [n, dh]
        v = rep.attn_values(l, maps.x_real[l], rep.s_attn[l])[:, h // (rep.H // rep.Hkv)]  # [P, dh], real stream
        m = (rep.patterns[l, h, p][None, :] * (o @ v.T)).abs().sum(0)  # [P] per key position
        kv_vals, kv_idx = m.sort(descending=True)
        nk = int(torch.searchsorted(torch.cumsum(kv_vals, 0), torch.tensor([top_fraction * float(m.sum())])).item()) + 1
        nk = max(1, min(nk, max_keys, int((kv_vals > 0).sum()) or 1))
        mass_t = by_target(l, h)
        best = max(node[sel.numpy()].tolist(), key=lambda t: mass_t.get(t, 0.0))
        items += [QKItem(l, h, p, int(q), int(best)) for q in kv_idx[:nk].tolist()]
    return items
