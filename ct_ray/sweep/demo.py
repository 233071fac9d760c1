"""The sweep step of `make demo` (workflows/quickstart.yaml): prompts -> sweep -> SQL summary, in one call."""

from __future__ import annotations

import os

from ..specs import parse_sweep_spec
from ..store.tables import DEFAULT_STORE
from .runner import SweepResult, run_sweep
from .status import summary_table


def demo_sweep(prompts: list, *, model: str, clt: str | None = None, random_clt_features: int = 512, seed: int = 0,
               attribution: dict | None = None, pruning: dict | None = None, perturbation: dict | None = None,
               store: str = DEFAULT_STORE, sweep_id: str = "quickstart", workers: int = 1,
               num_cpus: float | None = None, progress: bool = True) -> tuple[SweepResult, str]:
    """Sweep `prompts` (strings or {prompt, target} dicts) on a local Ray into `store`; returns the result and a
    per-prompt summary table (one SQL query). Re-running finishes only what is missing."""
    spec = parse_sweep_spec({
        "sweep_id": sweep_id, "model": model, "prompts": prompts,
        **({"clt": clt} if clt else {"random_clt": {"features": random_clt_features, "seed": seed}}),
        "attribution": attribution or {}, "pruning": pruning or {},
        "perturbation": perturbation or {"top_k": 5, "interventions": [{"op": "scale", "value": -1.0}]},
        "resources": {"workers": workers, "num_cpus": num_cpus or max(1, (os.cpu_count() or 2) // workers)},
        "storage": store}, where="demo sweep")
    result = run_sweep(spec, progress=progress)
    return result, summary_table(sweep_id, store=spec.storage.store())
