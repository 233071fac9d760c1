"""The embedded end-to-end job (`make demo` / `ct-ray demo`): harvest + train a small CLT on the default model
(reused when already trained with the same spec), sweep prompts with perturbations into the local store, and print
a SQL summary."""

from __future__ import annotations

import time
from pathlib import Path

from .specs import QuickstartSpec, load_yaml


def analysis_summary(store, sweep_id: str) -> str:
    from .analysis.analyze import analyze
    from .analysis.run_cli import summary

    r = analyze(store, sweep_id, supernodes=True)
    return f"      {r['graphs']} graphs, {r['features']} features, {r['distinct_paths']} distinct paths " \
           f"({r['seconds']['total']:.1f} s)\n" + summary(r, 5)


def run_demo(path: str | Path = "workflows/quickstart.yaml", address: str | None = None, progress: bool = True) -> int:
    from .executor import ensure_ray
    from .store.sql import format_table, query
    from .sweep.runner import run_sweep
    from .train.run import already_trained, train

    spec = load_yaml(path, QuickstartSpec)
    t0 = time.perf_counter()
    ensure_ray(address)
    tr = spec.train
    if already_trained(tr):
        print(f"[1/4] reusing the trained CLT at {tr.out}")
    else:
        print(f"[1/4] harvest + train a CLT for {tr.harvest.model} ({tr.clt.n_features} features/layer, "
              f"{tr.optim.steps} steps) -> {tr.out}")
        s = train(tr, progress=progress)
        f = s["final"]
        print(f"      fvu {f['fvu']:.3f}, L0 {f['l0']:.1f}, harvest {s['harvest_s']:.0f} s, train {s['train_s']:.0f} s")
        if "canary" in s:
            from .attribution.canary import canary_line

            print(f"      {canary_line(s['canary'])}")
    print(f"[2/4] sweep {spec.sweep.sweep_id!r}: attribution + pruning + perturbations -> {spec.sweep.storage.url}")
    r = run_sweep(spec.sweep, progress=progress)
    print(f"      {r.ok} attributed, {r.skipped} already done, {r.failed} failed, {r.perturbed} perturbation jobs "
          f"({r.seconds:.0f} s)")
    print("[3/4] SQL summary (DuckDB over the Iceberg tables)")
    for q in spec.summary_sql:
        print(f"\n> {q.strip()}")
        print(format_table(query(q, store=spec.sweep.storage.store())))
    print(f"\n[4/4] circuits across prompts (ct-ray analyze {spec.sweep.sweep_id} --supernodes: feature_stats, "
          f"circuit_paths, supernodes)")
    print(analysis_summary(spec.sweep.storage.store(), spec.sweep.sweep_id))
    print(f"\ndone in {time.perf_counter() - t0:.0f} s. Try: .venv/bin/ct-ray sql \"SELECT * FROM graphs\"")
    return 0
