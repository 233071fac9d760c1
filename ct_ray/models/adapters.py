"""Family adapters: name the hook points of a HF causal LM and expose the weights of its linear paths.

The attribution code never calls a family's attention or MLP; it needs only
  * where to read `resid_pre[0]`, `resid_mid[l]`, `mlp_out[l]`, `resid_post[l]` and the attention pattern,
  * the OV weights, norms and unembedding, to run the frozen (linear) replacement model itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ModelError


@dataclass
class Norm:
    """RMSNorm or LayerNorm with its denominator frozen: a linear map (plus bias) of its input."""

    kind: str  # "rms" | "layer"
    weight: torch.Tensor  # effective gain (Gemma's 1 + w is folded in)
    bias: torch.Tensor | None
    eps: float

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """The denominator 1/sigma(x), [..., 1]; frozen at the real forward's values."""
        if self.kind == "rms":
            return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + self.eps)

    def apply(self, x: torch.Tensor, s: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        if self.kind == "layer":
            x = x - x.mean(-1, keepdim=True)
        y = x * s * self.weight
        if with_bias and self.bias is not None:
            y = y + self.bias
        return y

    def vjp(self, g: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Transpose of `apply` (without bias) at frozen scale `s`."""
        g = g * self.weight * s
        if self.kind == "layer":  # centering is linear and self-adjoint
            g = g - g.mean(-1, keepdim=True)
        return g


@dataclass
class LayerWeights:
    attn_norm: Norm
    attn_post_norm: Norm | None  # Gemma 2/3 normalise the attention output before the residual add
    mlp_norm: Norm  # the MLP's pre-norm (read point `mlp_in`)
    W_V: torch.Tensor  # [n_kv * d_head, d_model]
    b_V: torch.Tensor | None
    W_O: torch.Tensor  # [d_model, n_heads * d_head]
    b_O: torch.Tensor | None


def frozen_scales(layers: list[LayerWeights], final: Norm, attn_in, resid_mid, final_in, attn_out=None) -> tuple:
    """The normalisation denominators of one real forward pass, frozen (docs/design.md): per layer the attention
    pre-norm's (of `attn_in[l]`), the MLP pre-norm's (of `resid_mid[l]`) and Gemma's post-attention norm's (of the raw
    attention output, `attn_out(l, s_attn[l])`; None for families without it), then the final norm's (of `final_in`).
    The replacement model (attribution) and the spliced model (perturbation) both freeze exactly these."""
    L = len(layers)
    s_attn = [layers[l].attn_norm.scale(attn_in[l]) for l in range(L)]
    s_mlp = [layers[l].mlp_norm.scale(resid_mid[l]) for l in range(L)]
    s_post = None
    if layers[0].attn_post_norm is not None:
        s_post = [layers[l].attn_post_norm.scale(attn_out(l, s_attn[l])) for l in range(L)]
    return s_attn, s_mlp, s_post, final.scale(final_in)


class Adapter:
    """Base adapter. Subclasses set module paths and build `LayerWeights`."""

    family = "base"

    def __init__(self, model: nn.Module):
        self.model = model
        cfg = model.config
        self.cfg = cfg
        self.n_layers = cfg.num_hidden_layers
        self.d_model = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.d_head = getattr(cfg, "head_dim", None) or self.d_model // self.n_heads
        self.max_positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self._weights: list[LayerWeights] | None = None

    # --- hook points -------------------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def attn_module(self, l: int) -> nn.Module:
        raise NotImplementedError

    def mlp_norm_module(self, l: int) -> nn.Module:
        """Its input is `resid_mid[l]`."""
        raise NotImplementedError

    def mlp_out_module(self, l: int) -> nn.Module:
        """Its output is `mlp_out[l]` (exactly what is added to the residual)."""
        raise NotImplementedError

    # modules that interventions also replace (models/hooks.py MODULES)
    def attn_norm_module(self, l: int) -> nn.Module:
        """Its output is the attention's input."""
        raise NotImplementedError

    def attn_post_norm_module(self, l: int) -> nn.Module | None:
        """Normalises the attention output before the residual add (Gemma); None where there is none."""
        return None

    def mlp_module(self, l: int) -> nn.Module:
        """The MLP proper (its output is replaced in a spliced pass)."""
        return self.blocks()[l].mlp

    def final_norm_module(self) -> nn.Module:
        raise NotImplementedError

    # --- linear paths -----------------------------------------------------------------------------
    def layer_weights(self) -> list[LayerWeights]:
        if self._weights is None:
            self._weights = [self._layer(l) for l in range(self.n_layers)]
        return self._weights

    def _layer(self, l: int) -> LayerWeights:
        raise NotImplementedError

    def final_norm(self) -> Norm:
        raise NotImplementedError

    def unembed(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = self.model.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)

    @property
    def logit_softcap(self) -> float | None:
        return getattr(self.cfg, "final_logit_softcapping", None)

    def vocab_size(self) -> int:
        return self.unembed()[0].shape[0]


def _rms(mod: nn.Module, plus_one: bool = False) -> Norm:
    w = mod.weight.detach()
    if plus_one:
        w = 1.0 + w.float()
    eps = getattr(mod, "variance_epsilon", None) or mod.eps
    return Norm("rms", w, None, float(eps))


def _ln(mod: nn.LayerNorm) -> Norm:
    return Norm("layer", mod.weight.detach(), mod.bias.detach() if mod.bias is not None else None, float(mod.eps))


def _lin(mod: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    return mod.weight.detach(), (mod.bias.detach() if mod.bias is not None else None)


class LlamaAdapter(Adapter):
    """Llama, SmolLM2, Mistral, Qwen2, Qwen3 (q/k norms only touch the frozen QK path)."""

    family = "llama"

    def blocks(self):
        return list(self.model.model.layers)

    def attn_module(self, l):
        return self.blocks()[l].self_attn

    def mlp_norm_module(self, l):
        return self.blocks()[l].post_attention_layernorm

    def mlp_out_module(self, l):
        return self.blocks()[l].mlp

    def _layer(self, l):
        b = self.blocks()[l]
        W_V, b_V = _lin(b.self_attn.v_proj)
        W_O, b_O = _lin(b.self_attn.o_proj)
        return LayerWeights(_rms(b.input_layernorm), None, _rms(b.post_attention_layernorm), W_V, b_V, W_O, b_O)

    def final_norm(self):
        return _rms(self.model.model.norm)

    def attn_norm_module(self, l):
        return self.blocks()[l].input_layernorm

    def final_norm_module(self):
        return self.model.model.norm


class GemmaAdapter(LlamaAdapter):
    """Gemma 2 / Gemma 3: (1 + w) RMSNorms, post-attention and post-MLP norms, scaled embeddings."""

    family = "gemma"

    def mlp_norm_module(self, l):
        return self.blocks()[l].pre_feedforward_layernorm

    def mlp_out_module(self, l):
        return self.blocks()[l].post_feedforward_layernorm

    def _layer(self, l):
        b = self.blocks()[l]
        W_V, b_V = _lin(b.self_attn.v_proj)
        W_O, b_O = _lin(b.self_attn.o_proj)
        return LayerWeights(
            _rms(b.input_layernorm, True),
            _rms(b.post_attention_layernorm, True),
            _rms(b.pre_feedforward_layernorm, True),
            W_V, b_V, W_O, b_O,
        )

    def final_norm(self):
        return _rms(self.model.model.norm, True)

    def attn_post_norm_module(self, l):
        return self.blocks()[l].post_attention_layernorm


class GPT2Adapter(Adapter):
    """GPT-2: LayerNorm with bias, fused Conv1D qkv, learned positions (part of `resid_pre[0]`), tied unembedding."""

    family = "gpt2"

    def __init__(self, model):
        super().__init__(model)
        self.n_kv_heads = self.n_heads

    def blocks(self):
        return list(self.model.transformer.h)

    def attn_module(self, l):
        return self.blocks()[l].attn

    def mlp_norm_module(self, l):
        return self.blocks()[l].ln_2

    def mlp_out_module(self, l):
        return self.blocks()[l].mlp

    def _layer(self, l):
        b = self.blocks()[l]
        d = self.d_model
        # Conv1D stores [in, out]: y = x @ W + b
        W = b.attn.c_attn.weight.detach()[:, 2 * d : 3 * d].T.contiguous()
        bias = b.attn.c_attn.bias.detach()[2 * d : 3 * d]
        W_O = b.attn.c_proj.weight.detach().T.contiguous()
        return LayerWeights(_ln(b.ln_1), None, _ln(b.ln_2), W, bias, W_O, b.attn.c_proj.bias.detach())

    def final_norm(self):
        return _ln(self.model.transformer.ln_f)

    def attn_norm_module(self, l):
        return self.blocks()[l].ln_1

    def final_norm_module(self):
        return self.model.transformer.ln_f


ADAPTERS: dict[str, type[Adapter]] = {
    "llama": LlamaAdapter,
    "mistral": LlamaAdapter,
    "qwen2": LlamaAdapter,
    "qwen3": LlamaAdapter,
    "gemma2": GemmaAdapter,
    "gemma3": GemmaAdapter,
    "gemma3_text": GemmaAdapter,
    "gpt2": GPT2Adapter,
}


def adapter_for(model: nn.Module) -> Adapter:
    mt = getattr(model.config, "model_type", None)
    if mt not in ADAPTERS:
        raise ModelError(
            f"unsupported architecture {mt!r}; supported model types: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[mt](model)
