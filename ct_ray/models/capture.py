"""One real forward pass with hooks: every hook point of docs/design.md plus the attention patterns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .hooks import Hooks, forward


@dataclass
class Cache:
    tokens: torch.Tensor  # [P]
    resid_pre0: torch.Tensor  # [P, d] input of block 0 (token + position embeddings, scaled where the family does)
    resid_mid: torch.Tensor  # [L, P, d]
    mlp_in: torch.Tensor  # [L, P, d] the MLP's input after its pre-norm
    mlp_out: torch.Tensor  # [L, P, d]
    resid_post: torch.Tensor  # [L, P, d]
    patterns: torch.Tensor  # [L, H, P, P]
    logits: torch.Tensor  # [P, V] pre-softcap logits (what the unembedding outputs)
    probs: torch.Tensor  # [V] the model's output distribution at the last position

    def read_point(self, l: int, hook: str = "resid_mid") -> torch.Tensor:
        return self.resid_mid[l] if hook == "resid_mid" else self.mlp_in[l]


@torch.no_grad()
def capture(model, tokens: torch.Tensor) -> Cache:
    """Run `model` (a LoadedModel) on `tokens` [P] and record the hook points of every layer."""
    L = model.adapter.n_layers
    store: dict = {"mid": [None] * L, "mlp_in": [None] * L, "out": [None] * L, "post": [None] * L, "pat": [None] * L}

    def keep(key, l=None):
        def fn(x):
            x = x[0].detach().clone()
            if l is None:
                store[key] = x
            else:
                store[key][l] = x
        return fn

    def pattern(l):
        def fn(out):
            if not isinstance(out, tuple) or out[1] is None:
                raise RuntimeError("attention module returned no pattern: the model must use eager attention")
            store["pat"][l] = out[1][0].detach().clone()
        return fn

    with Hooks(model) as h:
        h.on("resid_pre0", keep("pre0")).on("logits", keep("logits"))
        for l in range(L):
            h.on("resid_mid", keep("mid", l), l).on("mlp_in", keep("mlp_in", l), l).on("mlp_out", keep("out", l), l)
            h.on("resid_post", keep("post", l), l).on("attn", pattern(l), l)
        final = forward(model, tokens[None])[0, -1]
    return Cache(
        tokens=tokens.cpu(),
        resid_pre0=store["pre0"],
        resid_mid=torch.stack(store["mid"]),
        mlp_in=torch.stack(store["mlp_in"]),
        mlp_out=torch.stack(store["out"]),
        resid_post=torch.stack(store["post"]),
        patterns=torch.stack(store["pat"]),
        logits=store["logits"],
        probs=torch.softmax(final.float(), -1),
    )
