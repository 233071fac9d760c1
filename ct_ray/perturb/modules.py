"""The modules a spliced forward pass hooks, per family.

Interventions replace more than attribution reads: the outputs of the attention pre-norm, the post-attention norm
(Gemma), the MLP itself and the final norm. The adapters (models/adapters.py) name all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ModelError


@dataclass
class SpliceModules:
    attn_norm: list[nn.Module]  # output = attention input
    attn: list[nn.Module]  # returns (output, pattern)
    attn_post_norm: list[nn.Module] | None  # Gemma: normalises the attention output before the residual add
    mlp_norm: list[nn.Module]  # input = resid_mid, output = mlp_in
    mlp: list[nn.Module]  # the MLP proper
    mlp_out: list[nn.Module]  # output = mlp_out (the MLP itself, or Gemma's post-MLP norm)
    final_norm: nn.Module
    lm_head: nn.Module


def splice_modules(adapter) -> SpliceModules:
    """The modules of `adapter`'s model that a spliced pass hooks (the adapters name them, per family)."""
    L = adapter.n_layers
    try:
        post = [adapter.attn_post_norm_module(l) for l in range(L)]
        return SpliceModules(
            attn_norm=[adapter.attn_norm_module(l) for l in range(L)],
            attn=[adapter.attn_module(l) for l in range(L)],
            attn_post_norm=post if any(m is not None for m in post) else None,
            mlp_norm=[adapter.mlp_norm_module(l) for l in range(L)],
            mlp=[adapter.mlp_module(l) for l in range(L)],
            mlp_out=[adapter.mlp_out_module(l) for l in range(L)],
            final_norm=adapter.final_norm_module(),
            lm_head=adapter.model.get_output_embeddings(),
        )
    except NotImplementedError:
        raise ModelError(f"interventions do not support the {adapter.family!r} adapter yet") from None
