"""Prompt sweeps on Ray: one task per prompt (attribute + prune + write rows), perturbation jobs per graph,
Parquet tables in object storage (ct_ray.store), resumable and idempotent. See docs/tables.md and docs/sql.md.

The names below are imported on first use (PEP 562): `ct-ray sweep status`, `ct-ray sql` and the other light commands
import `ct_ray.sweep.cli` / `ct_ray.sweep.status` without loading the runner (torch, Ray)."""

from ..exports import lazy_exports

_LAZY = {
    **dict.fromkeys(("PerturbationPlan", "PlannedIntervention", "PromptEntry", "PromptFile", "RandomCLTSpec",
                     "ResourceSpec", "StorageSpec", "SweepSpec", "load_sweep_spec", "parse_sweep_spec"), "..specs"),
    **dict.fromkeys(("PromptItem", "read_prompts", "task_key"), ".prompts"),
    **dict.fromkeys(("SweepResult", "run_sweep"), ".runner"),
    "sweep_status": ".status",
}
__all__ = ["SweepSpec", "PromptEntry", "PromptFile", "RandomCLTSpec", "PerturbationPlan", "PlannedIntervention",
           "ResourceSpec", "StorageSpec", "load_sweep_spec", "parse_sweep_spec", "run_sweep", "SweepResult",
           "sweep_status", "read_prompts", "task_key", "PromptItem"]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
