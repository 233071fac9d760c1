"""Head loadings: each edge of a graph split exactly over the attention heads that carry it.

Through the frozen linear system, an edge s -> t is the sum over the paths from s's writes to t's read-out. Every path
that goes through at least one attention head has a *last* head, (layer l, head h): after it the path stays at t's
position and reaches t through the residual stream alone. So

    edge(s -> t) = direct(s, t) + sum_{l, h} loading(s, t, l, h)

where `direct` is the residual path (s writes at t's position below t's layer: no head), and loading(s, t, l, h) the
paths whose last head is (l, h). With v_s[l] the value vectors of s's whole stream (every path from s, through any
heads) at the input of layer l's attention, and o_t[l, h] = W_O,h^T (t's read-out, back through any post-attention
norm), that is

    loading(s, t, l, h) = sum_q pattern[l, h, p_t, q] * <o_t[l, h], v_s[l][q, kv(h)]>

i.e. <z_s[l, h][p_t], o_t[l, h]> with z the head's output before W_O. So a head's loading is exactly what removing
its output at t's position changes in t when the heads above it are held fixed (tests/test_heads.py). v_s comes from a
forward pass of s's writes through the frozen model (biases left out: they are constant terms, not edges), one batch of
sources at a time, layer by layer; the cost is one forward per kept source plus an O(edges x heads x d_head)
contraction per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from ..clt.lazy import decoder_rows
from .replacement import Replacement

NO_HEAD = -1  # the residual path of an edge (no head): layer -1, head -1
OTHER_HEADS = -2  # the sum of the heads an edge's rows do not list: layer -1, head -2

EDGE_HEADS_SCHEMA = pa.schema([
    ("source", pa.int32()), ("target", pa.int32()), ("layer", pa.int32()), ("head", pa.int32()),
    ("weight", pa.float32()),
])


@dataclass
class HeadLoadings:
    """Loadings of a graph's edges: rows of `edge_heads` plus the dense form for checks."""

    source: np.ndarray  # [E] node ids (the graph's `node` column)
    target: np.ndarray  # [E]
    edge: np.ndarray  # [E] the edge weights (the graph's adjacency)
    direct: torch.Tensor  # [E] residual-path term
    heads: torch.Tensor  # [E, L, H] loading per (layer, head)
    head_mass: torch.Tensor  # [L, H, P] |loading| summed over the edges into targets at each position

    def residual(self) -> torch.Tensor:
        """|direct + sum of loadings - edge| per edge, in float64 (accumulated, never a float64 copy of the loadings)."""
        total = self.direct.double() + self.heads.sum((1, 2), dtype=torch.float64)
        return (total - torch.from_numpy(self.edge).double()).abs()

    def scale(self, chunk: int = 65536) -> torch.Tensor:
        """The magnitudes summed, per edge (the tolerance of `residual` is relative to these); edges `chunk` at a time."""
        parts = [self.heads[c0 : c0 + chunk].abs().sum((1, 2), dtype=torch.float64)
                 for c0 in range(0, len(self.heads), chunk)]
        return self.direct.double().abs() + (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64))

    def rows(self, top: int = 8, chunk: int = 65536) -> pa.Table:
        """`edge_heads` rows: per edge its residual path (head -1), its `top` heads by |loading| and, when more heads
        carry it, one row (head -2) with the rest, so every edge's rows sum to its weight. top <= 0: every head.
        Edges are taken `chunk` at a time (temporaries bounded by the chunk, not the graph)."""
        E, L, H = self.heads.shape
        k = L * H if top <= 0 else min(top, L * H)
        parts = []
        for c0 in range(0, E, chunk):
            flat = self.heads[c0 : c0 + chunk].reshape(-1, L * H)
            n = len(flat)
            vals, idx = flat.abs().topk(k, dim=1)
            nz = vals > 0
            picked = torch.gather(flat, 1, idx)
            rest = flat.sum(1) - (picked * nz).sum(1)
            has_rest = nz.sum(1) < (flat != 0).sum(1)
            r_idx = torch.nonzero(has_rest).squeeze(1)
            e = torch.cat([torch.arange(n), torch.arange(n)[:, None].expand(n, k)[nz], r_idx]) + c0
            lay = torch.cat([torch.full((n,), -1), (idx // H)[nz], torch.full((len(r_idx),), -1)])
            hd = torch.cat([torch.full((n,), NO_HEAD), (idx % H)[nz], torch.full((len(r_idx),), OTHER_HEADS)])
            w = torch.cat([self.direct[c0 : c0 + n], picked[nz], rest[r_idx]])
            order = np.argsort(e.numpy(), kind="stable")
            parts.append(pa.table({
                "source": pa.array(self.source[e.numpy()][order], pa.int32()),
                "target": pa.array(self.target[e.numpy()][order], pa.int32()),
                "layer": pa.array(lay.numpy()[order].astype(np.int32)),
                "head": pa.array(hd.numpy()[order].astype(np.int32)),
                "weight": pa.array(w.float().numpy()[order]),
            }, schema=EDGE_HEADS_SCHEMA))
        return pa.concat_tables(parts) if parts else EDGE_HEADS_SCHEMA.empty_table()


def source_writes(rep: Replacement, kind: list[str], layer: torch.Tensor, pos: torch.Tensor, feat: torch.Tensor,
                  act: torch.Tensor):
    """What each source node adds to the residual stream: (embedding part [n, d] at its position, per-layer writes
    [n, L, d] at its position). Features write through their decoders (act x W_dec), errors their error term."""
    n, L, d = len(kind), rep.L, rep.d
    emb = torch.zeros(n, d)
    writes = torch.zeros(n, L, d)
    k = np.asarray(kind)
    for i in np.nonzero(k == "embedding")[0]:
        emb[i] = rep.cache.resid_pre0[pos[i]]
    for i in np.nonzero(k == "error")[0]:
        writes[i, layer[i]] = rep.error[layer[i], pos[i]]
    fi = np.nonzero(k == "feature")[0]
    for l in torch.unique(layer[fi]).tolist() if len(fi) else []:
        sel = fi[(layer[fi] == l).numpy()]
        dec = decoder_rows(rep.clt, l, feat[sel]).float()  # [n, span, d]
        writes[sel, l : l + dec.shape[1]] = dec * act[sel].float()[:, None, None]
    return emb, writes


def target_readouts(rep: Replacement, kind: list[str], layer: torch.Tensor, pos: torch.Tensor, feat: torch.Tensor,
                    token: torch.Tensor) -> torch.Tensor:
    """Read-out vector of each target w.r.t. the residual it reads (resid_mid[layer], or the final residual)."""
    v = torch.zeros(len(kind), rep.d)
    k = np.asarray(kind)
    lo = np.nonzero(k == "logit")[0]
    if len(lo):
        v[lo] = rep.logit_readout(token[lo])[0]
    fi = np.nonzero(k == "feature")[0]
    for l in torch.unique(layer[fi]).tolist() if len(fi) else []:
        sel = fi[(layer[fi] == l).numpy()]
        v[sel] = rep.encoder_readout(l, pos[sel], feat[sel])
    return v


class StreamForward:
    """The frozen model's linear part (no biases) on a batch of source streams [n, P, d], one layer at a time: the
    replacement model's own attention steps, without their biases."""

    def __init__(self, rep: Replacement):
        self.rep = rep

    def values(self, l: int, x: torch.Tensor) -> torch.Tensor:
        return self.rep.attn_values(l, x, self.rep.s_attn[l], bias=False)

    def mix(self, l: int, v: torch.Tensor) -> torch.Tensor:
        return self.rep.attn_mix(l, v)

    def out(self, l: int, z: torch.Tensor) -> torch.Tensor:
        rep = self.rep
        o = rep.attn_out(l, z, bias=False)
        if rep.s_post is not None:
            o = rep.W[l].attn_post_norm.apply(o, rep.s_post[l], with_bias=False)
        return o


def head_outputs(rep: Replacement, l: int, vecs: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """o_t[l, h] = W_O,h^T (read-out back through the post-attention norm): [n, H, d_head]."""
    W = rep.W[l]
    g = vecs
    if rep.s_post is not None:
        g = W.attn_post_norm.vjp(g, rep.s_post[l][pos])
    return (g @ W.W_O).view(len(vecs), rep.H, rep.dh)


def estimate_bytes(n_edges: int, n_sources: int, L: int, H: int, P: int, d: int, source_batch: int = 256) -> int:
    """Peak bytes `head_loadings` (and its rows, chunked) allocate: the [E, L, H] loadings plus a third for the
    edge index arrays and the rows' output, one source batch's streams and writes, the targets' per-layer head
    outputs."""
    b = min(source_batch, max(n_sources, 1))
    return int(4 * (1.35 * n_edges * L * H + 16 * n_edges + b * (3 * P + 2 * L + 2) * d + b * P * H * d
                    + n_sources * L * H * d // 8))


@torch.no_grad()
def head_loadings(rep: Replacement, graph, *, source_batch: int = 256, memory_budget: int | None = None) -> HeadLoadings:
    """Head loadings of every edge of `graph` (a graph of `rep`'s prompt; pruned or not). The memory they need is
    estimated first: past `memory_budget` (default: attribution's, see budget.py) a GraphTooLargeError says so."""
    from . import budget as _budget
    L, P, H = rep.L, rep.P, rep.H
    kind = graph.nodes.column("kind").to_pylist()
    layer, pos, feat = graph.column("layer").long(), graph.column("position").long(), graph.column("feature").long()
    token, act = graph.column("token").long(), graph.column("activation")
    ids = graph.nodes.column("node").to_numpy()
    t, s = torch.nonzero(graph.adjacency, as_tuple=True)  # kept edges: (target row, source column)
    budget = _budget.default_budget(rep.cache.resid_mid.device) if memory_budget is None else int(memory_budget)
    need = estimate_bytes(len(t), len(torch.unique(s)), L, H, P, rep.d, source_batch)
    if need > budget:
        raise _budget.GraphTooLargeError(
            f"head loadings of {len(t):,} edges need ~{need / 2**30:.1f} GiB, more than the memory budget of "
            f"{budget / 2**30:.1f} GiB: prune harder (node/edge thresholds) or raise the budget "
            f"(CT_RAY_ATTRIBUTION_MEMORY)")
    E = len(t)
    srcs, s_local = torch.unique(s, return_inverse=True)
    # sources ordered by the layer of their first write (embeddings first, in batches of their own): a batch's
    # forward starts at its lowest layer, since a stream is zero below its source's first write
    first_w = torch.tensor([-1 if kind[i] == "embedding" else int(layer[i]) for i in srcs.tolist()], dtype=torch.long)
    order = torch.argsort(first_w, stable=True)
    srcs, first_w = srcs[order], first_w[order]
    s_local = torch.argsort(order)[s_local]
    n_emb = int((first_w < 0).sum())
    starts = [0] + list(range(n_emb, len(srcs), source_batch)) if n_emb else list(range(0, len(srcs), source_batch))
    bounds = [(a, (starts + [len(srcs)])[i + 1]) for i, a in enumerate(starts) if a < len(srcs)]
    batch_of = torch.zeros(len(srcs), dtype=torch.long)
    for i, (b0, b1) in enumerate(bounds):
        batch_of[b0:b1] = i
    # a target reads resid_mid[layer] (a logit: layer L, the final residual): writes below that layer reach it, and
    # the heads of layers up to its own
    t_top = layer[t].clamp(max=L - 1)
    # edges ordered by (source batch, target position, deepest target first): each (batch, position) group is one
    # contiguous range, and at layer l the edges its heads reach are a prefix of it
    perm = torch.argsort((batch_of[s_local] * P + pos[t]) * L + (L - 1 - t_top), stable=True)
    t, s, s_local, t_top = t[perm], s[perm], s_local[perm], t_top[perm]
    t_read, t_pos = layer[t], pos[t]
    tgts, t_local = torch.unique(t, return_inverse=True)
    skind = [kind[i] for i in srcs.tolist()]
    tkind = [kind[i] for i in tgts.tolist()]
    vt = target_readouts(rep, tkind, layer[tgts], pos[tgts], feat[tgts], token[tgts])
    fwd = StreamForward(rep)
    heads = torch.zeros(E, L, H)
    head_mass = torch.zeros(L, P, H)
    direct = torch.zeros(E)

    # o_t[l, h] of every target at every layer, computed once: [L, n_t, H, dh]
    O = torch.stack([head_outputs(rep, l, vt, pos[tgts]) for l in range(L)])
    e_start = torch.searchsorted(batch_of[s_local], torch.arange(len(bounds) + 1)).tolist()
    for bi, (b0, b1) in enumerate(bounds):
        g0, g1 = e_start[bi], e_start[bi + 1]
        if g0 == g1:
            continue
        sb = srcs[b0:b1]
        emb, writes = source_writes(rep, skind[b0:b1], layer[sb], pos[sb], feat[sb], act[sb])
        bpos = pos[sb]
        loc = s_local[g0:g1] - b0
        # direct term: s's writes at t's position below t's read (t's own layer's MLP comes after its read)
        same = g0 + torch.nonzero(bpos[loc] == t_pos[g0:g1]).squeeze(1)  # only edges within one position have it
        if len(same):
            below = torch.cat([emb[:, None], emb[:, None] + torch.cumsum(writes, 1)], 1)  # [n, L + 1, d]: below layer
            w = below[s_local[same] - b0, t_read[same]]
            direct[same] = torch.linalg.vecdot(w, vt[t_local[same]])
            del below, w

        # per target position: one small matmul over every (source, target) pair there, the edges gathered from it
        groups = []
        pp, counts = torch.unique_consecutive(t_pos[g0:g1], return_counts=True)
        r0 = g0
        for p, c in zip(pp.tolist(), counts.tolist()):
            tp, t_in = torch.unique(t_local[r0 : r0 + c], return_inverse=True)
            flat = (s_local[r0 : r0 + c] - b0) * len(tp) + t_in
            reach = (L - 1 - t_top[r0 : r0 + c]).contiguous()  # ascending: edges reached at layer l are a prefix
            groups.append((p, r0, flat, tp, reach))
            r0 += c
        first = int(first_w[b0])
        x = torch.zeros(len(sb), P, rep.d)
        x[torch.arange(len(sb)), bpos] = emb + writes[:, : first + 1].sum(1)
        for l in range(first + 1, L):
            z = fwd.mix(l, fwd.values(l, x))  # [n, P, H, dh]: each head's output at every position, before W_O
            for p, r0, flat, tp, reach in groups:
                k = int(torch.searchsorted(reach, L - 1 - l, right=True))  # targets at layer >= l
                if not k:
                    continue
                M = torch.einsum("shd,thd->sth", z[:, p], O[l, tp]).reshape(-1, H)  # [n x targets at p, H]
                w = M.index_select(0, flat[:k])
                heads[r0 : r0 + k, l] = w  # a contiguous range of edges: a strided copy, no scatter
                head_mass[l, p] += w.abs().sum(0)
            x = x + fwd.out(l, z)
            x[torch.arange(len(sb)), bpos] += writes[:, l]
    return HeadLoadings(ids[s.numpy()], ids[t.numpy()], graph.adjacency[t, s].numpy(), direct, heads,
                        head_mass.permute(0, 2, 1).contiguous())
