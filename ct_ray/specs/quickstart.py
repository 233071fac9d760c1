"""The embedded end-to-end job (`make demo` / `ct-ray demo`)."""

from __future__ import annotations

from pydantic import Field, field_validator

from .base import Spec, load_yaml
from .sweep import SweepSpec
from .train import TrainSpec


class QuickstartSpec(Spec):
    train: TrainSpec | str = Field(description="a TrainSpec, or the path of a TrainSpec YAML")
    sweep: SweepSpec
    summary_sql: list[str] = Field(default_factory=list)

    @field_validator("train", mode="before")
    @classmethod
    def _train_file(cls, v):
        return load_yaml(v, TrainSpec) if isinstance(v, str) else v
