"""Feature dashboards of a CLT (`ct-ray features`)."""

from __future__ import annotations

import hashlib
import json

from pydantic import Field, field_validator

from .common import DEFAULT_MODEL, CLTChoice, RandomCLTSpec, StorageSpec


class FeaturesSpec(CLTChoice):
    model: str = Field(DEFAULT_MODEL, min_length=1)
    clt: str | None = Field(None, description="CLT directory URL (local or s3://)")
    random_clt: RandomCLTSpec | None = None
    corpus: list[str] = Field(default_factory=lambda: ["wiki-summaries"],
                              description="built-in names (wiki-summaries, bbc-news) or fsspec URLs/globs")
    text_column: str = "text"
    context_len: int = Field(64, ge=4, le=8192)
    n_contexts: int = Field(256, ge=1)
    top_k: int = Field(10, ge=1, le=100)
    samples: int = Field(16, ge=1, le=256, description="reservoir of active contexts the quantiles come from")
    quantiles: list[float] = Field(default_factory=lambda: [0.1, 0.5, 0.9])
    window: int = Field(16, ge=2, le=256, description="tokens shown around a context's max activation")
    batch_contexts: int = Field(8, ge=1)
    chunk_contexts: int = Field(32, ge=1, description="contexts per actor call")
    workers: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    storage: StorageSpec = StorageSpec()

    @field_validator("quantiles")
    @classmethod
    def _q(cls, v):
        if not v or any(not 0.0 <= q <= 1.0 for q in v):
            raise ValueError("give quantiles between 0 and 1")
        return v

    def job_key(self) -> str:
        d = self.model_dump(exclude={"workers", "num_cpus", "num_gpus", "storage", "batch_contexts", "chunk_contexts"})
        d["clt_id"] = self.clt_id()
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
