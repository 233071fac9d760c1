"""Typed specs for user-facing inputs (CLI flags, YAML workflows). Unknown keys and bad values are rejected."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import CTRayError


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AttributionSpec(Spec):
    max_n_logits: int = Field(10, ge=1, le=1000)
    desired_logit_prob: float = Field(0.95, gt=0.0, le=1.0)
    batch_size: int = Field(128, ge=1)
    max_feature_nodes: int | None = Field(None, ge=1)


class PruneSpec(Spec):
    node_threshold: float = Field(0.8, ge=0.0, le=1.0)
    edge_threshold: float = Field(0.98, ge=0.0, le=1.0)


class QuickstartSpec(Spec):
    """The embedded end-to-end job (`make demo`)."""

    model: str = "smollm2-135m"
    clt: str | None = Field(None, description="CLT URL; a seeded random CLT is used when absent")
    random_clt_features: int = Field(512, ge=1)
    seed: int = 0
    prompts: list[str] = Field(min_length=1)
    out: str = "ct_ray_data/quickstart"
    attribution: AttributionSpec = AttributionSpec()
    pruning: PruneSpec = PruneSpec()


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "spec"
    return f"{loc}: {err['msg']}"


def parse(spec_cls: type[Spec], data: dict, where: str = "spec") -> Spec:
    try:
        return spec_cls.model_validate(data)
    except ValidationError as e:
        raise CTRayError(f"invalid {where}: {_first_error(e)}") from e


def load_yaml(path: str | Path, spec_cls: type[Spec]) -> Spec:
    p = Path(path)
    if not p.exists():
        raise CTRayError(f"spec file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise CTRayError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise CTRayError(f"{p} must hold a mapping of spec fields")
    return parse(spec_cls, data, where=str(p))
