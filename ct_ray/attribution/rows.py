"""Adjacency rows of a batch of targets: the direct effect of every source on each target.

Source columns: feature nodes (sorted by layer, position, index), error nodes (layer-major), token embeddings.
Feature sources are handled per source layer with one batched matmul over positions (features of a position padded
to the layer's largest count), instead of one small matmul per (layer, position): fewer, larger ops keep the
OpenMP threads busy and make the speed robust when another process shares the cores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .replacement import Replacement


@dataclass
class _Layer:
    """Feature sources of one CLT layer, grouped by position."""

    col0: int  # column of the layer's first feature
    pos: torch.Tensor  # [G] positions that have features (ascending)
    start: list  # [G + 1] first feature (within the layer) of each position group
    idx_pad: torch.Tensor  # [G, C] feature indices, padded with 0
    act_pad: torch.Tensor  # [G, C] activations, padded with 0 (padding contributes nothing)
    flat: torch.Tensor  # [n] slot of each feature in the flattened [G, C] grid
    contiguous: bool  # pos is a run of consecutive positions: slice instead of gather
    span: int

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
        self.chunk_bytes = chunk_bytes
        self.layers: list[_Layer | None] = []
        for l in range(L):
            m = torch.nonzero(f_layer == l).squeeze(1)
            if len(m) == 0:
                self.layers.append(None)
                continue
            p, i, a = f_pos[m], f_idx[m], f_act[m]
            pos, counts = torch.unique_consecutive(p, return_counts=True)
            start = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
            group = torch.repeat_interleave(torch.arange(len(pos)), counts)
            slot = torch.arange(len(m)) - start[group]
            C = int(counts.max())
            idx_pad = torch.zeros(len(pos), C, dtype=torch.long)
            act_pad = torch.zeros(len(pos), C)
            idx_pad[group, slot] = i
            act_pad[group, slot] = a.float()
            self.layers.append(_Layer(int(m[0]), pos, start.tolist(), idx_pad, act_pad, group * C + slot,
                                      int(pos[-1] - pos[0]) + 1 == len(pos), rep.clt.spans[l]))
        self.cache: dict[int, torch.Tensor] = {}

    def fill_cache(self, cache_bytes: int) -> int:
        """Keep the padded, activation-scaled decoders if they fit in `cache_bytes` (else they are gathered per
        batch); returns the bytes kept."""
        if not 0 < self.decoder_bytes() <= cache_bytes:
            return 0
        for l, ly in enumerate(self.layers):
            if ly is not None:
                self.cache[l] = self._decoders(l, 0, len(ly.pos))
        return self.decoder_bytes()

    def decoder_bytes(self) -> int:
        """Bytes of all padded, activation-scaled decoder rows."""
        d = self.rep.d
        return sum(len(ly.pos) * ly.width * ly.span * d * 4 for ly in self.layers if ly is not None)

    def _decoders(self, l: int, g0: int, g1: int) -> torch.Tensor:
        ly = self.layers[l]
        W = self.rep.clt.W_dec[l].detach()
        D = W[ly.idx_pad[g0:g1]].float() * ly.act_pad[g0:g1, :, None, None]  # [g, C, span, d]
        return D.flatten(2)

    def rows(self, t_layer: torch.Tensor, t_pos: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
        """[B, S] rows of targets at (layer, position) with read-out vectors `vecs`; layer L means a logit."""
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
        G_post, G_emb = rep.backward(min(top, L - 1), inject, B, P, final)

        out = torch.zeros(B, self.S)
        for l in range(min(top, L)):  # only layers below the batch's top layer can reach it
            if self.layers[l] is not None:
                self._feature_cols(out, l, G_post, P)
        err = torch.einsum("bpld,lpd->blp", G_post, rep.error[:, :P])
        out[:, self.nF : self.emb0].view(B, L, rep.P)[:, :, :P] = err
        out[:, self.emb0 : self.emb0 + P] = (G_emb * rep.cache.resid_pre0[:P]).sum(-1)
        return out

    def _feature_cols(self, out: torch.Tensor, l: int, G_post: torch.Tensor, P: int) -> None:
        ly, d, B = self.layers[l], self.rep.d, out.shape[0]
        G = int(torch.searchsorted(ly.pos, torch.tensor(P)))  # position groups inside the batch's positions
        if G == 0:
            return
        C, sd = ly.width, ly.span * d
        step = max(1, self.chunk_bytes // max(1, C * sd * 4)) if l not in self.cache else G
        for g0 in range(0, G, step):
            g1 = min(G, g0 + step)
            D = self.cache[l][g0:g1] if l in self.cache else self._decoders(l, g0, g1)  # [g, C, sd]
            if ly.contiguous:
                p0 = int(ly.pos[g0])
                Gl = G_post[:, p0 : p0 + g1 - g0, l : l + ly.span]
            else:
                Gl = G_post[:, ly.pos[g0:g1], l : l + ly.span]
            Gl = Gl.flatten(2).transpose(0, 1)  # [g, B, sd]
            res = torch.bmm(Gl, D.transpose(1, 2))  # [g, B, C]
            j0, j1 = ly.start[g0], ly.start[g1]
            res = res.transpose(0, 1).reshape(B, (g1 - g0) * C)
            out[:, ly.col0 + j0 : ly.col0 + j1] = res[:, ly.flat[j0:j1] - g0 * C]
