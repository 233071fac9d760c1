"""Harvesting is a pure function of (model, token batch): the CLT's inputs and targets at every layer."""

from __future__ import annotations

import torch

from ..models.hooks import Hooks, forward


@torch.no_grad()
def harvest_batch(model, tokens: torch.Tensor, read_point: str = "resid_mid") -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, T] -> (x [B, T, L, d] at `read_point` ('resid_mid' or 'mlp_in'), y [B, T, L, d] = mlp_out)."""
    L = model.adapter.n_layers
    xs, ys = [None] * L, [None] * L
    with Hooks(model) as h:
        for l in range(L):
            h.on(read_point, lambda x, l=l: xs.__setitem__(l, x), layer=l)
            h.on("mlp_out", lambda y, l=l: ys.__setitem__(l, y), layer=l)
        forward(model, tokens, logits=False)  # only the hidden states are needed: skip the unembedding
    return torch.stack(xs, 2), torch.stack(ys, 2)


def training_mask(x: torch.Tensor, outlier_factor: float = 10.0) -> torch.Tensor:
    """[B, T] bool: positions to train on. Drops position 0 (the BOS attention sink) and tokens whose residual norm
    is an outlier (> outlier_factor x the batch median at any layer), as the massive-activation tokens would
    dominate the MSE."""
    norms = x.norm(dim=-1)  # [B, T, L]
    med = norms[:, 1:].flatten(0, 1).median(0).values  # [L]
    mask = (norms <= outlier_factor * med).all(-1)
    mask[:, 0] = False
    return mask
