"""The cross-layer transcoder (CLT): per-layer JumpReLU encoders, decoders into every later MLP output.

A per-layer transcoder is the case `span == 1` (each layer decodes only into its own MLP output).
"""

from __future__ import annotations

import torch
from torch import nn

from .lazy import decoder_rows

FEATURE_INPUT_HOOKS = ("resid_mid", "mlp_in")


class CrossLayerTranscoder(nn.Module):
    def __init__(
        self,
        n_layers: int,
        d_model: int,
        d_transcoder: int | list[int],
        span: int | None = None,
        activation: str = "jumprelu",
        feature_input_hook: str = "resid_mid",
        model_name: str = "",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if activation not in ("jumprelu", "relu"):
            raise ValueError(f"activation must be 'jumprelu' or 'relu', not {activation!r}")
        if feature_input_hook not in FEATURE_INPUT_HOOKS:
            raise ValueError(f"feature_input_hook must be one of {FEATURE_INPUT_HOOKS}")
        d_tc = [d_transcoder] * n_layers if isinstance(d_transcoder, int) else list(d_transcoder)
        self.n_layers, self.d_model, self.d_tc = n_layers, d_model, d_tc
        self.activation, self.feature_input_hook, self.model_name = activation, feature_input_hook, model_name
        self.spans = [min(span or n_layers, n_layers - l) for l in range(n_layers)]
        self.W_enc = nn.ParameterList([nn.Parameter(torch.zeros(d_tc[l], d_model, dtype=dtype)) for l in range(n_layers)])
        self.b_enc = nn.ParameterList([nn.Parameter(torch.zeros(d_tc[l], dtype=dtype)) for l in range(n_layers)])
        self.b_dec = nn.ParameterList([nn.Parameter(torch.zeros(d_model, dtype=dtype)) for l in range(n_layers)])
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.zeros(d_tc[l], self.spans[l], d_model, dtype=dtype)) for l in range(n_layers)]
        )
        # thresholds stay fp32 whatever the weights' dtype (docs/design.md)
        self.threshold = nn.ParameterList(
            [nn.Parameter(torch.zeros(d_tc[l], dtype=torch.float32)) for l in range(n_layers)]
        )

    # ------------------------------------------------------------------------------------------------
    @property
    def is_cross_layer(self) -> bool:
        return any(s > 1 for s in self.spans)

    @property
    def n_features(self) -> int:
        return sum(self.d_tc)

    def pre_activation(self, l: int, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_enc[l].T + self.b_enc[l]

    def act_fn(self, l: int, h: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return torch.relu(h)
        return h * (h > self.threshold[l].to(h.dtype))

    def encode(self, l: int, x: torch.Tensor) -> torch.Tensor:
        return self.act_fn(l, self.pre_activation(l, x))

    def decode(self, acts: list[torch.Tensor], active_only: bool = False) -> list[torch.Tensor]:
        """Reconstructions `ŷ[l] = Σ_{l' <= l} W_dec[l'→l] a[l'] + b_dec[l]` for every layer. `active_only` (for
        inference): read only the decoder rows of features active somewhere in `acts`, so the rest of a decoder is
        never touched (a lazily loaded one's rows come from its file: clt/lazy.py)."""
        out = [self.b_dec[l].expand(*acts[0].shape[:-1], self.d_model).clone() for l in range(self.n_layers)]
        for ls, a in enumerate(acts):
            if a is None:
                continue
            if active_only:
                on = torch.nonzero((a != 0).flatten(0, -2).any(0)).squeeze(1)
                if len(on) == 0:
                    continue
                a, W = a[..., on], decoder_rows(self, ls, on)
            else:
                W = self.W_dec[ls]
            # [..., d_tc] x [d_tc, span*d] -> [..., span, d]
            y = (a @ W.reshape(W.shape[0], -1)).unflatten(-1, (self.spans[ls], self.d_model))
            # unbind, not y[..., k, :]: in training, each indexing's backward zero-fills a y-sized gradient
            for k, yk in enumerate(y.unbind(-2)):
                out[ls + k] = out[ls + k] + yk
        return out

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.decode([self.encode(l, x) for l, x in enumerate(xs)])

    def check_model(self, n_layers: int, d_model: int, what: str = "model") -> None:
        from ..errors import CLTError

        if (self.n_layers, self.d_model) != (n_layers, d_model):
            raise CLTError(
                f"CLT shape mismatch: CLT has {self.n_layers} layers x d_model {self.d_model}, "
                f"{what} has {n_layers} layers x d_model {d_model}"
            )


def random_clt(model, n_features: int = 256, *, seed: int = 0, span: int | None = None,
               activation: str = "jumprelu", firing_rate: float = 0.01,
               feature_input_hook: str = "resid_mid", calibration_text: str | None = None) -> CrossLayerTranscoder:
    """A seeded random CLT for `model` (a `LoadedModel`), calibrated on one short text so that about
    `firing_rate` of the features fire per token and decoders write at the scale of the real MLP outputs."""
    from ..models.capture import capture

    ad = model.adapter
    g = torch.Generator().manual_seed(seed)
    clt = CrossLayerTranscoder(ad.n_layers, ad.d_model, n_features, span, activation, feature_input_hook, model.name)
    text = calibration_text or "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and"
    limit = ad.max_positions or 10**9
    ids = model.encode(text[: limit - 1])  # a character yields at least one token: fits the context
    cache = capture(model, ids)
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - firing_rate)).item()
    with torch.no_grad():
        for l in range(ad.n_layers):
            x = cache.read_point(l, feature_input_hook)[1:].cpu()  # skip the BOS attention sink; seeded on the CPU
            x_c = x - x.mean(0)
            w = torch.randn(n_features, ad.d_model, generator=g)
            w = w / (w @ x_c.T).std(-1, keepdim=True).clamp_min(1e-6)  # unit-variance pre-activations
            clt.W_enc[l].copy_(w)
            clt.b_enc[l].copy_(-(w @ x.mean(0)))
            clt.threshold[l].fill_(z)
            ymag = cache.mlp_out[l][1:].cpu().norm(dim=-1).mean().item()
            dec = torch.randn(n_features, clt.spans[l], ad.d_model, generator=g)
            clt.W_dec[l].copy_(dec * (ymag / (ad.d_model**0.5) / max(1.0, n_features * firing_rate) ** 0.5))
            clt.b_dec[l].copy_(0.1 * ymag / ad.d_model**0.5 * torch.randn(ad.d_model, generator=g))
    if activation == "relu":  # ReLU has no threshold: shift the bias instead
        with torch.no_grad():
            for l in range(ad.n_layers):
                clt.b_enc[l].sub_(z)
    clt.requires_grad_(False)
    return clt.to(next(model.model.parameters()).device)  # where the model lives
