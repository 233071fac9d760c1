"""Attribution benchmark: ct_ray vs circuit-tracer 0.5.0 on the same model, CLT and token ids.

For every case the benchmark
  1. prepares the inputs once (in a subprocess): the model as a local HF directory (a tiny Llama written with
     `save_tiny`, or the cached SmolLM2-135M conversion), a seeded `random_clt` written with `save_clt`
     (cross-layer) or `save_transcoder_set` (per-layer), and the prompt's token ids (BOS included);
  2. times ct_ray in a fresh subprocess: load model + CLT from disk, a warm-up attribution, then `--repeats`
     timed attributions; peak RSS is the subprocess's own `ru_maxrss`;
  3. times circuit-tracer in its own virtual environment (`--ct-venv`) in a fresh subprocess running a small
     driver (benchmarks/ct_driver.py) with the nnsight backend, the same model directory, the same
     transcoder directory and the same token ids, with the same warm-up; it dumps its adjacency matrix and
     node metadata as safetensors + JSON (never pickle);
  4. compares the two graphs after aligning node order (features by (layer, position, index), logits by token).

    python benchmarks/attribution.py            # full run (tiny-plt, tiny-clt, smollm2-clt, smollm2-plt; ~11 min)
    python benchmarks/attribution.py --quick    # small smoke configuration (tiny model only, ~1 minute)
    python benchmarks/attribution.py --heads    # head loadings and QK attribution vs attribution (attention.py)
    python benchmarks/attribution.py --lengths 16,32,64 --json idle.json   # peak RSS and time vs prompt length,
        # ct_ray and circuit-tracer, SmolLM2 with a realistic-density CLT (benchmarks/attribution_lengths.py)

Numbers are wall-clock seconds for one attribution graph (model loading excluded; ct_ray: best and median of
--repeats graphs, circuit-tracer: one graph; speedup and CPU columns use ct_ray's best graph),
the CPU seconds (user + system, all threads) the measuring process spent on that graph, the cores other processes
kept busy meanwhile (from /proc/stat; the machine may be shared, and wall times are only meaningful when that is
near 0: OpenMP threads that wait for a descheduled sibling can make a graph 10x slower, and burn CPU time while they
spin, so CPU seconds are inflated too), and the peak resident memory of the whole
measuring process (model + CLT + attribution); "attr" memory is that peak minus the resident memory right after
loading, i.e. roughly what attribution itself added.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ct_driver import busy_s as _busy_s  # benchmarks/ is on sys.path: the script's directory
from ct_driver import ct_check, ct_command, ct_env, ct_model_dir
from ct_driver import status_mb as _proc_status_mb

REPO = Path(__file__).resolve().parents[1]

# --- configurations ---------------------------------------------------------------------------------------
TINY_FULL = dict(n_layers=8, d_model=256, n_heads=4, n_kv_heads=2, d_mlp=1024, vocab=258, max_pos=128)
TINY_QUICK = dict(n_layers=3, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, vocab=258, max_pos=128)

TINY_PROMPT = "The quick brown fox jumps over the lazy dog."  # 44 bytes + BOS = 45 positions
SMOL_PROMPT = "The quick brown fox jumps over the lazy"  # 8 tokens + BOS = 9 positions

FULL_CASES = {
    "tiny-plt": dict(model="tiny", span=1, n_features=4096, firing_rate=0.001, prompt=TINY_PROMPT),
    "tiny-clt": dict(model="tiny", span=None, n_features=4096, firing_rate=0.001, prompt=TINY_PROMPT),
    "smollm2-clt": dict(model="smollm2-135m", span=None, n_features=1024, firing_rate=0.003, prompt=SMOL_PROMPT),
    "smollm2-plt": dict(model="smollm2-135m", span=1, n_features=1024, firing_rate=0.003, prompt=SMOL_PROMPT),
}
DEFAULT_CASES = ["tiny-plt", "tiny-clt", "smollm2-clt", "smollm2-plt"]
QUICK_CASES = {
    "tiny-plt": dict(model="tiny", span=1, n_features=512, firing_rate=0.01, prompt="Hello, world"),
    "tiny-clt": dict(model="tiny", span=None, n_features=512, firing_rate=0.01, prompt="Hello, world"),
}
LIGHT_WARMUP_FEATURES = 16  # warm-up graph: same prompt, max_feature_nodes=16 (exercises every code path)


def _wait_idle(max_wait: float, busy_below: float = 0.3, window: float = 3.0) -> float:
    """Wait (at most `max_wait` s) until other processes use less than `busy_below` cores over `window` s;
    returns the cores in use in the last window."""
    t0 = time.perf_counter()
    while True:
        b0 = _busy_s()
        time.sleep(window)
        used = (_busy_s() - b0) / window
        if used < busy_below or time.perf_counter() - t0 >= max_wait:
            return used


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _rss_mb() -> float:
    return _proc_status_mb("VmRSS")


# =========================================================================================================
# workers (run in fresh subprocesses of this script, in the ct_ray venv)
# =========================================================================================================
def _worker_prepare(case_dir: Path) -> None:
    """Write model dir (tiny) , CLT dir and tokens for one case; description in case.json."""
    import torch

    import ct_ray
    from ct_ray.models.loading import builtin_dir
    from ct_ray.models.tiny import save_tiny

    spec = json.loads((case_dir / "spec.json").read_text())
    if spec["model"] == "tiny":
        model_dir = Path(spec["tiny_dir"])
        if not (model_dir / "config.json").exists():
            save_tiny("llama", model_dir, seed=0, **spec["tiny_cfg"])
    else:
        model_dir = builtin_dir(spec["model"])
    lm = ct_ray.load_model(str(model_dir))
    clt = ct_ray.random_clt(lm, spec["n_features"], seed=0, span=spec["span"], firing_rate=spec["firing_rate"])
    clt_dir = case_dir / "clt"
    if spec["span"] == 1:
        ct_ray.save_transcoder_set(clt, str(clt_dir))
    else:
        ct_ray.save_clt(clt, str(clt_dir))
    tokens = lm.encode(spec["prompt"]).tolist()
    info = {"model_dir": str(model_dir), "clt_dir": str(clt_dir), "tokens": tokens,
            "token_strs": lm.decode(tokens), "n_layers": lm.n_layers, "d_model": lm.d_model,
            "torch": torch.__version__}
    (case_dir / "tokens.json").write_text(json.dumps(tokens))
    (case_dir / "case.json").write_text(json.dumps(info))


def _worker_ctray(case_dir: Path) -> None:
    """Time ct_ray on one case; dump its graph for comparison."""
    import torch
    from safetensors.torch import save_file

    import ct_ray

    spec = json.loads((case_dir / "spec.json").read_text())
    info = json.loads((case_dir / "case.json").read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    lm = ct_ray.load_model(info["model_dir"])
    clt = ct_ray.load_clt(info["clt_dir"])
    t_load = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    tokens = info["tokens"]
    kw = dict(max_n_logits=spec["max_n_logits"], desired_logit_prob=spec["desired_logit_prob"],
              batch_size=spec["batch_size"], max_feature_nodes=None)  # every feature, as circuit-tracer's run
    t_warm = 0.0
    if spec["warmup"] != "none":
        kw.pop("max_feature_nodes")
        t1 = time.perf_counter()
        ct_ray.attribute(lm, clt, tokens,
                         max_feature_nodes=LIGHT_WARMUP_FEATURES if spec["warmup"] == "light" else None, **kw)
        t_warm = time.perf_counter() - t1
    kw["max_feature_nodes"] = None
    times, cpus, loads, others = [], [], [], []
    g = None
    for _ in range(max(1, spec["repeats"])):
        del g
        load0 = os.getloadavg()[0]
        c0, b0 = _cpu_s(), _busy_s()
        t1 = time.perf_counter()
        g = ct_ray.attribute(lm, clt, tokens, **kw)
        times.append(time.perf_counter() - t1)
        cpus.append(_cpu_s() - c0)
        others.append(max(0.0, (_busy_s() - b0) - cpus[-1]) / times[-1])
        loads += [load0, os.getloadavg()[0]]
    med = sorted(range(len(times)), key=times.__getitem__)[len(times) // 2]
    nodes = g.nodes
    kind = nodes.column("kind").to_pylist()
    nF = kind.count("feature")
    feats = torch.stack([torch.tensor(nodes.column(c).to_pylist()[:nF], dtype=torch.long)
                         for c in ("layer", "position", "feature")], 1)
    acts = torch.tensor(nodes.column("activation").to_pylist()[:nF], dtype=torch.float32)
    save_file({"adjacency": g.adjacency.float().contiguous(), "features": feats.reshape(nF, 3).contiguous(),
               "activations": acts, "logit_probs": torch.tensor(g.meta["logit_probs"], dtype=torch.float32)},
              str(case_dir / "ray_graph.safetensors"))
    meta = {
        "seconds": times[med], "cpu_seconds": cpus[med], "all_seconds": times, "all_cpu_seconds": cpus,
        "loadavg": [min(loads), max(loads)], "others_cores": others[med], "all_others_cores": others,
        "best_seconds": min(times), "warmup_seconds": t_warm,
        "load_seconds": t_load, "peak_rss_mb": _peak_rss_mb(), "rss_loaded_mb": rss_loaded,
        "tokens": g.meta["tokens"], "logit_tokens": g.meta["logit_tokens"],
        "n_active_features": g.meta["n_active_features"], "n_nodes": g.n_nodes,
        "timings_s": g.meta["timings_s"], "threads": torch.get_num_threads(),
        "kinds": {k: kind.count(k) for k in ("feature", "error", "embedding", "logit")},
        "versions": {"ct_ray": ct_ray.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
    }
    (case_dir / "ray_meta.json").write_text(json.dumps(meta))
    print(json.dumps({k: meta[k] for k in ("seconds", "peak_rss_mb", "n_nodes", "n_active_features")}))


# =========================================================================================================
# comparison
# =========================================================================================================
def compare(case_dir: Path, n_layers: int) -> dict:
    import torch
    from safetensors.torch import load_file

    r = load_file(str(case_dir / "ray_graph.safetensors"))
    c = load_file(str(case_dir / "ct_graph.safetensors"))
    rm = json.loads((case_dir / "ray_meta.json").read_text())
    cm = json.loads((case_dir / "ct_meta.json").read_text())
    A_r, A_c = r["adjacency"].double(), c["adjacency"].double()
    P = len(rm["tokens"])
    out: dict = {
        "same_tokens": rm["tokens"] == cm["tokens"],
        "n_nodes": (A_r.shape[0], A_c.shape[0]),
        "same_n_nodes": A_r.shape[0] == A_c.shape[0],
        "n_active": (rm["n_active_features"], cm["n_active_features"]),
        "logits": (rm["logit_tokens"], cm["logit_tokens"]),
        "same_logits": rm["logit_tokens"] == cm["logit_tokens"],
        "same_logit_set": sorted(rm["logit_tokens"]) == sorted(cm["logit_tokens"]),
        "logit_prob_max_abs_diff": None,
    }
    fr = [tuple(x) for x in r["features"].tolist()]
    fc = [tuple(x) for x in c["features"].tolist()]
    set_r, set_c = set(fr), set(fc)
    common = sorted(set_r & set_c)
    out["same_features"] = set_r == set_c
    out["same_order"] = fr == fc and rm["logit_tokens"] == cm["logit_tokens"]
    out["features_only_ray"], out["features_only_ct"] = len(set_r - set_c), len(set_c - set_r)
    if not out["same_tokens"] or not common and (fr or fc):
        out["note"] = "inputs differ: adjacency not compared"
        return out
    # aligned index lists: common features, then errors + embeddings (same layout), then common logits
    ir = {f: i for i, f in enumerate(fr)}
    ic = {f: i for i, f in enumerate(fc)}
    nFr, nFc = len(fr), len(fc)
    n_mid = n_layers * P + P
    lr, lc = rm["logit_tokens"], cm["logit_tokens"]
    lcommon = [t for t in lr if t in lc]
    idx_r = [ir[f] for f in common] + list(range(nFr, nFr + n_mid)) + [nFr + n_mid + lr.index(t) for t in lcommon]
    idx_c = [ic[f] for f in common] + list(range(nFc, nFc + n_mid)) + [nFc + n_mid + lc.index(t) for t in lcommon]
    ti_r, ti_c = torch.tensor(idx_r), torch.tensor(idx_c)
    B_r, B_c = A_r[ti_r][:, ti_r], A_c[ti_c][:, ti_c]
    D = (B_r - B_c).abs()
    scale = B_c.abs().max().item()
    out["adj_max_abs_diff"] = D.max().item()
    out["adj_max_abs"] = scale
    out["adj_rel_max"] = D.max().item() / scale if scale else float("nan")
    out["adj_rel_fro"] = ((B_r - B_c).norm() / B_c.norm()).item() if B_c.norm() > 0 else float("nan")
    out["nnz"] = (int((B_r != 0).sum()), int((B_c != 0).sum()))
    # per-block breakdown (targets x sources)
    nf = len(common)
    bounds = {"feature": (0, nf), "error": (nf, nf + n_layers * P), "embedding": (nf + n_layers * P, nf + n_mid),
              "logit": (nf + n_mid, nf + n_mid + len(lcommon))}
    blocks = {}
    for tk, (t0, t1) in bounds.items():
        for sk, (s0, s1) in bounds.items():
            if t1 > t0 and s1 > s0:
                sub_c = B_c[t0:t1, s0:s1]
                sub_d = D[t0:t1, s0:s1]
                if sub_c.abs().max() > 0 or sub_d.max() > 0:
                    blocks[f"{tk}<-{sk}"] = {"max_abs_diff": sub_d.max().item(), "max_abs": sub_c.abs().max().item(),
                                             "rel_fro": (sub_d.norm() / sub_c.norm()).item() if sub_c.norm() > 0
                                             else float("nan")}
    out["blocks"] = blocks
    # worst entry, described
    k = int(D.argmax())
    t, s = divmod(k, D.shape[1])

    def describe(i):
        for kname, (a, b) in bounds.items():
            if a <= i < b:
                j = i - a
                if kname == "feature":
                    return f"feature{common[j]}"
                if kname == "error":
                    return f"error(layer={j // P}, pos={j % P})"
                if kname == "embedding":
                    return f"embedding(pos={j})"
                return f"logit(token={lcommon[j]})"
        return str(i)

    out["worst"] = {"target": describe(t), "source": describe(s), "ray": B_r[t, s].item(), "ct": B_c[t, s].item()}
    # activations of the common features
    ar = r["activations"][[ir[f] for f in common]]
    ac = c["activations"][[ic[f] for f in common]]
    out["act_max_abs_diff"] = (ar - ac).abs().max().item() if len(common) else 0.0
    pr, pc = r["logit_probs"], c["logit_probs"]
    if out["same_logits"]:
        out["logit_prob_max_abs_diff"] = (pr - pc).abs().max().item()
    return out


# =========================================================================================================
# driver
# =========================================================================================================
def _run(cmd: list[str], env: dict | None = None, log: Path | None = None, timeout: float | None = None) -> tuple[int, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if log is not None:
        log.write_text(f"$ {' '.join(cmd)}\n# {time.perf_counter() - t0:.1f}s rc={p.returncode}\n--- stdout\n"
                       f"{p.stdout}\n--- stderr\n{p.stderr}")
    return p.returncode, (p.stdout + p.stderr)


def _ct_phases(log: str) -> dict:
    """circuit-tracer's own phase timings of the timed graph (from its verbose log)."""
    import re

    tail = log.split("--- timed graph", 1)[-1]
    return {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^(.+?) completed in ([\d.]+)s", tail, re.M)}


def _fmt(x, nd=2):
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:
            return "nan"
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.2e}"
        return f"{x:.{nd}f}"
    return str(x)


