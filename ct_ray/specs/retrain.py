"""Nightly CLT retraining (`ct-ray retrain`): the training, the fixed evaluation set, the canary, the margins."""

from __future__ import annotations

import hashlib
import json

from pydantic import Field, field_validator

from .base import Spec, load_yaml
from .common import PromptEntry
from .sweep import GraphJobSpec
from .train import TrainSpec


class EvalSetSpec(Spec):
    """The fixed held-out evaluation text: keep it apart from the training corpus and never change it in place
    (its hash keys the cached results)."""

    corpus: list[str] = Field(min_length=1, description="built-in names or fsspec URLs")
    text_column: str = "text"
    context_len: int = Field(64, ge=2, le=8192)
    n_contexts: int = Field(32, ge=1)


class CanarySpec(GraphJobSpec):
    """Fixed prompts: scored for every candidate, then swept (tables in `storage`) with each new production CLT."""

    prompts: list[str | PromptEntry] = Field(min_length=1)
    sweep_prefix: str = Field("canary", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,100}$")


class MarginsSpec(Spec):
    """Least improvement of the candidate over production for promotion, per metric (None: not compared;
    negative: that much regression tolerated). fvu/kl/l0: lower is better; the others: higher is better."""

    fvu: float | None = 0.0
    kl: float | None = 0.0
    top1_agreement: float | None = 0.0
    l0: float | None = None
    replacement_score: float | None = None
    completeness_score: float | None = None


class RetrainSpec(Spec):
    name: str = Field("nightly", pattern=r"^[A-Za-z0-9_.-]+$")
    registry: str = Field(min_length=1, description="CLT registry URL (local directory or s3://)")
    work: str = Field(min_length=1, description="scratch URL; each date uses <work>/<date>/ (activations, "
                                                "checkpoints, candidate CLT)")
    corpus: list[str] | None = Field(None, description="training corpus for the night; `{date}` is replaced by "
                                                       "the run date (default: train.harvest.corpus)")
    warm_start: bool = Field(True, description="initialise from the production CLT (when one exists)")
    train: TrainSpec | str = Field(description="a TrainSpec, or the path of a TrainSpec YAML")
    eval: EvalSetSpec
    canary: CanarySpec
    promote: MarginsSpec = MarginsSpec()

    @field_validator("train", mode="before")
    @classmethod
    def _train_file(cls, v):
        return load_yaml(v, TrainSpec) if isinstance(v, str) else v

    def spec_hash(self) -> str:
        return stable_hash(self.model_dump(mode="json"))


def stable_hash(obj) -> str:
    """A short content hash of a JSON-able object (key order ignored)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
