"""Sweep benchmark: per-prompt overhead of a Ray sweep vs attribute() in a loop, and 1 vs 2 worker throughput.

In one process:
  1. baseline: load the model and the CLT, one warm-up graph, then for every prompt in a plain loop (torch threads
     = --threads) `attribute()`, `prune()` and both graphs' `scores()` - the computation a sweep row needs - timing
     `attribute()` alone and with `prune()` too;
  2. sweeps of the same prompts into a local store (fresh sweep ids, nothing skipped) on a local Ray:
       A. 1 worker  x --threads CPUs  (the overhead comparison: same threads as the baseline; the loop and sweep A
          alternate --rounds times, since load from other processes drifts)
       B. 1 worker  x 1 CPU
       C. 2 workers x 1 CPU           (scaling: throughput C / (2 x throughput B))
     Steady-state time per prompt = (last result - first result) / (n - 1): worker start-up (a Ray actor
     importing torch and loading the model + CLT) and the first graph's warm-up are reported separately.
The sweep per-prompt time includes what the sweep adds: the Ray round trip, building the Arrow rows, buffering and
writing them as data files, the driver's Iceberg commits and its bookkeeping. The headline overhead compares sweep A's steady
per-prompt time with its workers' own compute time in the same run (robust on a shared machine); the comparison
with the in-process loop is printed too (meaningful only when the load average stays low: see --wait-idle).

    python benchmarks/sweep.py                 # SmolLM2-135M + random CLT (1024 features/layer), 12 prompts
    python benchmarks/sweep.py --quick         # tiny model, 24 prompts (~1-2 minutes)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = [
    "The capital of France is", "The opposite of hot is", "Fact: Michael Jordan plays the sport of",
    "1 2 3 4 5 6 7", "The Eiffel Tower is in the city of", "She opened the door and saw a",
    "Water freezes at zero degrees", "The chemical symbol for gold is", "My favourite colour is",
    "The sun rises in the", "Dogs are loyal and cats are", "A week has seven", "The largest ocean is the",
    "To be or not to", "Bread is made from", "The first month of the year is", "Ice cream is cold and",
    "He plays the guitar in a", "Rain falls from the", "The opposite of up is", "Cows give us",
    "Monday comes after", "The moon orbits the", "Paris, London and",
]


def load_avg() -> float:
    return os.getloadavg()[0]


def wait_idle(hold_s: float, max_wait_s: float = 1800.0, threshold: float = 0.6) -> float:
    """Wait until the 1-minute load average stays under `threshold` for `hold_s` seconds (shared machines);
    returns the seconds waited."""
    if hold_s <= 0:
        return 0.0
    t0 = time.monotonic()
    quiet_since = None
    while time.monotonic() - t0 < max_wait_s:
        if load_avg() < threshold:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= hold_s:
                break
        else:
            quiet_since = None
        time.sleep(2)
    return time.monotonic() - t0


def prepare(args, work: Path) -> tuple[str, str]:
    from ct_ray import load_model, random_clt, save_clt
    from ct_ray.models.tiny import save_tiny

    if args.model == "tiny":
        model = str(save_tiny("llama", work / "tiny", n_layers=4, d_model=128, d_mlp=512, max_pos=128))
    else:
        model = args.model
    lm = load_model(model)
    clt_dir = str(work / "clt")
    save_clt(random_clt(lm, args.features, seed=0, firing_rate=args.firing_rate), clt_dir)
    return model, clt_dir


def baseline(model: str, clt_dir: str, prompts: list[str], threads: int, attr_kw: dict) -> dict:
    import torch

    from ct_ray import attribute, load_clt, load_model

    torch.set_num_threads(threads)
    lm, clt = load_model(model), load_clt(clt_dir)
    g = attribute(lm, clt, prompts[0], **attr_kw)  # warm-up
    g.prune().scores()
    t_attr, t_both, t_all = [], [], []
    for p in prompts:
        t0 = time.perf_counter()
        g = attribute(lm, clt, p, **attr_kw)
        t1 = time.perf_counter()
        pr = g.prune()
        t2 = time.perf_counter()
        g.scores(), pr.scores()  # what a sweep row records besides the graph
        t3 = time.perf_counter()
        t_attr.append(t1 - t0)
        t_both.append(t2 - t0)
        t_all.append(t3 - t0)
    n = len(prompts)
    return {"attribute_s": sum(t_attr) / n, "attribute_prune_s": sum(t_both) / n, "compute_s": sum(t_all) / n,
            "per_prompt_compute_s": t_all}


def sweep(model, clt_dir, prompts, store, sweep_id, workers, cpus, threads, attr_kw) -> dict:
    from ct_ray.sweep import parse_sweep_spec, run_sweep

    spec = parse_sweep_spec({"sweep_id": sweep_id, "model": model, "clt": clt_dir, "prompts": prompts,
                             "attribution": attr_kw, "storage": str(store),
                             "resources": {"workers": workers, "num_cpus": cpus, "torch_threads": threads}})
    stamps, outs, commits = [], [], []

    def on_event(kind, out):
        if kind == "prompt":
            stamps.append(time.perf_counter())
            outs.append(out)
        elif kind == "commit":
            commits.append(time.perf_counter())

    t0 = time.perf_counter()
    r = run_sweep(spec, on_event=on_event)
    n = len(stamps)
    assert r.ok == len(prompts) and r.failed == 0, r
    # up to the last commit: rows count once they are durable (the final round's data files and commits included)
    steady = (max(stamps[-1], commits[-1] if commits else 0.0) - stamps[0]) / (n - 1)
    task = statistics.mean(o["seconds"] for o in outs[1:])
    compute = statistics.mean(o["compute_seconds"] for o in outs[1:])
    return {"workers": workers, "cpus_per_worker": cpus, "threads": threads, "total_s": r.seconds,
            "first_result_s": stamps[0] - t0, "steady_per_prompt_s": steady, "throughput_per_min": 60.0 / steady,
            "worker_task_s": task, "worker_compute_s": compute, "worker_rows_and_writes_s": task - compute,
            "in_worker_overhead": (task - compute) / compute,
            "sweep_overhead": (steady - compute) / compute}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="built-in name / HF dir, or 'tiny'")
    ap.add_argument("--features", type=int, default=1024)
    ap.add_argument("--firing-rate", type=float, default=0.003)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny model, 24 prompts")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before each measured phase, wait until the load average stays low for S seconds")
    ap.add_argument("--configs", default="ABC", help="which sweeps to run (A, B, C)")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the in-process loop and sweep A")
    ap.add_argument("--workdir")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.quick:
        args.model, args.features, args.firing_rate, args.prompts = "tiny", 512, 0.01, 24
    prompts = PROMPTS[: args.prompts]
    attr_kw = {"max_n_logits": 10, "desired_logit_prob": 0.95, "batch_size": 128}
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ct_sweep_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    out = {"date": _dt.date.today().isoformat(), "cores": os.cpu_count(), "argv": sys.argv, "model": args.model,
           "features": args.features, "firing_rate": args.firing_rate, "n_prompts": len(prompts)}
    t_start = time.perf_counter()

    model, clt_dir = prepare(args, work)

    import ray

    # Ray first, so the in-process loop runs beside an idle Ray exactly as the driver of a sweep does
    ray.init(address="local", num_cpus=max(2, args.threads), include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 2**20)
    stamp = int(time.time())
    configs = {"A": (1, args.threads, args.threads), "B": (1, 1, 1), "C": (2, 1, 1)}

    def run(name: str, tag: str) -> dict:
        workers, cpus, threads = configs[name]
        wait_idle(args.wait_idle)
        la = load_avg()
        r = sweep(model, clt_dir, prompts, work / "store", f"bench-{tag}-{stamp}", workers, cpus, threads, attr_kw)
        r["load_avg"] = [la, load_avg()]
        print(f"sweep {tag}: {workers} worker(s) x {cpus} CPU: steady {r['steady_per_prompt_s']:.3f} s/prompt "
              f"({r['throughput_per_min']:.1f}/min), first result after {r['first_result_s']:.1f} s, "
              f"total {r['total_s']:.1f} s; in the worker per prompt: compute {r['worker_compute_s']:.3f} s, "
              f"rows + Parquet writes {r['worker_rows_and_writes_s']:.4f} s "
              f"({100 * r['in_worker_overhead']:.1f}%)", flush=True)
        return r

    # overhead: alternate the in-process loop and sweep A (`--rounds` times; the machine's load drifts)
    rounds = []
    for i in range(args.rounds if "A" in args.configs else 0):
        wait_idle(args.wait_idle)
        la0 = load_avg()
        base = baseline(model, clt_dir, prompts, args.threads, attr_kw)
        base["load_avg"] = [la0, load_avg()]
        print(f"loop {i} ({args.threads} threads): attribute {base['attribute_s']:.3f} s/prompt, "
              f"+ prune {base['attribute_prune_s']:.3f}, + scores {base['compute_s']:.3f}", flush=True)
        a = run("A", f"A{i}")
        rounds.append({"baseline": base, "sweep": a,
                       "vs_loop": a["steady_per_prompt_s"] / base["compute_s"] - 1.0,
                       "vs_attribute_loop": a["steady_per_prompt_s"] / base["attribute_s"] - 1.0})
    runs = {name: run(name, name) for name in ("B", "C") if name in args.configs}
    ray.shutdown()
    out["rounds"], out["sweeps"] = rounds, runs
    if rounds:
        med = lambda xs: statistics.median(xs)  # noqa: E731
        out["sweep_overhead"] = med([r["sweep"]["sweep_overhead"] for r in rounds])
        out["overhead_vs_loop"] = med([r["vs_loop"] for r in rounds])
        out["overhead_vs_attribute_loop"] = med([r["vs_attribute_loop"] for r in rounds])
        a = rounds[-1]["sweep"]
        print(f"per-prompt overhead of the sweep (rows, Parquet writes, Ray round trip, driver) against the workers' "
              f"own computation (attribute + prune + scores) in the same run: {100 * out['sweep_overhead']:+.2f}% "
              f"(median of {len(rounds)}; last: rows + writes {a['worker_rows_and_writes_s']:.4f} s, Ray + driver "
              f"{a['steady_per_prompt_s'] - a['worker_task_s']:+.4f} s per prompt)")
        each = ", ".join(f"{100 * r['vs_loop']:+.1f}%" for r in rounds)
        print(f"sweep A vs the in-process loop just before it: {each} vs attribute + prune + scores "
              f"(median {100 * out['overhead_vs_loop']:+.1f}%); vs attribute() alone: median "
              f"{100 * out['overhead_vs_attribute_loop']:+.1f}%")
    if "B" in runs and "C" in runs:
        b, c = runs["B"], runs["C"]
        out["scaling_efficiency_2_workers"] = c["throughput_per_min"] / (2 * b["throughput_per_min"])
        print(f"2 workers x 1 CPU vs 1 worker x 1 CPU: {c['throughput_per_min'] / b['throughput_per_min']:.2f}x "
              f"throughput, scaling efficiency {100 * out['scaling_efficiency_2_workers']:.0f}%")
    out["total_s"] = time.perf_counter() - t_start
    print(f"total {out['total_s']:.0f} s; load average {load_avg():.2f} on {os.cpu_count()} cores")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
