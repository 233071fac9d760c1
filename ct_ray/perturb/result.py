"""What an intervened run of the spliced model returns: logits, probabilities, watched activations, per row."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class InterventionResult:
    """Outputs of a batch of intervened passes (row b = the b-th intervention set).

    logits: pre-softcap logits at the last position [B, V] (what graph logit nodes are built from);
    out_logits: the model's output logits (post-softcap) at the last position [B, V], for probabilities and KL;
    acts / pre_acts: per layer [B, P, d_tc] feature activations / pre-activations (when requested);
    watched_acts / watched_pre: [B, n] activations / pre-activations of the `watch` (layer, pos, feature) triples;
    mlp_real: [B, L, P, d] the real MLP's output on the spliced model's MLP input (when requested);
    mlp_response: [B, L, P, d] change of the CLT reconstruction at each layer due to that layer's own features
      being recomputed (no intervention applied), i.e. the CLT's model of the MLP's response;
    mlp_real_at / mlp_response_at: [B, P, d] the same two at one layer per row (`record_mlp_at`; zero where none).
    """

    logits: torch.Tensor
    out_logits: torch.Tensor
    clean_logits: torch.Tensor
    clean_out_logits: torch.Tensor
    acts: list[torch.Tensor] | None = None
    pre_acts: list[torch.Tensor] | None = None
    watched_acts: torch.Tensor | None = None
    watched_pre: torch.Tensor | None = None
    mlp_real: torch.Tensor | None = None
    mlp_response: torch.Tensor | None = None
    all_logits: torch.Tensor | None = None
    mlp_real_at: torch.Tensor | None = None
    mlp_response_at: torch.Tensor | None = None

    @property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self.out_logits.float(), -1)

    @property
    def clean_probs(self) -> torch.Tensor:
        return torch.softmax(self.clean_out_logits.float(), -1)

    def logit_delta(self, tokens, demean: bool = True) -> torch.Tensor:
        """Change of the logits of `tokens` [B, n]; demeaned (logit - mean logit) like graph logit nodes."""
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        new, old = self.logits.double(), self.clean_logits.double()
        d = new[:, tokens] - old[tokens]
        if demean:
            d = d - (new.mean(-1, keepdim=True) - old.mean())
        return d.float()

    def kl(self) -> torch.Tensor:
        """KL(clean ‖ intervened) of the output distribution at the last position, per row [B]."""
        lp = torch.log_softmax(self.clean_out_logits.double(), -1)
        lq = torch.log_softmax(self.out_logits.double(), -1)
        return (lp.exp() * (lp - lq)).sum(-1).float()

    def take(self, idx: torch.Tensor) -> InterventionResult:
        """The rows `idx` (in that order)."""
        pick = lambda x: None if x is None else x[idx.to(x.device)]  # noqa: E731
        return InterventionResult(
            logits=pick(self.logits), out_logits=pick(self.out_logits), clean_logits=self.clean_logits,
            clean_out_logits=self.clean_out_logits,
            acts=None if self.acts is None else [pick(a) for a in self.acts],
            pre_acts=None if self.pre_acts is None else [pick(a) for a in self.pre_acts],
            watched_acts=pick(self.watched_acts), watched_pre=pick(self.watched_pre), mlp_real=pick(self.mlp_real),
            mlp_response=pick(self.mlp_response), all_logits=pick(self.all_logits),
            mlp_real_at=pick(self.mlp_real_at), mlp_response_at=pick(self.mlp_response_at),
        )

    @staticmethod
    def concat(parts: list[InterventionResult]) -> InterventionResult:
        if len(parts) == 1:
            return parts[0]

        def cat(name, dim=0):
            xs = [getattr(p, name) for p in parts]
            return None if xs[0] is None else torch.cat(xs, dim)

        def cat_layers(name):
            xs = [getattr(p, name) for p in parts]
            if xs[0] is None:
                return None
            return [torch.cat([x[l] for x in xs]) for l in range(len(xs[0]))]

        p0 = parts[0]
        return InterventionResult(
            logits=cat("logits"), out_logits=cat("out_logits"), clean_logits=p0.clean_logits,
            clean_out_logits=p0.clean_out_logits, acts=cat_layers("acts"), pre_acts=cat_layers("pre_acts"),
            watched_acts=cat("watched_acts"), watched_pre=cat("watched_pre"), mlp_real=cat("mlp_real"),
            mlp_response=cat("mlp_response"), all_logits=cat("all_logits"), mlp_real_at=cat("mlp_real_at"),
            mlp_response_at=cat("mlp_response_at"),
        )
