"""Typed specs for user-facing inputs (CLI flags, YAML workflows). Unknown keys and bad values are rejected."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import CTRayError


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AttributionSpec(Spec):
    max_n_logits: int = Field(10, ge=1, le=1000)
    desired_logit_prob: float = Field(0.95, gt=0.0, le=1.0)
    batch_size: int = Field(128, ge=1)
    max_feature_nodes: int | None = Field(7500, ge=1, description="kept features (by influence); null: all active")


class PruneSpec(Spec):
    node_threshold: float = Field(0.8, ge=0.0, le=1.0)
    edge_threshold: float = Field(0.98, ge=0.0, le=1.0)


class HarvestSpec(Spec):
    """Activation harvesting: corpus -> contexts -> model actors -> (x at the read point, y = mlp_out) per layer."""

    model: str = "smollm2-135m"
    corpus: list[str] = Field(default_factory=lambda: ["wiki-summaries"],
                              description="built-in names (wiki-summaries, bbc-news) or fsspec URLs/globs")
    text_column: str = "text"
    context_len: int = Field(64, ge=2, le=8192)
    n_tokens: int = Field(20_000, ge=1, description="tokens to harvest (before dropping BOS/outliers)")
    batch_contexts: int = Field(8, ge=1)
    workers: int = Field(1, ge=1, description="actors, each with its own copy of the model")
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    read_point: Literal["resid_mid", "mlp_in"] = "resid_mid"
    dtype: Literal["float32", "bfloat16", "int8"] = "float32"
    outlier_factor: float = Field(10.0, gt=1)
    out: str | None = Field(None, description="persist shards here; None streams straight into training")


class CLTShapeSpec(Spec):
    n_features: int = Field(256, ge=1)
    span: int | None = Field(None, ge=1, description="layers each decoder writes: None = full CLT, 1 = per-layer")
    activation: Literal["jumprelu", "relu"] = "jumprelu"


class OptimSpec(Spec):
    steps: int = Field(500, ge=1)
    batch_tokens: int = Field(512, ge=1)
    lr: float = Field(2e-4, gt=0)
    lambda_final: float = Field(1e-3, ge=0, description="sparsity coefficient reached at the end of a linear ramp")
    lambda_ramp_frac: float = Field(1.0, gt=0, le=1, description="fraction of the steps over which λ ramps from 0")
    c: float = Field(4.0, gt=0)
    preact: float = Field(3e-6, ge=0)
    bandwidth: float = Field(2.0, gt=0)
    threshold_init: float = Field(0.03, ge=0)
    target_firing_rate: float = Field(0.01, gt=0, lt=1)
    clip: float = Field(1.0, gt=0)
    decay_frac: float = Field(0.2, ge=0, le=1)
    sparse_decode: bool | Literal["auto"] = Field("auto", description="gather active decoder rows only; 'auto' when "
                                                 "under 8% of the features fire")
    shuffle_buffer_tokens: int = Field(8192, ge=1)
    seed: int = 0


class TrainSpec(Spec):
    """CLT training on Ray Train: `workers` feature shards x `data_parallel` replicas."""

    name: str = Field("clt", pattern=r"^[A-Za-z0-9_.-]+$")
    harvest: HarvestSpec = HarvestSpec()
    activations: str | None = Field(None, description="read a persisted harvest here instead of harvesting")
    clt: CLTShapeSpec = CLTShapeSpec()
    optim: OptimSpec = OptimSpec()
    workers: int = Field(1, ge=1)
    data_parallel: int = Field(1, ge=1)
    num_cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    checkpoint: str = "ct_ray_data/checkpoints"
    checkpoint_every: int = Field(100, ge=1)
    max_failures: int = Field(2, ge=0)
    metrics_every: int = Field(20, ge=1)
    eval_tokens: int = Field(1024, ge=0, description="held-out tokens for replacement-model metrics at the end")
    out: str = "ct_ray_data/clts/clt"
    metrics: str | None = Field("ct_ray_data", description="store URL whose train_metrics table gets the run's "
                                                       "metrics history (partition `run` = the run's name)")
    init_from: str | None = Field(None, description="warm start: a CLT URL of the same shape (e.g. the registry's "
                                                   "production version) instead of a random initialisation")


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "spec"
    return f"{loc}: {err['msg']}"


def parse(spec_cls: type[Spec], data: dict, where: str = "spec") -> Spec:
    try:
        return spec_cls.model_validate(data)
    except ValidationError as e:
        raise CTRayError(f"invalid {where}: {_first_error(e)}") from e


# the optional top-level `kind:` of a spec file (what `ct-ray submit` runs it as) and the spec class it names
SPEC_KINDS = {"harvest": "HarvestSpec", "train": "TrainSpec", "sweep": "SweepSpec", "retrain": "RetrainSpec",
              "demo": "QuickstartSpec", "features": "FeaturesSpec"}


MAX_SPEC_BYTES = 4 << 20  # the largest real spec (10^4 inline prompts) is ~1 MB; prompt sets go in prompt files


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader without anchors/aliases: an 851-byte file of nested aliases expands to hundreds of MB ("billion
    laughs"); specs never need them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            ev = self.peek_event()
            raise yaml.YAMLError(f"YAML aliases (*{ev.anchor}) are not allowed in ct_ray files "
                                 f"(line {ev.start_mark.line + 1})")
        return super().compose_node(parent, index)


def safe_yaml(text: str | bytes, where: str):
    """Parse untrusted YAML (or JSON): no aliases, no Python tags, bounded size; one-line `CTRayError` otherwise."""
    if len(text) > MAX_SPEC_BYTES:
        raise CTRayError(f"{where} is too large ({len(text)} bytes > {MAX_SPEC_BYTES})")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise CTRayError(f"{where} is not a UTF-8 text file") from None
    try:
        return yaml.load(text, Loader=_NoAliasLoader)
    except yaml.YAMLError as e:
        raise CTRayError(f"{where} is not valid YAML: {' '.join(str(e).split())[:300]}") from None
    except RecursionError:
        raise CTRayError(f"{where} is nested too deeply") from None


def read_yaml(path: str | Path) -> dict:
    """A spec file's mapping, unvalidated."""
    p = Path(path)
    if not p.is_file():
        raise CTRayError(f"spec file not found: {p}" if not p.exists() else f"spec path is not a file: {p}")
    try:
        size = p.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise CTRayError(f"{p} is too large ({size} bytes > {MAX_SPEC_BYTES})")
        raw = p.read_bytes()
    except OSError as e:
        raise CTRayError(f"cannot read spec file {p}: {e.strerror}") from None
    data = safe_yaml(raw, str(p)) or {}
    if not isinstance(data, dict):
        raise CTRayError(f"{p} must hold a mapping of spec fields")
    return data


def load_yaml(path: str | Path, spec_cls: type[Spec]) -> Spec:
    p = Path(path)
    data = read_yaml(p)
    kind = data.pop("kind", None)
    if kind is not None and SPEC_KINDS.get(str(kind)) != spec_cls.__name__:
        raise CTRayError(f"{p} is a `kind: {kind}` spec, not a {spec_cls.__name__}")
    return parse(spec_cls, data, where=str(p))
