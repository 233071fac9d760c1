"""The instrumented forward pass: the hook points of docs/design.md on any adapter's model, read or replaced.

    with Hooks(model) as h:
        h.on("mlp_out", lambda y: ..., layer=3)     # return None to read, a tensor to replace the output
        logits = forward(model, tokens)

Points: `resid_pre0` (input of block 0), and per layer `resid_mid` (the MLP pre-norm's input), `mlp_in` (its output),
`mlp_out` (what the MLP adds to the residual), `resid_post` (the block's output) and `attn` (the attention module's
raw output: (output, pattern, ...)); `logits` (the unembedding's output). Only `mlp_in` and `mlp_out` can be
replaced. Every hook is removed when the context exits, also on error.

The spliced pass of perturb/ needs the modules themselves (it freezes norms and replaces whole forwards):
`module(adapter, name, layer)` resolves the names of `MODULES`, which the adapters define per family, and
`Hooks.hook` / `Hooks.swap` attach a raw forward hook or a replacement forward under the same removal guarantee.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import ModelError

POINTS = ("resid_pre0", "resid_mid", "mlp_in", "mlp_out", "resid_post", "attn", "logits")

# the modules a spliced pass hooks; each adapter says which module of its family plays each role (models/adapters.py)
MODULES = ("block", "attn_norm", "attn", "attn_post_norm", "mlp_norm", "mlp", "mlp_out", "final_norm", "lm_head")


def module(adapter, name: str, layer: int | None = None) -> nn.Module | None:
    """The module `name` (one of MODULES) of `adapter`'s model, at `layer` for per-layer modules."""
    if name not in MODULES:
        raise ValueError(f"unknown module {name!r}: one of {', '.join(MODULES)}")
    try:
        return adapter.module(name, layer)
    except NotImplementedError:
        raise ModelError(f"the {adapter.family!r} adapter does not name its {name!r} module") from None


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
        self.model, self.ad, self.handles, self.swapped = model, model.adapter, [], []

    def on(self, point: str, fn: Callable, layer: int | None = None) -> Hooks:
        ad = self.ad
        if point == "resid_pre0":
            h = module(ad, "block", 0).register_forward_pre_hook(
                lambda m, a, kw: _read(fn, a[0] if a else kw["hidden_states"]), with_kwargs=True)
        elif point == "logits":
            h = self.model.model.get_output_embeddings().register_forward_hook(lambda m, a, o: _read(fn, o))
        elif layer is None or not 0 <= layer < ad.n_layers:
            raise ValueError(f"hook point {point!r} needs a layer in [0, {ad.n_layers})")
        elif point == "resid_mid":
            h = module(ad, "mlp_norm", layer).register_forward_pre_hook(lambda m, a: _read(fn, a[0]))
        elif point == "mlp_in":
            h = module(ad, "mlp_norm", layer).register_forward_hook(lambda m, a, o: _replace(o, fn(first(o))))
        elif point == "mlp_out":
            h = module(ad, "mlp_out", layer).register_forward_hook(lambda m, a, o: _replace(o, fn(first(o))))
        elif point == "resid_post":
            h = module(ad, "block", layer).register_forward_hook(lambda m, a, o: _read(fn, first(o)))
        elif point == "attn":
            h = module(ad, "attn", layer).register_forward_hook(lambda m, a, o: _read(fn, o))
        else:
            raise ValueError(f"unknown hook point {point!r}: one of {', '.join(POINTS)}")
        self.handles.append(h)
        return self

    def hook(self, name: str, fn: Callable, layer: int | None = None) -> Hooks:
        """A raw forward hook `fn(module, args, output)` on module `name` (see `module`)."""
        self.handles.append(module(self.ad, name, layer).register_forward_hook(fn))
        return self

    def swap(self, name: str, fn: Callable, layer: int | None = None) -> Hooks:
        """Replace the forward of module `name` by `fn` (same arguments) until the hooks are removed: for outputs
        that would be discarded anyway, so they are never computed."""
        mod = module(self.ad, name, layer)
        self.swapped.append((mod, mod.__dict__.get("forward")))
        mod.forward = fn
        return self

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for mod, prev in reversed(self.swapped):
            if prev is None:
                del mod.forward
            else:
                mod.forward = prev
        self.swapped.clear()

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
