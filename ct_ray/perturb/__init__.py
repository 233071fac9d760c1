"""Interventions on the real model with a CLT spliced in, and perturbation validation of attribution graphs.

    from ct_ray.perturb import Splice, Intervention, ablate, steer, intervene, generate, validate

    sp = Splice(model, clt, "The capital of France is")          # one clean pass
    res = sp.run([ablate(3, 17, positions=5), steer(3, 17, -1.0)], mode="constrained")   # one row each
    res.logit_delta(tokens), res.kl()
    v = validate(model, clt, graph.prune(), top_k=10)              # v.metrics, v.table (`perturbations` rows)

The names are imported on first use (PEP 562): `ct_ray.perturb.cli` (whose parser `ct-ray --help` may build) and the
table rows load without torch until an intervention runs.
"""

import sys
import types

from ..exports import lazy_exports

_LAZY = {
    **dict.fromkeys(("Intervention", "InterventionError", "PositionRange", "SpliceMode", "ablate", "steer"),
                    "..specs.intervention"),
    **dict.fromkeys(("Generation", "generate", "intervene", "node_intervention"), ".interventions"),
    "Predictor": ".predict",
    **dict.fromkeys(("InterventionResult", "Splice"), ".splice"),
    **dict.fromkeys(("CollapsedGraph", "Supernode", "SupernodeSet", "collapse", "suggest_supernodes",
                     "supernode_interventions"), ".supernodes"),
    "perturbation_rows": ".sweep_rows",
    **dict.fromkeys(("graph_id", "perturbation_table"), ".table"),
    **dict.fromkeys(("DEFAULT_OPS", "Validation", "ValidationSpec", "sign_agreement", "spearman", "validate"),
                    ".validate"),
}

__all__ = [
    "Generation", "generate", "intervene", "node_intervention", "Predictor", "Intervention", "InterventionError",
    "PositionRange", "SpliceMode", "ablate", "steer", "InterventionResult", "Splice", "CollapsedGraph", "Supernode",
    "SupernodeSet", "collapse", "suggest_supernodes", "supernode_interventions", "graph_id",
    "perturbation_table", "perturbation_rows", "DEFAULT_OPS", "Validation", "ValidationSpec", "sign_agreement",
    "spearman", "validate",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)


class _Package(types.ModuleType):
    """`validate` names both a submodule and its function: importing the submodule must not rebind the package's
    `validate` (as the eager imports did, `ct_ray.perturb.validate` stays the function)."""

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, types.ModuleType):
            return  # the import system binding a submodule over a lazy name: the name resolves on first use
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
