"""What a prompt's graph job does: attribution, pruning, and the perturbation plan run on each pruned graph."""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import Field, field_validator

from .base import Spec
from .intervention import Intervention

ATTENTION_FIELDS = ("heads", "heads_top", "qk", "qk_topk", "qk_top_fraction", "qk_keys", "qk_pairs")


class AttributionSpec(Spec):
    max_n_logits: int = Field(10, ge=1, le=1000)
    desired_logit_prob: float = Field(0.95, gt=0.0, le=1.0)
    batch_size: int = Field(128, ge=1)
    max_feature_nodes: int | None = Field(7500, ge=1, description="kept features (by influence); null: all active")
    # attention attribution of the pruned graph (docs/attribution.md, "Attention: head loadings and QK")
    heads: bool = Field(False, description="split each kept edge over the attention heads that carry it (edge_heads)")
    heads_top: int = Field(8, ge=0, le=100_000, description="heads listed per edge (the rest summed in one row); "
                                                            "0: every head")
    qk: bool = Field(False, description="decompose the attention scores of the top heads (qk_attributions); "
                                        "implies heads")
    qk_topk: int = Field(10, ge=1, le=1000, description="at most this many (layer, head, query position) triples")
    qk_top_fraction: float = Field(0.6, gt=0.0, le=1.0, description="the fewest triples (and key positions) "
                                                                    "covering this share of the head-loading mass")
    qk_keys: int = Field(3, ge=1, le=100, description="key positions explained per triple, at most")
    qk_pairs: int = Field(10, ge=1, le=1000, description="top pairwise and marginal contributors kept per score")

    def attribute_kwargs(self) -> dict:
        """The options of `attribute()` (the attention options act on the pruned graph afterwards)."""
        return self.model_dump(exclude=set(ATTENTION_FIELDS))

    def attention(self) -> dict | None:
        """The attention options when head loadings or QK are on, else None."""
        return self.model_dump(include=set(ATTENTION_FIELDS)) if (self.heads or self.qk) else None

    def identity(self) -> dict:
        """What identifies a sweep's attribution setup: the attention options only when they are on, so the setups
        of sweeps made before they existed keep their identity."""
        return self.model_dump() if (self.heads or self.qk) else self.attribute_kwargs()


class PruneSpec(Spec):
    node_threshold: float = Field(0.8, ge=0.0, le=1.0)
    edge_threshold: float = Field(0.98, ge=0.0, le=1.0)


PLUGINS_ENV = "CT_RAY_PLUGIN_MODULES"


def plugin_modules() -> list[str]:
    """Packages a spec's `perturbation.function` may name: ct_ray's own, plus those the operator (not the spec) lists."""
    extra = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    return ["ct_ray.perturb", "ct_ray.sweep.perturbation", *extra]


class PlannedIntervention(Intervention):
    """An intervention template of a sweep plan, and the splice mode (`SpliceMode.mode`) the sweep runs it in."""

    value: float = -1.0
    mode: Literal["constrained", "free"] = "constrained"

    @field_validator("features", mode="after")
    @classmethod
    def _template(cls, v):
        if v is not None:
            raise ValueError("a plan's interventions are templates (op, value, mode): the sweep picks the nodes")
        return v


class PerturbationPlan(Spec):
    """Per-graph perturbation validation: intervene on the `top_k` most influential feature nodes of the pruned
    graph (or on explicit `nodes`), with each of `interventions`. Empty plan (top_k 0 / no interventions): skipped."""

    top_k: int = Field(0, ge=0, le=10_000)
    interventions: list[PlannedIntervention] = Field(default_factory=list)
    nodes: list[int] | None = Field(None, description="explicit node indices (`node`); the sweep fills in the "
                                                      "top_k selection of each graph when absent")
    function: str = Field("ct_ray.perturb:perturbation_rows",
                          description="module:function(model, clt, graph, plan) -> rows of the perturbations table")

    @field_validator("function")
    @classmethod
    def _fn(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", v):
            raise ValueError("must be 'package.module:function'")
        mod = v.partition(":")[0]
        allowed = plugin_modules()
        if not any(mod == a or mod.startswith(a + ".") for a in allowed):
            # a spec is untrusted input: importing an arbitrary module runs its top-level code on every worker
            raise ValueError(f"module {mod!r} is not an allowed perturbation plugin (allowed: {', '.join(allowed)}; "
                             f"an operator adds packages with {PLUGINS_ENV}=pkg1,pkg2)")
        return v

    @property
    def empty(self) -> bool:
        return (self.top_k == 0 and not self.nodes) or not self.interventions

    def plan_hash(self) -> str:
        # a template's features/positions are always unset: left out, so plans hash as they did before templates
        return self.digest(8, exclude={"interventions": {"__all__": {"features", "positions"}}})
