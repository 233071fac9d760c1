"""Attribution at scale: peak RSS and time vs prompt length, ct_ray and circuit-tracer 0.5.0
(`benchmarks/attribution.py --lengths ...`).

Every length runs in fresh subprocesses, one per tool: SmolLM2-135M, a seeded `random_clt` written once with
`save_clt` and loaded from disk by both tools, the first P tokens (BOS included) of a fixed English text (token ids
computed once, in a subprocess, and given to both), then one timed attribution with the same `max_feature_nodes`
(default 7500 for both), no warm-up: ct_ray's `attribute(max_feature_nodes=K, memory_budget=B)` and circuit-tracer's
`attribute(max_feature_nodes=K)` (nnsight backend, fp32, batch size `--ct-batch-size`: its default 512, or 'auto',
the largest that fits `--max-rss-gb` by `ct_batch_size`'s estimate; driver: benchmarks/ct_driver.py, in
`--ct-venv`). Peak RSS is each subprocess's own `ru_maxrss` (model + CLT + attribution, from `wait4`), plus
attribution's own high-water mark (reset after loading). A subprocess whose RSS
passes `--max-rss-gb` is killed (the machine is shared) and recorded as such; `--timeout` bounds each one.
`--busy N` runs N processes that each burn a core beside every measurement of both tools (contention);
`--slowdown IDLE.json,BUSY.json` prints busy/idle time per tool from two runs' `--json`. `--no-ct` times ct_ray
only; `--impl FILE` times another version of ct_ray/attribution/attribute.py (e.g. one extracted with `git show`).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from attribution import _rss_mb  # noqa: E402  (benchmarks/ is on sys.path: the script's directory)
from ct_driver import busy_s as _busy_s
from ct_driver import ct_check, ct_command, ct_env, ct_model_dir, reset_hwm, status_mb

MODEL = "smollm2-135m"

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
    tokens = json.loads(Path(spec["tokens"]).read_text())  # the same ids circuit-tracer gets
    rss_loaded = _rss_mb()
    kw = {"max_feature_nodes": spec["max_feature_nodes"], "batch_size": spec["batch_size"]}
    if spec.get("budget_gb"):
        kw["memory_budget"] = int(spec["budget_gb"] * 2**30)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    reset = reset_hwm()  # so that the peak below is attribution's own, not loading's
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
               peak_rss_mb=ru1.ru_maxrss / 1024.0, peak_rss_attribution_mb=status_mb("VmHWM") if reset else None)
    print("RESULT " + json.dumps(out), flush=True)


def tokens_worker(spec_path: str) -> None:
    """Token ids of every length, computed once with ct_ray's tokenizer (BOS included), one JSON file each."""
    import ct_ray

    spec = json.loads(Path(spec_path).read_text())
    lm = ct_ray.load_model(spec["model"])
    for n, path in spec["lengths"].items():
        n = int(n)
        Path(path).write_text(json.dumps(lm.encode(TEXT * (1 + n // 100))[:n].tolist()))


def prepare(work: Path, n_features: int, firing_rate: float, span, seed: int = 0) -> Path:
    """The CLT, written once per configuration (random_clt of 2k features x 30 layers takes a while)."""
    import ct_ray

    clt_dir = work / f"clt-{n_features}-{firing_rate}-{span}-{seed}"
    if not (clt_dir / "config.json").exists() and not any(clt_dir.glob("*.json")):
        lm = ct_ray.load_model(MODEL)
        clt = ct_ray.random_clt(lm, n_features, seed=seed, span=span, firing_rate=firing_rate)
        ct_ray.save_clt(clt, str(clt_dir))
    return clt_dir


def run_watched(cmd: list[str], env: dict, log: Path, timeout: float, max_rss_mb: float | None) -> dict:
    """Run `cmd` (output to `log`); kill it past `timeout` s or `max_rss_mb` of resident memory. Returns its
    return code, wall time, peak RSS from wait4 (the child's own ru_maxrss, whatever it printed) and why it was
    killed, if it was."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        killed, rss_seen = None, 0.0
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            try:
                with open(f"/proc/{p.pid}/status") as st:
                    rss = next(int(x.split()[1]) for x in st if x.startswith("VmRSS:")) / 1024.0
                rss_seen = max(rss_seen, rss)
            except (OSError, StopIteration):
                rss = 0.0
            dt = time.perf_counter() - t0
            if killed is None and dt > timeout:
                killed = f"timeout after {dt:.0f} s"
            elif killed is None and max_rss_mb and rss > max_rss_mb:
                killed = f"RSS {rss / 1024:.1f} GB > limit {max_rss_mb / 1024:.1f} GB after {dt:.0f} s"
            if killed:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.25)
    p.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": p.returncode, "wall_s": time.perf_counter() - t0, "killed": killed,
            "child_maxrss_mb": max(ru.ru_maxrss / 1024.0, rss_seen)}


def _measure(name: str, cmd: list[str], env: dict, log: Path, a, n: int) -> dict:
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.busy)]
    try:
        w = run_watched(cmd, env, log, a.timeout, a.max_rss_gb * 1024 if a.max_rss_gb else None)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    out = log.read_text()
    res = next((json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")), None)
    if res is None:
        err = w["killed"] or (out.strip().splitlines() or ["?"])[-1]
        res = {"status": "killed" if w["killed"] else "crashed", "error": err}
    res.update(tool=name, n_tokens=n, busy=a.busy, subprocess_peak_rss_mb=w["child_maxrss_mb"],
               subprocess_wall_s=w["wall_s"], returncode=w["returncode"])
    return res


def ct_batch_size(a, n_active: int | None, n_tokens: int, mfn: int | None, clt_dir: Path) -> int:
    """`--ct-batch-size`, or for 'auto' the largest power of two <= 512 whose estimated peak fits 85% of
    `--max-rss-gb`. circuit-tracer's peak (0.5.0, nnsight backend, CLT) is dominated by two buffers: the gradient
    gathered at every decoder that writes to a layer, [batch, n_active, d_model] fp32 for the last layer of a
    cross-layer CLT (context_nnsight.compute_score), and its edge matrix [K + logits, n_active + (L + 1) P]; plus
    ~1.5 GB for the model, lazily loaded transcoders and the forward pass. n_active is ct_ray's count (same
    inputs, same active set: RESULTS.md, "Agreement")."""
    if a.ct_batch_size != "auto":
        return int(a.ct_batch_size)
    if not n_active or not a.max_rss_gb:
        return 512
    cfg = json.loads((clt_dir / "ct_ray.json").read_text())  # save_clt's config
    d, L = cfg["d_model"], cfg["n_layers"]
    k = min(mfn or n_active, n_active) + a.max_n_logits
    fixed = 4 * k * (n_active + (L + 1) * n_tokens) + 1.5 * 2**30
    bs = 512
    while bs > 1 and fixed + 4 * bs * n_active * d > 0.85 * a.max_rss_gb * 2**30:
        bs //= 2
    return bs


def run(a, repo: Path) -> int:
    if a.slowdown:
        idle, busy = (json.loads(Path(p).read_text()) for p in a.slowdown.split(","))
        print(slowdown_table(idle, busy))
        return 0
    work = Path(a.workdir or "/tmp/ct_ray_bench_lengths")
    work.mkdir(parents=True, exist_ok=True)
    span = None if a.span in (None, "none", "None") else int(a.span)
    clt_dir = prepare(work, a.features, a.firing_rate, span)
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    mfn = None if a.max_feature_nodes == "all" else int(a.max_feature_nodes)
    lengths = [int(x) for x in a.lengths.split(",")]
    me = str(Path(__file__).resolve())
    tok = {n: str(work / f"tokens-{n}.json") for n in lengths}
    (work / "tokens-spec.json").write_text(json.dumps({"model": MODEL, "lengths": tok}))
    subprocess.run([sys.executable, me, "--tokens", str(work / "tokens-spec.json")], env=env, check=True)
    use_ct = not a.no_ct
    why = ct_check(a.ct_venv) if use_ct else None
    if why:
        print(f"!! {why}: timing ct_ray only", flush=True)
        use_ct = False
    if use_ct:
        from ct_ray.models.loading import builtin_dir

        ct_model = ct_model_dir(builtin_dir(MODEL), work / "ct_model")
    rows, ct_stopped = [], None
    for n in lengths:
        tag = f"{n}-busy{a.busy}"
        spec = {"model": MODEL, "clt_dir": str(clt_dir), "tokens": tok[n], "max_feature_nodes": mfn,
                "batch_size": a.batch_size, "budget_gb": a.budget_gb, "threads": a.threads, "impl": a.impl}
        sp = work / f"spec-{n}.json"
        sp.write_text(json.dumps(spec))
        row = {"n_tokens": n, "busy": a.busy, "max_feature_nodes": mfn, "features": a.features,
               "firing_rate": a.firing_rate, "span": span, "impl": a.impl or "working tree"}
        row["ray"] = _measure("ct_ray", [sys.executable, me, sp.as_posix()], env, work / f"ray-{tag}.log", a, n)
        print(json.dumps(row["ray"]), flush=True)
        if use_ct and ct_stopped:  # longer prompts only take longer and need more memory
            row["ct"] = {"tool": "circuit-tracer", "n_tokens": n, "status": "not run", "error": ct_stopped}
        elif use_ct:
            out = work / f"ct-{tag}"
            out.mkdir(exist_ok=True)
            (out / "ct_meta.json").unlink(missing_ok=True)
            bs = ct_batch_size(a, row["ray"].get("n_active"), n, mfn, clt_dir)
            cmd = ct_command(a.ct_venv, ct_model, clt_dir, Path(tok[n]), out, batch_size=bs,
                             max_n_logits=a.max_n_logits, desired_logit_prob=a.desired_logit_prob,
                             max_feature_nodes=a.max_feature_nodes, warmup="none", threads=a.threads, no_dump=True)
            ct = _measure("circuit-tracer", cmd, ct_env(), work / f"ct-{tag}.log", a, n)
            if (out / "ct_meta.json").exists():
                ct.update(json.loads((out / "ct_meta.json").read_text()), status="ok")
                ct.pop("error", None)  # its last output line (a summary), taken for an error before the meta was read
                ct["n_active"] = ct.pop("n_active_features")
                ct.pop("tokens", None)
            ct["batch_size"] = bs
            if ct.get("status") != "ok":
                ct_stopped = f"circuit-tracer stopped at {n} tokens ({ct.get('status')}: {ct.get('error', '')[:80]})"
            row["ct"] = ct
            print(json.dumps(ct), flush=True)
        rows.append(row)
        if a.json:  # after every length: a long run killed later keeps what it measured
            Path(a.json).write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0


def _f(r: dict | None, k: str, fmt: str = "{:.0f}") -> str:
    return fmt.format(r[k]) if r and r.get(k) is not None else "-"


def _why(r: dict | None) -> str:
    if not r:
        return "not run"
    return r.get("status", "?") + (": " + r["error"][:160] if r.get("error") and r.get("status") != "ok" else "")


def table(rows) -> str:
    head = ("| tokens | active features (ct_ray / ct) | feature nodes (ct_ray / ct) | ct_ray s | circuit-tracer s "
            "| speedup | ct_ray peak MB | circuit-tracer peak MB | ct_ray attribution peak MB "
            "| circuit-tracer attribution peak MB | others' cores (ct_ray / ct) | ct_ray status | circuit-tracer status |")
    lines = [head, "|" + "---|" * 13]
    for row in rows:
        r, c = row.get("ray"), row.get("ct")
        ok = r and c and r.get("status") == "ok" and c.get("status") == "ok"
        speed = f"{c['seconds'] / r['seconds']:.1f}x" if ok else "-"
        lines.append("| " + " | ".join([
            str(row["n_tokens"]), f"{_f(r, 'n_active')} / {_f(c, 'n_active')}",
            f"{_f(r, 'n_features')} / {_f(c, 'n_features')}", _f(r, "seconds", "{:.1f}"), _f(c, "seconds", "{:.1f}"),
            speed, _f(r, "subprocess_peak_rss_mb"), _f(c, "subprocess_peak_rss_mb"),
            _f(r, "peak_rss_attribution_mb"), _f(c, "peak_rss_attribution_mb"),
            f"{_f(r, 'others_cores', '{:.1f}')} / {_f(c, 'others_cores', '{:.1f}')}", _why(r), _why(c)]) + " |")
    return "\n".join(lines)


def slowdown_table(idle: list, busy: list) -> str:
    """busy / idle wall time per tool and length, from two runs' --json."""
    by_n = {r["n_tokens"]: r for r in idle}
    lines = ["| tokens | busy processes | ct_ray s idle / busy | ct_ray slowdown | circuit-tracer s idle / busy "
             "| circuit-tracer slowdown | others' cores idle (ct_ray / ct) | others' cores busy (ct_ray / ct) |",
             "|" + "---|" * 8]
    for b in busy:
        i = by_n.get(b["n_tokens"])
        if not i:
            continue
        cells = [str(b["n_tokens"]), str(b["busy"])]
        for k in ("ray", "ct"):
            ti, tb = (i.get(k) or {}).get("seconds"), (b.get(k) or {}).get("seconds")
            cells += [f"{_f(i.get(k), 'seconds', '{:.1f}')} / {_f(b.get(k), 'seconds', '{:.1f}')}",
                      f"{tb / ti:.2f}x" if ti and tb else "-"]
        for r in (i, b):
            cells.append(f"{_f(r.get('ray'), 'others_cores', '{:.1f}')} / {_f(r.get('ct'), 'others_cores', '{:.1f}')}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "--tokens":
        tokens_worker(sys.argv[2])
    else:
        worker(sys.argv[1])
