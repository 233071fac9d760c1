"""Adjacency rows of a batch of targets: the direct effect of every source on each target.

Source columns: feature nodes (sorted by layer, position, index), error nodes (layer-major), token embeddings.
Feature sources are handled per source layer with a few batched matmuls over positions, instead of one small
matmul per (layer, position): fewer, larger ops keep the OpenMP threads busy and make the speed robust when
another process shares the cores. Positions are grouped by their number of active features (each group padded to
its largest count, so padding wastes at most a third) into chunks of bounded size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..clt.lazy import decoder_rows
from .replacement import Replacement


@dataclass
class _Chunk:
    """Positions of one layer with similar feature counts, their features padded to [g, C]."""

    pos: torch.Tensor  # [g] positions
    idx_pad: torch.Tensor  # [g, C] feature indices, padded with 0 (padded slots are computed, never read)
    act: torch.Tensor  # [n] activation of each feature (scales its column after the matmul)
    group: torch.Tensor  # [n] the group (row of the grid) of each feature
    slot: torch.Tensor  # [n] its column in the grid
    cols: torch.Tensor  # [n] its source column

    @property
    def width(self) -> int:
        return self.idx_pad.shape[1]


class RowEngine:
    def __init__(self, rep: Replacement, f_layer, f_pos, f_idx, f_act, *, chunk_bytes: int):
        self.rep = rep
        L, P, d = rep.L, rep.P, rep.d
        self.nF = len(f_layer)
        self.S = self.nF + L * P + P  # source columns
        self.emb0 = self.nF + L * P
        self.spans = rep.clt.spans
        self.chunks: list[list[_Chunk]] = []
        for l in range(L):
            m = torch.nonzero(f_layer == l).squeeze(1)
            self.chunks.append(self._chunks(m, f_pos[m], f_idx[m], f_act[m], chunk_bytes // (4 * self.spans[l] * d)))
        self.cache: dict[tuple[int, int], torch.Tensor] = {}

    @staticmethod
    def _chunks(cols, p, i, a, max_slots: int) -> list[_Chunk]:
        if len(cols) == 0:
            return []
        pos, counts = torch.unique_consecutive(p, return_counts=True)
        start = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
        order = torch.argsort(counts, descending=True, stable=True).tolist()
        cl = counts.tolist()
        out, k = [], 0
        while k < len(order):
            C = cl[order[k]]
            j = k + 1
            while j < len(order) and (j - k + 1) * C <= max(max_slots, C) and 4 * cl[order[j]] >= 3 * C:
                j += 1
            members = torch.tensor(sorted(order[k:j]))
            cnt = counts[members]
            group = torch.repeat_interleave(torch.arange(len(members)), cnt)
            first = torch.repeat_interleave(start[members], cnt)
            feat = first + torch.arange(len(group)) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
            slot = feat - first
            idx_pad = torch.zeros(len(members), C, dtype=torch.long)
            idx_pad[group, slot] = i[feat]
            out.append(_Chunk(pos[members], idx_pad, a[feat].float(), group, slot, cols[feat]))
            k = j
        return out

    def decoder_bytes(self) -> int:
        """Bytes of all padded decoder rows."""
        d = self.rep.d
        return sum(c.idx_pad.numel() * self.spans[l] * d * 4 for l, cs in enumerate(self.chunks) for c in cs)

    def fill_cache(self, cache_bytes: int, map_fn=None) -> int:
        """Keep the padded decoder rows if they fit in `cache_bytes` (else they are gathered per batch); returns
        the bytes kept. `map_fn(fn, [(layer,), ...])`: how the layers are run (default: one after the other)."""
        if not 0 < self.decoder_bytes() <= cache_bytes:
            return 0

        def layer(l: int) -> None:
            for k, c in enumerate(self.chunks[l]):
                self.cache[l, k] = self._decoders(l, c.idx_pad)

        list((map_fn or (lambda fn, xs: [fn(*x) for x in xs]))(layer, [(l,) for l in range(len(self.chunks))]))
        return self.decoder_bytes()

    def _decoders(self, l: int, idx_pad: torch.Tensor) -> torch.Tensor:
        # unscaled: one gather, no second decoder-sized copy (activations scale the matmul's result instead)
        return decoder_rows(self.rep.clt, l, idx_pad).float().flatten(2)  # [g, C, span * d]

    def rows(self, t_layer: torch.Tensor, t_pos: torch.Tensor, vecs: torch.Tensor, pre: bool = False) -> torch.Tensor:
        """[B, S] rows of targets at (layer, position) with read-out vectors `vecs`; layer L means a logit. With
        `pre`, the vectors read resid_pre[layer] (the attention's input, before the layer's heads) instead."""
        rep = self.rep
        B, L = len(t_layer), rep.L
        P = int(t_pos.max()) + 1
        top = int(t_layer.max())
        b = torch.arange(B)
        logit = t_layer == L
        inject = {}
        for l in torch.unique(t_layer[~logit]).tolist():
            m = t_layer == l
            inject[l] = (b[m], t_pos[m], vecs[m])
        final = (b[logit], vecs[logit]) if logit.any() else None
        if pre:
            G_post, G_emb, err = rep.backward(top, {}, B, P, final, dots=rep.error, inject_pre=inject)
        else:
            G_post, G_emb, err = rep.backward(min(top, L - 1), inject, B, P, final, dots=rep.error)

        out = torch.zeros(B, self.S)
        for l in range(min(top, L)):  # only layers below the batch's top layer can reach it
            self._feature_cols(out, l, G_post, P)
        out[:, self.nF : self.emb0].view(B, L, rep.P)[:, :, :P] = err
        out[:, self.emb0 : self.emb0 + P] = (G_emb * rep.cache.resid_pre0[:P]).sum(-1)
        return out

    def _feature_cols(self, out: torch.Tensor, l: int, G_post: torch.Tensor, P: int) -> None:
        span, B = min(self.spans[l], G_post.shape[2] - l), out.shape[0]  # target layers above the batch's are zero
        for k, c in enumerate(self.chunks[l]):
            inside = c.pos < P  # positions of the batch's targets and before
            if not inside.any():
                continue
            D = self.cache.get((l, k))
            group, slot, cols, pos, act = c.group, c.slot, c.cols, c.pos, c.act
            if not inside.all():
                keep = torch.nonzero(inside).squeeze(1)
                fsel = inside[group]
                remap = torch.cumsum(inside, 0) - 1
                group, slot, cols, pos, act = remap[group[fsel]], slot[fsel], cols[fsel], pos[keep], act[fsel]
                D = D[keep] if D is not None else self._decoders(l, c.idx_pad[keep])
            elif D is None:
                D = self._decoders(l, c.idx_pad)
            Gl = G_post[pos, :, l : l + span].flatten(2)  # [g, B, span * d]
            res = torch.bmm(Gl, D[:, :, : Gl.shape[2]].transpose(1, 2))  # [g, B, C]
            out[:, cols] = res.transpose(0, 1).reshape(B, -1)[:, group * c.width + slot] * act
