"""What an attribution graph predicts an intervention will do.

Edges into a node are effects on its pre-activation (features) or demeaned logit (logits), and a feature's
outgoing edges are proportional to its activation. So per unit of activation a feature `s` moves target `t`
by `A[t, s] / a_s`, and changing its activation by `δa_s` moves `t` by `A[t, s] δa_s / a_s`:
  * direct: only that first step (what constrained mode measures when it covers every layer after `s`);
  * total: the change also travels through the graph's other feature nodes, each passing its pre-activation
    change on linearly (a JumpReLU feature that stays above threshold does), as free mode roughly measures.
"""

from __future__ import annotations

import torch

from ..specs.intervention import InterventionError


def per_unit_effects(graph) -> torch.Tensor:
    """M[t, s] = A[t, s] / a_s over feature sources s: [N, n_features]."""
    nF = graph.n_features
    a = graph.column("activation")[:nF].double()
    safe = torch.where(a != 0, a, torch.ones_like(a))
    return torch.where(a != 0, graph.adjacency[:, :nF].double() / safe, torch.zeros_like(a))


class Predictor:
    """Predicted change of every node's pre-activation / demeaned logit when the activations of some feature
    nodes change (together). Build once per graph; `predict` returns (direct [N], total [N]) with the intervened
    nodes themselves at 0."""

    def __init__(self, graph):
        self.nF = graph.n_features
        self.M = per_unit_effects(graph)
        # features are sorted by layer and edges only go up in layer, so I - M_ff is lower triangular
        self.I_M = torch.eye(self.nF, dtype=torch.float64) - self.M[: self.nF]

    def predict(self, nodes, delta) -> tuple[torch.Tensor, torch.Tensor]:
        nF = self.nF
        nodes_t = torch.as_tensor(nodes, dtype=torch.long).reshape(-1)
        if nodes_t.numel() == 0:
            raise InterventionError("no nodes to intervene on")
        if nodes_t.min() < 0 or nodes_t.max() >= nF:
            raise InterventionError("only feature nodes can be intervened on")
        d = torch.as_tensor(delta, dtype=torch.float64).reshape(-1)
        direct = self.M[:, nodes_t] @ d
        src = torch.zeros(nF, dtype=torch.float64)
        src[nodes_t] = d
        A = self.I_M
        if nodes_t.numel() > 1:
            # intervened features hold their new value: cut the edges into them (a single node has none that
            # matter, since nothing upstream of it changes)
            A = A.clone()
            A[nodes_t] = 0
            A[nodes_t, nodes_t] = 1
        x = torch.linalg.solve_triangular(A, src[:, None], upper=False)[:, 0]
        total = self.M @ x
        direct[nodes_t] = 0
        total[nodes_t] = 0
        return direct.float(), total.float()
