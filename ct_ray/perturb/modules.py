"""The modules a spliced forward pass hooks, per family.

The adapters name the hook points attribution reads; interventions must also *replace* the outputs of the
attention pre-norm, the post-attention norm (Gemma), the MLP itself and the final norm, so they are named here.
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
    blocks = adapter.blocks()
    L = adapter.n_layers
    if adapter.family == "gpt2":
        attn_norm = [b.ln_1 for b in blocks]
        final = adapter.model.transformer.ln_f
    elif adapter.family in ("llama", "gemma"):
        attn_norm = [b.input_layernorm for b in blocks]
        final = adapter.model.model.norm
    else:
        raise ModelError(f"interventions do not support the {adapter.family!r} adapter yet")
    post = [b.post_attention_layernorm for b in blocks] if adapter.family == "gemma" else None
    return SpliceModules(
        attn_norm=attn_norm,
        attn=[adapter.attn_module(l) for l in range(L)],
        attn_post_norm=post,
        mlp_norm=[adapter.mlp_norm_module(l) for l in range(L)],
        mlp=[b.mlp for b in blocks],
        mlp_out=[adapter.mlp_out_module(l) for l in range(L)],
        final_norm=final,
        lm_head=adapter.model.get_output_embeddings(),
    )
