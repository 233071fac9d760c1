"""The sweep spec: what `ct-ray sweep SPEC.yaml` runs. Unknown keys and bad values are rejected.

Credentials never live in a spec: S3 access comes from the standard AWS chain (env vars, profiles, instance roles).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..specs import AttributionSpec, PruneSpec, Spec, load_yaml, parse
from ..store.tables import DEFAULT_STORE

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
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


PLUGINS_ENV = "CT_RAY_PLUGIN_MODULES"


def plugin_modules() -> list[str]:
    """Packages a spec's `perturbation.function` may name: ct_ray's own, plus those the operator (not the spec) lists."""
    extra = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    return ["ct_ray.perturb", "ct_ray.sweep.perturbation", *extra]


class InterventionSpec(Spec):
    op: Literal["scale", "set", "add"] = "scale"
    value: float = -1.0
    mode: Literal["constrained", "free"] = "constrained"


class PerturbationPlan(Spec):
    """Per-graph perturbation validation: intervene on the `top_k` most influential feature nodes of the pruned
    graph (or on explicit `nodes`), with each of `interventions`. Empty plan (top_k 0 / no interventions): skipped."""

    top_k: int = Field(0, ge=0, le=10_000)
    interventions: list[InterventionSpec] = Field(default_factory=list)
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
        d = self.model_dump()
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]


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

    every_prompts: int = Field(512, ge=1, description="commit once this many prompts are done and not committed")
    every_seconds: float = Field(60.0, gt=0, description="... or this many seconds after the last commit")


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


class SweepSpec(CLTChoice):
    sweep_id: str = Field(description="names the sweep's partition in every table")
    model: str = Field(min_length=1, description="built-in name, local HF directory or hub id")
    clt: str | None = Field(None, description="CLT directory URL (local or s3://)")
    random_clt: RandomCLTSpec | None = None
    prompts: list[str | PromptEntry] | PromptFile
    attribution: AttributionSpec = AttributionSpec()
    pruning: PruneSpec = PruneSpec()
    graph_rows: Literal["pruned", "full"] = Field("pruned", description="which graph's nodes/edges to store")
    perturbation: PerturbationPlan = PerturbationPlan()
    resources: ResourceSpec = ResourceSpec()
    storage: StorageSpec = StorageSpec()
    retries: int = Field(2, ge=0, le=100, description="re-tries of a prompt whose worker died")
    commit: CommitSpec = CommitSpec()
    export_dir: str | None = Field(None, min_length=1, description="`ct-ray sweep` then writes the committed graphs as "
                                   "circuit-tracer / Neuronpedia graph JSON here (docs/export.md)")

    @field_validator("sweep_id")
    @classmethod
    def _sid(cls, v: str) -> str:
        if not _ID_RE.match(v):
            raise ValueError("must be 1-128 characters of letters, digits, '_', '-', '.', starting with a letter or digit")
        return v

    @field_validator("prompts")
    @classmethod
    def _nonempty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("give at least one prompt")
        return v

    def params(self) -> dict:
        return {"attribution": self.attribution.model_dump(), "pruning": self.pruning.model_dump(),
                "graph_rows": self.graph_rows}


def load_sweep_spec(path: str) -> SweepSpec:
    return load_yaml(path, SweepSpec)


def parse_sweep_spec(data: dict, where: str = "sweep spec") -> SweepSpec:
    return parse(SweepSpec, data, where)