def table(rows: list[dict]) -> str:
    head = ["case", "pos", "active feats", "nodes (ray/ct)", "ct_ray s best (median)", "circuit-tracer s",
            "speedup (ct/ray best)", "ct_ray CPU s", "ct CPU s", "CPU ratio", "other procs' cores (ray/ct)",
            "ct_ray peak MB (attr)", "ct peak MB (attr)", "same nodes", "same features", "same logits",
            "max abs diff A", "rel err A (fro)", "rel err A (max)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cmp_ = r.get("cmp") or {}
        ray, ct = r.get("ray") or {}, r.get("ct") or {}
        best = None
        if ray.get("all_seconds"):
            bi = min(range(len(ray["all_seconds"])), key=ray["all_seconds"].__getitem__)
            best = {"seconds": ray["all_seconds"][bi], "cpu_seconds": ray["all_cpu_seconds"][bi],
                    "others_cores": ray["all_others_cores"][bi]}
        speed = (ct["seconds"] / best["seconds"]) if best and ct.get("seconds") else None
        cspeed = (ct["cpu_seconds"] / best["cpu_seconds"]) if best and ct.get("cpu_seconds") else None
        load = f"{_fmt((best or {}).get('others_cores'), 1)}/{_fmt(ct.get('others_cores'), 1)}"
        ray_s = f"{_fmt(best['seconds'])} ({_fmt(ray['seconds'])})" if best else "-"
        mem = lambda m: f"{m['peak_rss_mb']:.0f} ({m['peak_rss_mb'] - m['rss_loaded_mb']:.0f})" if m else "-"
        nodes = f"{ray.get('n_nodes', '-')}/{ct.get('n_nodes', '-')}"
        vals = [r["case"], str(len(ray.get("tokens", [])) or "-"), _fmt(ray.get("n_active_features")), nodes,
                ray_s, _fmt(ct.get("seconds")), _fmt(speed, 1) + ("x" if speed else ""),
                _fmt((best or {}).get("cpu_seconds")), _fmt(ct.get("cpu_seconds")), _fmt(cspeed, 1) + ("x" if cspeed else ""),
                load, mem(ray), mem(ct), _fmt(cmp_.get("same_n_nodes")), _fmt(cmp_.get("same_features")),
                _fmt(cmp_.get("same_logits")), _fmt(cmp_.get("adj_max_abs_diff")), _fmt(cmp_.get("adj_rel_fro")),
                _fmt(cmp_.get("adj_rel_max"))]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small smoke configuration (tiny 3-layer model only)")
    ap.add_argument("--cases", default=None,
                    help=f"comma-separated cases (full: {', '.join(FULL_CASES)}; default {','.join(DEFAULT_CASES)})")
    ap.add_argument("--ct-venv", default="/tmp/ct/venv", help="virtual environment with circuit-tracer 0.5.0")
    ap.add_argument("--no-ct", action="store_true", help="time ct_ray only")
    ap.add_argument("--batch-size", type=int, default=128, help="ct_ray target batch size")
    ap.add_argument("--ct-batch-size", default="512",
                    help="circuit-tracer batch size (its default: 512); with --lengths also 'auto' (what fits --max-rss-gb)")
    ap.add_argument("--max-n-logits", type=int, default=10)
    ap.add_argument("--desired-logit-prob", type=float, default=0.95)
    ap.add_argument("--repeats", type=int, default=3, help="timed ct_ray graphs per case (median reported)")
    ap.add_argument("--warmup", choices=("light", "full", "none"), default="light",
                    help=f"warm-up graph before timing: light = same prompt with max_feature_nodes="
                         f"{LIGHT_WARMUP_FEATURES} (both tools), full = the full graph")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads for both tools (default: torch's default, one per core)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before each measurement wait up to S seconds for the machine to be idle (other processes "
                         "using < 0.3 cores); the table reports the cores other processes used during each timed graph")
    ap.add_argument("--workdir", default=None, help="keep inputs/outputs here (default: a temporary directory)")
    ap.add_argument("--json", default=None, help="write all results to this JSON file")
    ap.add_argument("--timeout", type=float, default=1800, help="per-subprocess timeout, seconds")
    g = ap.add_argument_group("prompt length scaling (benchmarks/attribution_lengths.py; both tools unless --no-ct)")
    g.add_argument("--lengths", default=None, help="comma-separated prompt lengths in tokens, e.g. 16,32,64,128")
    g.add_argument("--features", type=int, default=2048, help="CLT features per layer")
    g.add_argument("--firing-rate", type=float, default=0.02, help="random_clt firing_rate")
    g.add_argument("--span", default=None, help="CLT decoder span (default: full cross-layer)")
    g.add_argument("--max-feature-nodes", default="7500", help="an integer, or 'all'")
    g.add_argument("--budget-gb", type=float, default=None, help="attribute(memory_budget=...) in GiB")
    g.add_argument("--busy", type=int, default=0, help="processes burning a core each beside every measurement")
    g.add_argument("--impl", default=None, help="another attribute.py to time instead of the working tree's")
    g.add_argument("--max-rss-gb", type=float, default=12.0,
                   help="kill a measurement whose resident memory passes this (recorded as killed); 0: no limit")
    g.add_argument("--slowdown", default=None, metavar="IDLE.json,BUSY.json",
                   help="print busy/idle time per tool and length from two --lengths runs' --json, then exit")
    ap.add_argument("--heads", action="store_true",
                    help="attention attribution mode: head loadings and QK vs attribution time (benchmarks/attention.py)")
    ap.add_argument("--_worker", choices=("prepare", "ctray"), help=argparse.SUPPRESS)
    ap.add_argument("--_case-dir", help=argparse.SUPPRESS)
    a, rest = ap.parse_known_args(argv)
    if a.heads:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import attention

        return attention.main(rest + (["--json", a.json] if a.json else []))
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")

    if a.lengths or a.slowdown:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import attribution_lengths

        return attribution_lengths.run(a, REPO)
    if a._worker:
        {"prepare": _worker_prepare, "ctray": _worker_ctray}[a._worker](Path(a._case_dir))
        return 0

    catalog = QUICK_CASES if a.quick else FULL_CASES
    names = a.cases.split(",") if a.cases else (list(QUICK_CASES) if a.quick else DEFAULT_CASES)
    for n in names:
        if n not in catalog:
            ap.error(f"unknown case {n!r} (choose from {', '.join(catalog)})")
    tiny_cfg = TINY_QUICK if a.quick else TINY_FULL

    use_ct = not a.no_ct
    why = ct_check(a.ct_venv) if use_ct else None
    if why:
        print(f"!! {why}: skipping the comparison.", flush=True)
        use_ct = False

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="ct_ray_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    tiny_dir = work / ("tiny-llama-quick" if a.quick else "tiny-llama")
    env_ray = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "TOKENIZERS_PARALLELISM": "false"}
    env_ct = ct_env()

    print(f"work dir: {work}", flush=True)
    rows = []
    t_start = time.perf_counter()
    for name in names:
        c = catalog[name]
        case_dir = work / name
        case_dir.mkdir(exist_ok=True)
        spec = {**c, "name": name, "tiny_cfg": tiny_cfg, "tiny_dir": str(tiny_dir), "batch_size": a.batch_size,
                "max_n_logits": a.max_n_logits, "desired_logit_prob": a.desired_logit_prob, "repeats": a.repeats,
                "threads": a.threads,
                "warmup": a.warmup}
        (case_dir / "spec.json").write_text(json.dumps(spec))
        row: dict = {"case": name, "spec": spec}
        rows.append(row)
        me = [sys.executable, str(Path(__file__).resolve()), "--_case-dir", str(case_dir)]
        print(f"== {name}: preparing", flush=True)
        rc, txt = _run(me + ["--_worker", "prepare"], env_ray, case_dir / "prepare.log", a.timeout)
        if rc != 0:
            print(f"!! prepare failed (see {case_dir / 'prepare.log'}):\n{txt[-2000:]}", flush=True)
            row["error"] = "prepare failed"
            continue
        info = json.loads((case_dir / "case.json").read_text())
        row["info"] = {k: info[k] for k in ("n_layers", "d_model", "tokens")}
        print(f"== {name}: ct_ray", flush=True)
        if a.wait_idle:
            print(f"   machine busy: {_wait_idle(a.wait_idle):.2f} cores in use by others before start", flush=True)
        rc, txt = _run(me + ["--_worker", "ctray"], env_ray, case_dir / "ctray.log", a.timeout)
        if rc != 0:
            print(f"!! ct_ray failed (see {case_dir / 'ctray.log'}):\n{txt[-2000:]}", flush=True)
            row["error"] = "ct_ray failed"
        else:
            row["ray"] = json.loads((case_dir / "ray_meta.json").read_text())
            print(f"   {row['ray']['seconds']:.2f}s ({row['ray']['cpu_seconds']:.2f} CPU-s), "
                  f"{row['ray']['n_active_features']} active features, "
                  f"{row['ray']['n_nodes']} nodes, peak {row['ray']['peak_rss_mb']:.0f} MB", flush=True)
        if use_ct:
            print(f"== {name}: circuit-tracer", flush=True)
            mdir = ct_model_dir(Path(info["model_dir"]), case_dir / "ct_model")
            cmd = ct_command(a.ct_venv, mdir, Path(info["clt_dir"]), case_dir / "tokens.json", case_dir,
                             batch_size=int(a.ct_batch_size), max_n_logits=a.max_n_logits,
                             desired_logit_prob=a.desired_logit_prob, warmup=a.warmup,
                             warmup_features=LIGHT_WARMUP_FEATURES, threads=a.threads)
            if a.wait_idle:
                print(f"   machine busy: {_wait_idle(a.wait_idle):.2f} cores in use by others before start", flush=True)
            rc, txt = _run(cmd, env_ct, case_dir / "ct.log", a.timeout)
            if rc != 0:
                print(f"!! circuit-tracer failed (see {case_dir / 'ct.log'}):\n{txt[-3000:]}", flush=True)
                row["ct_error"] = txt[-3000:]
            else:
                row["ct"] = json.loads((case_dir / "ct_meta.json").read_text())
                row["ct"]["phases"] = _ct_phases(txt)
                print(f"   {row['ct']['seconds']:.2f}s ({row['ct']['cpu_seconds']:.2f} CPU-s), "
                  f"{row['ct']['n_active_features']} active features, "
                      f"{row['ct']['n_nodes']} nodes, peak {row['ct']['peak_rss_mb']:.0f} MB", flush=True)
                if "ray" in row:
                    row["cmp"] = compare(case_dir, info["n_layers"])
                    cm = row["cmp"]
                    print(f"   agreement: same nodes {cm['same_n_nodes']}, same features {cm['same_features']}, "
                          f"same logits {cm['same_logits']}, max|dA| {_fmt(cm.get('adj_max_abs_diff'))}, "
                          f"rel err {_fmt(cm.get('adj_rel_fro'))}", flush=True)

    total = time.perf_counter() - t_start
    print()
    print(f"# Attribution benchmark ({'quick' if a.quick else 'full'}), {_dt.date.today()}, "
          f"{os.cpu_count()} CPU cores, {platform.machine()}, torch threads {a.threads or 'default'}, "
          f"total {total:.0f}s")
    print(table(rows))
    for r in rows:
        cm = r.get("cmp")
        if not cm:
            continue
        print(f"\n{r['case']}: logits ray={cm['logits'][0]} ct={cm['logits'][1]}; "
              f"active ray/ct={cm['n_active'][0]}/{cm['n_active'][1]} (only ray {cm['features_only_ray']}, "
              f"only ct {cm['features_only_ct']}); activation max|d| {_fmt(cm.get('act_max_abs_diff'))}; "
              f"logit prob max|d| {_fmt(cm.get('logit_prob_max_abs_diff'))}; nnz ray/ct {cm.get('nnz')}")
        ph = r["ct"].get("phases") or {}
        if ph:
            print("  circuit-tracer phases (s): " + ", ".join(f"{k}: {v:.1f}" for k, v in ph.items()))
        rt = r["ray"].get("timings_s") or {}
        print("  ct_ray phases (s): " + ", ".join(f"{k}: {v:.2f}" for k, v in rt.items())
              + f"; all timed runs {[round(x, 2) for x in r['ray']['all_seconds']]} s wall, "
              f"{[round(x, 2) for x in r['ray']['all_cpu_seconds']]} s CPU; same node order {cm['same_order']}")
        if "worst" in cm:
            w = cm["worst"]
            print(f"  worst entry: {w['target']} <- {w['source']}: ray {w['ray']:.6g}, ct {w['ct']:.6g}")
        for b, v in (cm.get("blocks") or {}).items():
            print(f"  {b:22s} max|d| {_fmt(v['max_abs_diff'])}  max|A| {_fmt(v['max_abs'])}  "
                  f"rel(fro) {_fmt(v['rel_fro'])}")
    if a.json:
        Path(a.json).write_text(json.dumps({"date": str(_dt.date.today()), "cores": os.cpu_count(),
                                            "argv": sys.argv, "total_s": total, "rows": rows}, indent=1,
                                           default=str))
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
