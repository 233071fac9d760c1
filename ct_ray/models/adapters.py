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


@dataclass
class QKWeights:
    """What a layer's attention scores are made of: score = scaling * <rope(q_norm(W_Q x + b_Q)), rope(k_norm(...))>,
    then Gemma 2's softcap. q/k norms act per head on d_head (Qwen3, Gemma 3); None elsewhere."""

    W_Q: torch.Tensor  # [n_heads * d_head, d_model]
    b_Q: torch.Tensor | None
    W_K: torch.Tensor  # [n_kv * d_head, d_model]
    b_K: torch.Tensor | None
    q_norm: Norm | None
    k_norm: Norm | None
    scaling: float
    softcap: float | None
    rope: bool  # rotary position embeddings (the cos/sin come from the model's forward)


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
    """Base adapter. A family names its modules (`BLOCKS`, `FINAL_NORM`, `MODULES`), its norm kind (`_norm`) and its
    OV weights (`_ov`); everything else derives from those."""

    family = "base"
    BLOCKS = ""  # attribute path of the block list from the HF model
    FINAL_NORM = ""  # attribute path of the final norm
    # role -> attribute path inside a block; the roles are models/hooks.py MODULES:
    #   attn (returns (output, pattern)), attn_norm (output = attention input), attn_post_norm (Gemma: normalises the
    #   attention output before the residual add; absent elsewhere), mlp_norm (input = resid_mid, output = mlp_in),
    #   mlp (the MLP proper), mlp_out (output = mlp_out, exactly what is added to the residual)
    MODULES: dict[str, str] = {}

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
        if not self.BLOCKS:
            raise NotImplementedError
        return list(self.model.get_submodule(self.BLOCKS))

    def module(self, role: str, l: int | None = None) -> nn.Module | None:
        """The module playing `role` in block `l` ("final_norm" and "lm_head" need no layer); None for a role the
        family does not have (attn_post_norm outside Gemma)."""
        if role == "block":
            return self.blocks()[l]
        if role == "final_norm":
            if not self.FINAL_NORM:
                raise NotImplementedError
            return self.model.get_submodule(self.FINAL_NORM)
        if role == "lm_head":
            return self.model.get_output_embeddings()
        if role == "attn_post_norm" and role not in self.MODULES:
            return None
        if role not in self.MODULES:
            raise NotImplementedError
        return self.blocks()[l].get_submodule(self.MODULES[role])

    # --- linear paths -----------------------------------------------------------------------------
    def layer_weights(self) -> list[LayerWeights]:
        if self._weights is None:
            self._weights = [self._layer(l) for l in range(self.n_layers)]
        return self._weights

    def _layer(self, l: int) -> LayerWeights:
        post = self.module("attn_post_norm", l)
        W_V, b_V, W_O, b_O = self._ov(self.blocks()[l])
        return LayerWeights(self._norm(self.module("attn_norm", l)), None if post is None else self._norm(post),
                            self._norm(self.module("mlp_norm", l)), W_V, b_V, W_O, b_O)

    def _norm(self, mod: nn.Module) -> Norm:
        raise NotImplementedError

    def _ov(self, block: nn.Module) -> tuple:
        """(W_V, b_V, W_O, b_O) of a block's attention."""
        raise NotImplementedError

    def qk_weights(self, l: int) -> QKWeights:
        attn = self.module("attn", l)
        W_Q, b_Q, W_K, b_K = self._qk(attn)
        qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        return QKWeights(W_Q, b_Q, W_K, b_K, None if qn is None else self._norm(qn), None if kn is None else self._norm(kn),
                         float(attn.scaling), getattr(attn, "attn_logit_softcapping", None), self.family != "gpt2")

    def _qk(self, attn: nn.Module) -> tuple:
        """(W_Q, b_Q, W_K, b_K) of a block's attention."""
        return (*_lin(attn.q_proj), *_lin(attn.k_proj))

    def final_norm(self) -> Norm:
        return self._norm(self.module("final_norm"))

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
    BLOCKS, FINAL_NORM = "model.layers", "model.norm"
    MODULES = {"attn": "self_attn", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
               "mlp": "mlp", "mlp_out": "mlp"}

    def _norm(self, mod):
        return _rms(mod)

    def _ov(self, b):
        return (*_lin(b.self_attn.v_proj), *_lin(b.self_attn.o_proj))


class GemmaAdapter(LlamaAdapter):
    """Gemma 2 / Gemma 3: (1 + w) RMSNorms, post-attention and post-MLP norms, scaled embeddings."""

    family = "gemma"
    MODULES = {"attn": "self_attn", "attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
               "mlp_norm": "pre_feedforward_layernorm", "mlp": "mlp", "mlp_out": "post_feedforward_layernorm"}

    def _norm(self, mod):
        return _rms(mod, True)


class GPT2Adapter(Adapter):
    """GPT-2: LayerNorm with bias, fused Conv1D qkv, learned positions (part of `resid_pre[0]`), tied unembedding."""

    family = "gpt2"
    BLOCKS, FINAL_NORM = "transformer.h", "transformer.ln_f"
    MODULES = {"attn": "attn", "attn_norm": "ln_1", "mlp_norm": "ln_2", "mlp": "mlp", "mlp_out": "mlp"}

    def __init__(self, model):
        super().__init__(model)
        self.n_kv_heads = self.n_heads

    def _norm(self, mod):
        return _ln(mod)

    def _ov(self, b):
        d = self.d_model
        # Conv1D stores [in, out]: y = x @ W + b
        W = b.attn.c_attn.weight.detach()[:, 2 * d : 3 * d].T.contiguous()
        bias = b.attn.c_attn.bias.detach()[2 * d : 3 * d]
        return W, bias, b.attn.c_proj.weight.detach().T.contiguous(), b.attn.c_proj.bias.detach()

    def _qk(self, attn):
        d, W, b = self.d_model, attn.c_attn.weight.detach(), attn.c_attn.bias.detach()
        return W[:, :d].T.contiguous(), b[:d], W[:, d : 2 * d].T.contiguous(), b[d : 2 * d]


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
