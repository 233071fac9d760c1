"""The sweep spec: what `ct-ray sweep SPEC.yaml` runs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ..store.names import NAME_RULE, is_name
from .attribution import AttributionSpec, PerturbationPlan, PruneSpec
from .base import Spec, load_yaml, parse
from .common import CLTChoice, CommitSpec, PromptEntry, PromptFile, RandomCLTSpec, ResourceSpec, StorageSpec


class GraphJobSpec(Spec):
    """What is run on each prompt and where its rows go: shared by sweeps and the retraining canary."""

    attribution: AttributionSpec = AttributionSpec()
    pruning: PruneSpec = PruneSpec()
    perturbation: PerturbationPlan = PerturbationPlan()
    resources: ResourceSpec = ResourceSpec()
    storage: StorageSpec = StorageSpec()




class SweepSpec(CLTChoice, GraphJobSpec):
    sweep_id: str = Field(description="names the sweep's partition in every table")
    model: str = Field(min_length=1, description="built-in name, local HF directory or hub id")
    clt: str | None = Field(None, description="CLT directory URL (local or s3://)")
    random_clt: RandomCLTSpec | None = None
    prompts: list[str | PromptEntry] | PromptFile
    graph_rows: Literal["pruned", "full"] = Field("pruned", description="which graph's nodes/edges to store")
    retries: int = Field(2, ge=0, le=100, description="re-tries of a prompt whose worker died")
    commit: CommitSpec = CommitSpec()
    export_dir: str | None = Field(None, min_length=1, description="`ct-ray sweep` then writes the committed graphs as "
                                   "circuit-tracer / Neuronpedia graph JSON here (docs/export.md)")

    @field_validator("sweep_id")
    @classmethod
    def _sid(cls, v: str) -> str:
        if not is_name(v):
            raise ValueError(f"must be {NAME_RULE}")
        return v

    @field_validator("prompts")
    @classmethod
    def _nonempty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("give at least one prompt")
        return v

    def params(self) -> dict:
        return {"attribution": self.attribution.identity(), "pruning": self.pruning.model_dump(),
                "graph_rows": self.graph_rows}


def load_sweep_spec(path: str) -> SweepSpec:
    return load_yaml(path, SweepSpec)


def parse_sweep_spec(data: dict, where: str = "sweep spec") -> SweepSpec:
    return parse(SweepSpec, data, where)
