"""One real forward pass with hooks: every hook point of docs/design.md plus the attention patterns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


@torch.no_grad()
def capture(model, tokens: torch.Tensor) -> Cache:
    """Run `model` (a LoadedModel) on `tokens` [P] and record the hook points of every layer."""
    ad = model.adapter
    L = ad.n_layers
    store: dict = {"mid": [None] * L, "mlp_in": [None] * L, "out": [None] * L, "post": [None] * L, "pat": [None] * L}
    handles = []

    def pre0(mod, args, kwargs):
        store["pre0"] = (args[0] if args else kwargs["hidden_states"])[0].detach().clone()

    def head(mod, args, out):
        store["logits"] = out[0].detach().clone()

    handles.append(ad.blocks()[0].register_forward_pre_hook(pre0, with_kwargs=True))
    handles.append(model.model.get_output_embeddings().register_forward_hook(head))
    for l in range(L):
        def mid(mod, args, l=l):
            store["mid"][l] = args[0][0].detach().clone()

        def mlp_in(mod, args, out, l=l):
            store["mlp_in"][l] = _first(out)[0].detach().clone()

        def out_(mod, args, out, l=l):
            store["out"][l] = _first(out)[0].detach().clone()

        def post(mod, args, out, l=l):
            store["post"][l] = _first(out)[0].detach().clone()

        def pat(mod, args, out, l=l):
            if not isinstance(out, tuple) or out[1] is None:
                raise RuntimeError("attention module returned no pattern: the model must use eager attention")
            store["pat"][l] = out[1][0].detach().clone()

        handles += [
            ad.mlp_norm_module(l).register_forward_pre_hook(mid),
            ad.mlp_norm_module(l).register_forward_hook(mlp_in),
            ad.mlp_out_module(l).register_forward_hook(out_),
            ad.blocks()[l].register_forward_hook(post),
            ad.attn_module(l).register_forward_hook(pat),
        ]
    try:
        dev = next(model.model.parameters()).device
        final = model.model(tokens[None].to(dev), use_cache=False).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
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
