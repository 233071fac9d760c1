"""Harvesting is a pure function of (model, token batch): the CLT's inputs and targets at every layer."""

from __future__ import annotations

import torch


@torch.no_grad()
def harvest_batch(model, tokens: torch.Tensor, read_point: str = "resid_mid") -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, T] -> (x [B, T, L, d] at `read_point` ('resid_mid' or 'mlp_in'), y [B, T, L, d] = mlp_out)."""
    ad = model.adapter
    L = ad.n_layers
    xs, ys = [None] * L, [None] * L
    handles = []
    for l in range(L):
        norm = ad.mlp_norm_module(l)
        if read_point == "resid_mid":
            handles.append(norm.register_forward_pre_hook(lambda m, a, l=l: xs.__setitem__(l, a[0])))
        else:
            handles.append(norm.register_forward_hook(lambda m, a, o, l=l: xs.__setitem__(l, o)))
        handles.append(ad.mlp_out_module(l).register_forward_hook(
            lambda m, a, o, l=l: ys.__setitem__(l, o[0] if isinstance(o, tuple) else o)))
    try:
        dev = next(model.model.parameters()).device
        # only the hidden states are needed: run the decoder stack, skip the unembedding
        backbone = model.model.get_decoder() if hasattr(model.model, "get_decoder") else model.model.base_model
        backbone(input_ids=tokens.to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
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
