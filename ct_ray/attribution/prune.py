"""Influence, pruning and graph scores (Ameisen et al. 2025), in row chunks so no N x N temporary is made.

Definitions follow circuit-tracer: Â = |A| with each row (a target's incoming edges) normalised to sum 1;
node influence = w Σ_{k>=1} Â^k with w the logit probabilities; nodes kept up to a cumulative influence fraction,
edges up to a cumulative fraction of their scores Â[t, s] * (influence[t] + w[t]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..specs.attribution import PruneSpec

CHUNK = 2048  # rows per chunk: bounds temporaries at CHUNK x N


def row_sums(A: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    out = torch.empty(A.shape[0])
    for i in range(0, A.shape[0], chunk):
        out[i : i + chunk] = A[i : i + chunk].abs().sum(1)
    return out.clamp_min(1e-10)


def vec_times_normalised(x: torch.Tensor, A: torch.Tensor, rs: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """x @ Â, with Â = |A| / row sums, computed chunk by chunk."""
    y = torch.zeros(A.shape[1])
    xs = x / rs
    for i in range(0, A.shape[0], chunk):
        if xs[i : i + chunk].any():
            y += xs[i : i + chunk] @ A[i : i + chunk].abs()
    return y


def influence(A: torch.Tensor, weights: torch.Tensor, max_iter: int = 10_000) -> torch.Tensor:
    """w Σ_{k>=1} Â^k. The graph is acyclic, so the series ends (exactly zero) after its depth."""
    rs = row_sums(A)
    cur = vec_times_normalised(weights, A, rs)
    total = cur.clone()
    for _ in range(max_iter):
        if not cur.any():
            return total
        cur = vec_times_normalised(cur, A, rs)
        total += cur
    raise RuntimeError("influence did not converge: the adjacency matrix has a cycle")


def mass_threshold(values_fn, frac: float, n_bins: int = 4096) -> float:
    """The score τ such that keeping values >= τ keeps the smallest top set whose sum reaches `frac` of the total
    (the rule of circuit-tracer's sorted-cumsum `find_threshold`), found with a log histogram and one exact sort of
    a single bin, so memory stays O(chunk) instead of a sort of all N² values.

    `values_fn()` yields 1-D chunks of the non-negative values (called twice)."""
    total, vmax, vmin = 0.0, 0.0, float("inf")
    count = 0
    for v in values_fn():
        count += v.numel()
        pos = v[v > 0]
        if pos.numel():
            total += float(pos.double().sum())
            vmax = max(vmax, float(pos.max()))
            vmin = min(vmin, float(pos.min()))
    if total == 0.0 or count == 0 or frac >= 1.0:
        return 0.0  # keep everything
    target = frac * total
    lo, hi = torch.log(torch.tensor(vmin, dtype=torch.float64)), torch.log(torch.tensor(vmax, dtype=torch.float64))
    edges = torch.linspace(float(lo), float(hi), n_bins + 1, dtype=torch.float64)
    edges[-1] = float("inf")
    mass = torch.zeros(n_bins, dtype=torch.float64)

    def bins(pos):
        return (torch.bucketize(pos.log(), edges, right=True) - 1).clamp(0, n_bins - 1)

    for v in values_fn():
        pos = v[v > 0].double()
        if pos.numel():
            mass += torch.bincount(bins(pos), weights=pos, minlength=n_bins)
    above = torch.flip(torch.cumsum(torch.flip(mass, [0]), 0), [0])  # mass in bins >= b
    # the highest bin at which the cumulative sum from the top reaches the target
    crossing = int(torch.nonzero(above >= target * (1 - 1e-12)).max())
    inside = []
    for v in values_fn():
        pos = v[v > 0].double()
        if pos.numel():
            inside.append(pos[bins(pos) == crossing])
    vals = torch.sort(torch.cat(inside), descending=True).values
    cum = float(above[crossing] - mass[crossing]) + torch.cumsum(vals, 0)
    idx = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64)))
    return float(vals[min(idx, len(vals) - 1)])


@dataclass
class PruneResult:
    node_mask: torch.Tensor  # [N] bool
    edge_mask: torch.Tensor  # [K, K] bool over kept nodes (rows = targets)
    node_influence: torch.Tensor  # [N]


def prune(A: torch.Tensor, logit_weights: torch.Tensor, n_features: int, n_fixed: int,
          node_threshold: float = PruneSpec.field_default("node_threshold"),
          edge_threshold: float = PruneSpec.field_default("edge_threshold")) -> PruneResult:
    """Keep the nodes carrying `node_threshold` of the influence on the logits and the edges carrying
    `edge_threshold` of the edge influence. The last `n_fixed` nodes (embeddings + logits) are always kept."""
    N = A.shape[0]
    node_inf = influence(A, logit_weights)
    tau = mass_threshold(lambda: iter([node_inf[: N - n_fixed]]), node_threshold)
    node_mask = node_inf >= tau
    node_mask[N - n_fixed :] = True
    keep = torch.nonzero(node_mask).squeeze(1)
    sub = A[keep][:, keep]  # K x K: the output's own size
    w = logit_weights[keep]
    inf_sub = influence(sub, w) + w
    rs = row_sums(sub)

    def edge_scores():
        for i in range(0, sub.shape[0], CHUNK):
            yield (sub[i : i + CHUNK].abs() / rs[i : i + CHUNK, None] * inf_sub[i : i + CHUNK, None]).flatten()

    tau_e = mass_threshold(edge_scores, edge_threshold)
    edge_mask = torch.zeros(sub.shape, dtype=torch.bool)
    for i in range(0, sub.shape[0], CHUNK):
        sc = sub[i : i + CHUNK].abs() / rs[i : i + CHUNK, None] * inf_sub[i : i + CHUNK, None]
        edge_mask[i : i + CHUNK] = (sc >= tau_e) & (sc > 0)
    # drop feature/error nodes left without outgoing edges, and features without incoming ones, until stable
    K = len(keep)
    is_feat = keep < n_features
    prunable = keep < N - n_fixed
    alive = torch.ones(K, dtype=torch.bool)
    while True:
        has_out = edge_mask.any(0)
        has_in = edge_mask.any(1)
        new_alive = alive & ~(prunable & ~has_out) & ~(is_feat & ~has_in)
        if torch.equal(new_alive, alive):
            break
        alive = new_alive
        edge_mask[~alive] = False
        edge_mask[:, ~alive] = False
    node_mask[keep[~alive]] = False
    edge_mask = edge_mask[alive][:, alive]
    return PruneResult(node_mask, edge_mask, node_inf)


def graph_scores(A: torch.Tensor, logit_weights: torch.Tensor, err_slice: slice, emb_slice: slice) -> dict:
    """Replacement score: fraction of end-to-end influence from embeddings rather than errors.
    Completeness score: influence-weighted fraction of incoming (normalised) edge mass not from error nodes."""
    inf = influence(A, logit_weights)
    emb_inf = float(inf[emb_slice].sum())
    err_inf = float(inf[err_slice].sum())
    replacement = emb_inf / (emb_inf + err_inf) if emb_inf + err_inf > 0 else 1.0
    rs = row_sums(A)
    err_frac = torch.zeros(A.shape[0])
    for i in range(0, A.shape[0], CHUNK):
        err_frac[i : i + CHUNK] = A[i : i + CHUNK, err_slice].abs().sum(1) / rs[i : i + CHUNK]
    out_inf = inf + logit_weights
    completeness = float(((1 - err_frac) * out_inf).sum() / out_inf.sum())
    return {"replacement_score": replacement, "completeness_score": completeness}


def block_influence(blocks: list[torch.Tensor], row_sums_: torch.Tensor, row_col: torch.Tensor,
                    row_layer: torch.Tensor, weights: torch.Tensor, n_cols: int,
                    chunk_bytes: int = 64 * 2**20) -> torch.Tensor:
    """Influence of every source column from a rectangular matrix: rows only for some targets, stacked as
    `blocks` ([k_i, n_cols] each; row r's node is column `row_col[r]`, or -1 for a logit, which is no source).
    Columns without a row are leaves: influence reaches them but does not flow on.

    Same quantity as `influence` on the square matrix with zero rows elsewhere, computed without it: the outflow
    x_r = w_r + influence(row r's node) solves x = w + x M on the rows alone (M[r, r'] = Â[r, col(r')]); the graph
    is layered (sources sit at lower layers than their targets), so ordering rows by layer makes M triangular and
    that is one triangular solve. Then one pass over the rows: influence = x Â."""
    n = len(row_col)
    is_src = row_col >= 0
    src_rows = torch.nonzero(is_src).squeeze(1)
    M = torch.zeros(n, n)
    r0 = 0
    for blk in blocks:
        k = blk.shape[0]
        M[r0 : r0 + k, src_rows] = blk[:, row_col[src_rows]].abs() / row_sums_[r0 : r0 + k, None]
        r0 += k
    order = torch.argsort(row_layer, descending=True, stable=True)  # targets before their sources
    Mo = M[order][:, order]
    del M
    # x (I - Mo) = w  <=>  (I - Mo)^T x^T = w^T, lower triangular since Mo is strictly upper triangular
    I_M = torch.eye(n) - Mo
    del Mo
    xo = torch.linalg.solve_triangular(I_M.T, weights[order][:, None], upper=False).squeeze(1)
    x = torch.empty(n)
    x[order] = xo
    out = torch.zeros(n_cols)
    xs = x / row_sums_
    r0 = 0
    for blk in blocks:
        k = blk.shape[0]
        step = max(1, chunk_bytes // max(1, 4 * n_cols))
        for i in range(0, k, step):
            j = min(k, i + step)
            if xs[r0 + i : r0 + j].any():
                out += xs[r0 + i : r0 + j] @ blk[i:j].abs()
        r0 += k
    return out
