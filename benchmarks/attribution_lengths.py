"""Attribution at scale: peak RSS and time vs prompt length (`benchmarks/attribution.py --lengths ...`).

Every length runs in a fresh subprocess: SmolLM2-135M, a seeded `random_clt` written once with `save_clt` and
loaded from disk, the first P tokens (BOS included) of a fixed English text, then one timed
`attribute(max_feature_nodes=K, memory_budget=B)`. Peak RSS is the subprocess's own `ru_maxrss` (model + CLT +
attribution). `--busy N` runs N processes that each burn a core beside every measurement (contention);
`--impl FILE` times another version of ct_ray/attribution/attribute.py (e.g. one extracted with `git show`) in
place of the working tree's, for before/after comparisons.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from attribution import _busy_s, _proc_status_mb, _rss_mb  # noqa: E402  (benchmarks/ is on sys.path: script dir)

TEXT = (
    "The history of the city begins with a small settlement on the river, where traders met to exchange salt, "
    "grain and cloth. Over the centuries the town grew into a busy port. Its harbour was deepened, new bridges "
    "were built and the old walls were torn down to make room for wide avenues. Scientists who studied the region "
    "found that the climate had changed slowly, with warmer summers and wetter winters. Farmers adapted by planting "
    "new crops, and engineers designed canals to carry water to the fields. Today the capital of France is Paris, "
    "the largest city of Germany is Berlin, and the river that flows through London is called the Thames. "
    "Children learn to read, write and count at school; later they study physics, music, languages and art. "
)


def worker(spec_path: str) -> None:
    """One length: load, attribute once, print a JSON line."""
    import importlib.util

    import torch

    import ct_ray

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    attribute = ct_ray.attribute
    if spec.get("impl"):
        ms = importlib.util.spec_from_file_location("ct_ray.attribution._bench_impl", spec["impl"])
        mod = importlib.util.module_from_spec(ms)
        mod.__package__ = "ct_ray.attribution"
        ms.loader.exec_module(mod)
        attribute = mod.attribute
    lm = ct_ray.load_model(spec["model"])
    clt = ct_ray.load_clt(spec["clt_dir"])
    tokens = lm.encode(TEXT * (1 + spec["n_tokens"] // 100))[: spec["n_tokens"]].tolist()
    rss_loaded = _rss_mb()
    kw = {"max_feature_nodes": spec["max_feature_nodes"], "batch_size": spec["batch_size"]}
    if spec.get("budget_gb"):
        kw["memory_budget"] = int(spec["budget_gb"] * 2**30)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    try:  # reset the high-water mark (VmHWM), so that the peak below is attribution's own, not loading's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    b0 = _busy_s()
    t0 = time.perf_counter()
    out = {"n_tokens": len(tokens), "rss_loaded_mb": rss_loaded, "threads": torch.get_num_threads(),
           "peak_rss_loading_mb": ru0.ru_maxrss / 1024.0}  # loading a CLT can peak above what attribution adds
    try:
        g = attribute(lm, clt, tokens, **kw)
        out.update(status="ok", n_active=g.meta["n_active_features"], n_features=g.n_features, n_nodes=g.n_nodes,
                   timings=g.meta["timings_s"], estimate_gb=g.meta.get("memory_estimate_bytes", 0) / 2**30)
        out["per_layer_token"] = out["n_active"] / (lm.n_layers * (len(tokens) - 1))
    except ct_ray.CTRayError as e:
        out.update(status="error", error=str(e))
    dt = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    out.update(seconds=dt, cpu_seconds=cpu, others_cores=max(0.0, (_busy_s() - b0) - cpu) / dt,
               peak_rss_mb=ru1.ru_maxrss / 1024.0, peak_rss_attribution_mb=_proc_status_mb("VmHWM") if reset else None)
    print("RESULT " + json.dumps(out), flush=True)


def prepare(work: Path, n_features: int, firing_rate: float, span, seed: int = 0) -> Path:
    """The CLT, written once per configuration (random_clt of 2k features x 30 layers takes a while)."""
    import ct_ray

    clt_dir = work / f"clt-{n_features}-{firing_rate}-{span}-{seed}"
    if not (clt_dir / "config.json").exists() and not any(clt_dir.glob("*.json")):
        lm = ct_ray.load_model("smollm2-135m")
        clt = ct_ray.random_clt(lm, n_features, seed=seed, span=span, firing_rate=firing_rate)
        ct_ray.save_clt(clt, str(clt_dir))
    return clt_dir


def run(a, repo: Path) -> int:
    work = Path(a.workdir or "/tmp/ct_ray_bench_lengths")
    work.mkdir(parents=True, exist_ok=True)
    span = None if a.span in (None, "none", "None") else int(a.span)
    clt_dir = prepare(work, a.features, a.firing_rate, span)
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    mfn = None if a.max_feature_nodes == "all" else int(a.max_feature_nodes)
    rows = []
    for n in [int(x) for x in a.lengths.split(",")]:
        spec = {"model": "smollm2-135m", "clt_dir": str(clt_dir), "n_tokens": n, "max_feature_nodes": mfn,
                "batch_size": a.batch_size, "budget_gb": a.budget_gb, "threads": a.threads, "impl": a.impl}
        sp = work / f"spec-{n}.json"
        sp.write_text(json.dumps(spec))
        burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.busy)]
        try:
            p = subprocess.run([sys.executable, str(Path(__file__).resolve()), sp.as_posix()], env=env,
                               capture_output=True, text=True, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            p = None
        finally:
            for b in burners:
                b.kill()
                b.wait()
        res = {"n_tokens": n, "status": "timeout"} if p is None else next(
            (json.loads(line[7:]) for line in p.stdout.splitlines() if line.startswith("RESULT ")),
            {"n_tokens": n, "status": "crashed", "error": (p.stderr.strip().splitlines() or ["?"])[-1],
             "returncode": p.returncode})
        res.update(busy=a.busy, max_feature_nodes=mfn, features=a.features, firing_rate=a.firing_rate, span=span,
                   impl=a.impl or "working tree")
        rows.append(res)
        print(json.dumps(res), flush=True)
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


def table(rows) -> str:
    head = ("| tokens | active features | per layer x token | feature nodes | nodes | s | rows s | CPU s | others' cores "
            "| peak RSS MB | RSS after load MB | estimate GB | status |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        f = lambda k, fmt="{:.0f}", r=r: fmt.format(r[k]) if r.get(k) is not None else "-"  # noqa: E731
        lines.append("| " + " | ".join([
            f("n_tokens"), f("n_active"), f("per_layer_token", "{:.0f}"), f("n_features"), f("n_nodes"),
            f("seconds", "{:.1f}"), "{:.1f}".format(r["timings"]["rows"]) if r.get("timings") else "-",
            f("cpu_seconds", "{:.1f}"), f("others_cores", "{:.1f}"), f("peak_rss_mb"), f("rss_loaded_mb"),
            f("estimate_gb", "{:.2f}"), r.get("status", "") + (": " + r["error"][:120] if r.get("error") else "")]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    worker(sys.argv[1])
