"""The instrumented forward pass: the hook points of docs/design.md on any adapter's model, read or replaced.

    with Hooks(model) as h:
        h.on("mlp_out", lambda y: ..., layer=3)     # return None to read, a tensor to replace the output
        logits = forward(model, tokens)

Points: `resid_pre0` (input of block 0), and per layer `resid_mid` (the MLP pre-norm's input), `mlp_in` (its output),
`mlp_out` (what the MLP adds to the residual), `resid_post` (the block's output) and `attn` (the attention module's
raw output: (output, pattern, ...)); `logits` (the unembedding's output). Only `mlp_in` and `mlp_out` can be
replaced. Every hook is removed when the context exits, also on error. The spliced pass of perturb/ hooks more
modules (norms it freezes); the adapters name those too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

POINTS = ("resid_pre0", "resid_mid", "mlp_in", "mlp_out", "resid_post", "attn", "logits")


def first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _read(fn, x) -> None:
    fn(x)  # whatever fn returns, a read-only point never changes the module's output


def _replace(out, new):
    if new is None:
        return None  # read only: the module's output stands
    return (new, *out[1:]) if isinstance(out, tuple) else new


class Hooks:
    """Forward hooks at named points of `model` (a LoadedModel), removed together."""

    def __init__(self, model):
        self.model, self.ad, self.handles = model, model.adapter, []

    def on(self, point: str, fn: Callable, layer: int | None = None) -> Hooks:
        ad = self.ad
        if point == "resid_pre0":
            h = ad.blocks()[0].register_forward_pre_hook(
                lambda m, a, kw: _read(fn, a[0] if a else kw["hidden_states"]), with_kwargs=True)
        elif point == "logits":
            h = self.model.model.get_output_embeddings().register_forward_hook(lambda m, a, o: _read(fn, o))
        elif layer is None or not 0 <= layer < ad.n_layers:
            raise ValueError(f"hook point {point!r} needs a layer in [0, {ad.n_layers})")
        elif point == "resid_mid":
            h = ad.mlp_norm_module(layer).register_forward_pre_hook(lambda m, a: _read(fn, a[0]))
        elif point == "mlp_in":
            h = ad.mlp_norm_module(layer).register_forward_hook(lambda m, a, o: _replace(o, fn(first(o))))
        elif point == "mlp_out":
            h = ad.mlp_out_module(layer).register_forward_hook(lambda m, a, o: _replace(o, fn(first(o))))
        elif point == "resid_post":
            h = ad.blocks()[layer].register_forward_hook(lambda m, a, o: _read(fn, first(o)))
        elif point == "attn":
            h = ad.attn_module(layer).register_forward_hook(lambda m, a, o: _read(fn, o))
        else:
            raise ValueError(f"unknown hook point {point!r}: one of {', '.join(POINTS)}")
        self.handles.append(h)
        return self

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def forward(model, tokens: torch.Tensor, logits: bool = True) -> torch.Tensor | None:
    """Run `model` on `tokens` [B, T] (no KV cache). `logits=False` runs the decoder stack only (no unembedding)."""
    dev = next(model.model.parameters()).device
    if logits:
        return model.model(tokens.to(dev), use_cache=False).logits
    backbone = model.model.get_decoder() if hasattr(model.model, "get_decoder") else model.model.base_model
    backbone(input_ids=tokens.to(dev), use_cache=False)
    return None
