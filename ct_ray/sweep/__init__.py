"""Prompt sweeps on Ray: one task per prompt (attribute + prune + write rows), perturbation jobs per graph,
Parquet tables in object storage (ct_ray.store), resumable and idempotent. See docs/tables.md and docs/sql.md."""

from ..specs import (
                   PerturbationPlan,
                   PlannedIntervention,
                   PromptEntry,
                   PromptFile,
                   RandomCLTSpec,
                   ResourceSpec,
                   StorageSpec,
                   SweepSpec,
                   load_sweep_spec,
                   parse_sweep_spec,
)
from .prompts import PromptItem, read_prompts, task_key
from .runner import SweepResult, run_sweep
from .status import sweep_status

__all__ = ["SweepSpec", "PromptEntry", "PromptFile", "RandomCLTSpec", "PerturbationPlan", "PlannedIntervention",
           "ResourceSpec", "StorageSpec", "load_sweep_spec", "parse_sweep_spec", "run_sweep", "SweepResult",
           "sweep_status", "read_prompts", "task_key", "PromptItem"]
