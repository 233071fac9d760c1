"""Parts shared by several job kinds: prompts, the CLT choice, Ray resources, storage, commit rounds.

Credentials never live in a spec: S3 access comes from the standard AWS chain (env vars, profiles, instance roles).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..store.options import DEFAULT_STORE
from .base import Spec

DEFAULT_MODEL = "smollm2-135m"  # the built-in offline model (ct_ray/models/loading.py) every job defaults to

# storage option names that would carry secrets; they must come from the AWS chain / environment instead
_SECRET_OPTIONS = {"key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
                   "aws_session_token", "access_key", "secret_key", "session_token", "credentials"}


class PromptEntry(Spec):
    prompt: str
    target: str | None = Field(None, description="expected next token(s); its probability and rank are recorded")


class PromptFile(Spec):
    """Prompts from a file on any fsspec URL: Parquet, JSONL or plain text (one prompt a line)."""

    url: str = Field(min_length=1)
    format: Literal["parquet", "jsonl", "text"] | None = Field(None, description="default: from the file extension")
    column: str = "prompt"
    target_column: str | None = None
    limit: int | None = Field(None, ge=1)


class RandomCLTSpec(Spec):
    """A seeded random CLT built inside each worker (tests and demos only: its features mean nothing)."""

    features: int = Field(ge=1)
    seed: int = 0
    firing_rate: float = Field(0.01, gt=0.0, lt=1.0)
    span: int | None = Field(None, ge=1)


class CLTChoice(Spec):
    """Base of the specs that take either a CLT URL (`clt`) or a seeded random CLT (`random_clt`): exactly one,
    and the id that sweeps write into graphs.clt (the features table is keyed by the same id)."""

    @model_validator(mode="after")
    def _one_clt(self):
        if (self.clt is None) == (self.random_clt is None):
            raise ValueError("give exactly one of clt (a CLT URL) or random_clt (features, seed)")
        return self

    def clt_id(self) -> str:
        if self.clt:
            return self.clt
        r = self.random_clt
        return f"random(features={r.features},seed={r.seed},firing_rate={r.firing_rate},span={r.span})"


class ResourceSpec(Spec):
    workers: int = Field(1, ge=1, le=4096, description="actors, each holding the model and the CLT once")
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    torch_threads: int | None = Field(None, ge=1, description="default: max(1, num_cpus)")
    queue_depth: int = Field(2, ge=1, le=64, description="tasks queued per actor (1 running + the rest waiting)")
    max_restarts: int = Field(-1, ge=-1, description="actor restarts (-1: unlimited)")
    spread: bool = Field(False, description="place workers on different nodes (Ray SPREAD scheduling)")
    forward_aws_env: bool = Field(True, description="pass the driver's AWS settings (endpoint, region, profile) to the "
                                  "workers; keys never go in a runtime_env (ct_ray/executor/worker_env.py)")


class CommitSpec(Spec):
    """How often the driver commits the workers' rows (one Iceberg snapshot per table and round): rows are visible,
    and safe from a driver crash, once committed. Fewer, larger rounds mean fewer, larger data files."""

    every_seconds: float = Field(60.0, gt=0, description="commit this many seconds after the last commit")
    every_mb: float = Field(256.0, gt=0, description="... or once the workers hold this many MB of rows not committed "
                            "(Arrow bytes): rounds sized by time and bytes, so a fast sweep makes few, large files")
    every_prompts: int | None = Field(None, ge=1, description="... or once this many prompts are done and not committed "
                                      "(none by default)")
    keep_snapshots: int = Field(20, ge=0, description="snapshots a running sweep keeps per table (older ones that "
                                "recovery does not need are expired as it goes; 0: keep all)")


class StorageSpec(Spec):
    url: str = DEFAULT_STORE
    endpoint_url: str | None = None
    options: dict = Field(default_factory=dict, description="extra fsspec options (no credentials)")
    catalog: str | None = Field(None, description="Iceberg catalog URI: sqlite:///FILE, postgresql://USER@HOST/DB, "
                                                  "rest:URL or glue[:REGION]; default: CT_RAY_CATALOG, else a SQLite "
                                                  "catalog in the store (see docs/tables.md)")

    @model_validator(mode="before")
    @classmethod
    def _from_url(cls, v):  # `storage: s3://bucket/prefix` is short for `storage: {url: ...}`
        return {"url": v} if isinstance(v, str) else v

    @field_validator("options")
    @classmethod
    def _no_secrets(cls, v: dict) -> dict:
        def walk(d, path=""):
            for k, x in d.items():
                if str(k).lower() in _SECRET_OPTIONS:
                    raise ValueError(f"{path}{k}: credentials must come from the AWS chain / environment, "
                                     f"never from the spec file")
                if isinstance(x, dict):
                    walk(x, f"{path}{k}.")
        walk(v)
        return v

    @field_validator("catalog")
    @classmethod
    def _catalog(cls, v: str | None) -> str | None:
        from ..store.catalog import check_catalog_uri

        return check_catalog_uri(v) if v else v

    def storage_options(self) -> dict:
        opts = dict(self.options)
        if self.endpoint_url:
            opts["endpoint_url"] = self.endpoint_url
        return opts

    def store(self):
        from ..store.tables import Store

        return Store(self.url, catalog=self.catalog, **self.storage_options())
