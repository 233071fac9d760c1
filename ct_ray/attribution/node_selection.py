"""Feature-node selection by influence (as circuit-tracer does), with memory bounded by the kept nodes.

Rows are computed for the logits, then repeatedly for the most influential features not yet visited, ranked by
their influence on the logits through the rows computed so far. Only the kept targets' rows exist ([kept + logits,
all sources], stored as the blocks they were computed in); features without a row are leaves. The kept graph is
then assembled from those rows, block by block, freeing each block as it is copied.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .prune import block_influence
from .rows import RowEngine

RowFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (t_layer, t_pos, vecs) -> [B, S] rows


class SelectedRows:
    def __init__(self, logit_rows: torch.Tensor, logit_p: torch.Tensor, L: int):
        nL = len(logit_p)
        self.blocks = [logit_rows]
        self.row_col = torch.full((nL,), -1, dtype=torch.long)
        self.row_layer = torch.full((nL,), L, dtype=torch.long)
        self.row_sums = logit_rows.abs().sum(1).clamp_min(1e-10)
        self.weights = logit_p.float().clone()
        self.nL = nL

    def add(self, rows: torch.Tensor, cols: torch.Tensor, layers: torch.Tensor) -> None:
        self.blocks.append(rows)
        self.row_col = torch.cat([self.row_col, cols])
        self.row_layer = torch.cat([self.row_layer, layers])
        self.row_sums = torch.cat([self.row_sums, rows.abs().sum(1).clamp_min(1e-10)])
        self.weights = torch.cat([self.weights, torch.zeros(len(cols))])

    def influence(self, n_cols: int) -> torch.Tensor:
        return block_influence(self.blocks, self.row_sums, self.row_col, self.row_layer, self.weights, n_cols)


def select(engine: RowEngine, readout, f_layer, f_pos, lvec, logit_p, max_feature_nodes: int, batch_size: int,
           bsz: int, verbose: bool = False, rows: RowFn | None = None) -> tuple[torch.Tensor, SelectedRows]:
    """Visit `max_feature_nodes` features, `batch_size` per influence update (computed `bsz` at a time).
    Returns the visited features (sorted) and their rows. `readout(sel)` gives the targets' read-out vectors;
    `rows` computes a batch's rows (default `engine.rows`)."""
    rows = engine.rows if rows is None else rows
    rep = engine.rep
    L, P, n = rep.L, rep.P, engine.nF
    nL = len(logit_p)
    st = SelectedRows(rows(torch.full((nL,), L), torch.full((nL,), P - 1), lvec), logit_p, L)
    visited = torch.zeros(n, dtype=torch.bool)
    n_vis = 0
    bar = tqdm(total=max_feature_nodes, desc="attribution", unit="feature", disable=not verbose)
    while n_vis < max_feature_nodes:
        inf = st.influence(engine.S)[:n]
        inf[visited] = -1
        k = min(batch_size, max_feature_nodes - n_vis)
        pick = torch.topk(inf, k).indices
        # within an update, deepest targets first: each backward pass stops at its batch's top layer/position
        pick = pick[torch.argsort(f_layer[pick] * P + f_pos[pick], descending=True, stable=True)]
        for i in range(0, k, bsz):
            sel = pick[i : i + bsz]
            st.add(rows(f_layer[sel], f_pos[sel], readout(sel)), sel, f_layer[sel])
        visited[pick] = True
        n_vis += k
        bar.update(k)
    bar.close()
    return torch.nonzero(visited).squeeze(1), st


def assemble(st: SelectedRows, selected: torch.Tensor, n_active: int, n_other: int) -> torch.Tensor:
    """The kept nodes' square adjacency (selected features, the `n_other` error and embedding nodes, logits) from
    the rows; consumes `st.blocks` so that each block is freed once copied."""
    K, nL = len(selected), st.nL
    N = K + n_other + nL
    rank = torch.full((n_active,), -1, dtype=torch.long)
    rank[selected] = torch.arange(K)
    A = torch.zeros(N, N)
    r0 = 0
    while st.blocks:
        blk = st.blocks.pop(0)
        k = blk.shape[0]
        cols = st.row_col[r0 : r0 + k]
        tgt = torch.where(cols >= 0, rank[cols.clamp_min(0)], N - nL + torch.arange(r0, r0 + k))
        A[tgt, :K] = blk[:, selected]
        A[tgt, K : K + n_other] = blk[:, n_active:]
        r0 += k
        del blk
    return A
