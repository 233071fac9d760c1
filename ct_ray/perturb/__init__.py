"""Interventions on the real model with a CLT spliced in, and perturbation validation of attribution graphs.

    from ct_ray.perturb import Splice, Intervention, ablate, steer, intervene, generate, validate

    sp = Splice(model, clt, "The capital of France is")          # one clean pass
    res = sp.run([ablate(3, 17, positions=5), steer(3, 17, -1.0)], mode="constrained")   # one row each
    res.logit_delta(tokens), res.kl()
    v = validate(model, clt, graph.prune(), top_k=10)              # v.metrics, v.table (`perturbations` rows)
"""

from ..specs.intervention import Intervention, InterventionError, PositionRange, SpliceMode, ablate, steer
from .interventions import Generation, generate, intervene, node_intervention
from .predict import Predictor
from .splice import InterventionResult, Splice
from .supernodes import (
    CollapsedGraph,
    Supernode,
    SupernodeSet,
    collapse,
    suggest_supernodes,
    supernode_interventions,
)
from .sweep_rows import perturbation_rows
from .table import graph_id, perturbation_table
from .validate import DEFAULT_OPS, Validation, ValidationSpec, sign_agreement, spearman, validate

__all__ = [
    "Generation", "generate", "intervene", "node_intervention", "Predictor", "Intervention", "InterventionError",
    "PositionRange", "SpliceMode", "ablate", "steer", "InterventionResult", "Splice", "CollapsedGraph", "Supernode",
    "SupernodeSet", "collapse", "suggest_supernodes", "supernode_interventions", "graph_id",
    "perturbation_table", "perturbation_rows", "DEFAULT_OPS", "Validation", "ValidationSpec", "sign_agreement",
    "spearman", "validate",
]
