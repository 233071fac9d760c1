"""Harvesting and CLT training."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from .base import Spec
from .common import DEFAULT_MODEL

# what `ct-ray train` attributes at the end (the same four prompts as workflows/nightly_retrain.yaml's canary): short
# factual, antonym and counting prompts whose graphs users look at first
DEFAULT_CANARY = ("The capital of France is", "The opposite of hot is", "1 2 3 4 5 6 7",
                  "The chemical symbol for gold is")


class HarvestSpec(Spec):
    """Activation harvesting: corpus -> contexts -> model actors -> (x at the read point, y = mlp_out) per layer."""

    model: str = DEFAULT_MODEL
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


TOPK_ACTIVATIONS = ("topk", "batchtopk")


class CLTShapeSpec(Spec):
    n_features: int = Field(256, ge=1)
    span: int | None = Field(None, ge=1, description="layers each decoder writes: None = full CLT, 1 = per-layer")
    activation: Literal["jumprelu", "relu", "topk", "batchtopk"] = Field(
        "jumprelu", description="topk / batchtopk: training-time only (no sparsity penalty, L0 fixed by k); the CLT "
        "is exported as JumpReLU with the running estimate of the smallest kept activation as every threshold")
    k: int | None = Field(None, ge=1, description="topk: active latents per token and layer; batchtopk: the k·n "
                                                  "largest of a batch of n tokens per layer")

    @model_validator(mode="after")
    def _k_with_topk(self):
        if (self.activation in TOPK_ACTIVATIONS) != (self.k is not None):
            raise ValueError("k is required by activation topk/batchtopk and taken by no other")
        return self

    @property
    def file_activation(self) -> str:
        """The activation of the exported CLT (circuit-tracer's format knows JumpReLU and ReLU only)."""
        return "jumprelu" if self.activation in TOPK_ACTIVATIONS else self.activation


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
    auxk_alpha: float = Field(0.0, ge=0, description="weight of the AuxK loss (Gao et al. 2024): the dead latents' "
                                                     "top codes reconstruct the residual error; 0 = off")
    auxk_k: int | None = Field(None, ge=1, description="dead latents per token and layer the AuxK loss uses "
                                                       "(default d_model / 2, at most the layer's dead count)")
    dead_tokens: int = Field(100_000, ge=1, description="a latent that fired on none of the last this many "
                                                       "training tokens is dead (AuxK's set)")


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
    canary: list[Annotated[str, Field(min_length=1, max_length=2000)]] = Field(list(DEFAULT_CANARY), max_length=64,
                              description="prompts attributed at the end (full graphs): the mean replacement and "
                                          "completeness scores are reported with the CLT; [] skips them")
    out: str = "ct_ray_data/clts/clt"
    metrics: str | None = Field("ct_ray_data", description="store URL whose train_metrics table gets the run's "
                                                       "metrics history (partition `run` = the run's name)")
    init_from: str | None = Field(None, description="warm start: a CLT URL of the same shape (e.g. the registry's "
                                                   "production version) instead of a random initialisation")
