"""circuit-tracer 0.5.0's side of the attribution benchmarks (benchmarks/attribution.py, attribution_lengths.py).

Two uses of one file:
  - run as a script by circuit-tracer's own venv python (`--ct-venv`, default /tmp/ct/venv): load the model and
    transcoders from disk, optionally a warm-up graph, then one timed `attribute`, and write `ct_meta.json` (time,
    CPU, contention, peak RSS) and, unless `--no-dump`, `ct_graph.safetensors` (adjacency and node metadata; never
    pickle). At module level it imports only the standard library, so that the ct_ray venv can import it too.
  - imported by the benchmark scripts (ct_ray venv): `ct_model_dir` (the model-directory shim for transformers
    4.57), `ct_env`, `ct_check` and `ct_command`.
Set-up notes (nnsight pin, the shim, absolute transcoder paths): benchmarks/RESULTS.md, "circuit-tracer set-up notes".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

INSTALL_HINT = ("python -m venv {v} && {v}/bin/pip install torch==2.13.0 && {v}/bin/pip install circuit-tracer==0.5.0 "
                "nnsight==0.6.3")


def busy_s() -> float:
    """CPU seconds all processes on the machine have spent so far (from /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def status_mb(field: str = "VmRSS") -> float:
    """A memory line of /proc/self/status in MB (VmRSS: now; VmHWM: the high-water mark since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_hwm() -> bool:
    """Reset VmHWM, so that a later peak is what came after this point (Linux >= 4.0; False where refused)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --- used by the benchmark scripts (ct_ray venv) ----------------------------------------------------------
def ct_model_dir(model_dir: Path, dest: Path) -> Path:
    """A copy of `model_dir` that transformers 4.57 (circuit-tracer's pin) reads the same way as ct_ray's
    transformers 5.x: the weights are symlinked, config/tokenizer JSON rewritten where 5.x changed them.

    - 5.x writes RoPE as `rope_parameters: {rope_theta, rope_type}`; 4.57 ignores that key and silently falls back
      to rope_theta=10000 (SmolLM2 uses 100000), giving a different model. We add `rope_theta`/`rope_scaling`.
    - 5.x writes `tokenizer_class: TokenizersBackend`, unknown to 4.57: we write `PreTrainedTokenizerFast`.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for p in model_dir.iterdir():
        if p.name in ("config.json", "tokenizer_config.json") or not p.is_file():
            continue
        link = dest / p.name
        if not link.exists():
            link.symlink_to(p.resolve())
    cfg = json.loads((model_dir / "config.json").read_text())
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" not in cfg:
        cfg["rope_theta"] = rp.get("rope_theta", 10000.0)
        if rp.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        else:
            cfg.setdefault("rope_scaling", None)
    (dest / "config.json").write_text(json.dumps(cfg, indent=1))
    tc_path = model_dir / "tokenizer_config.json"
    if tc_path.exists():
        tc = json.loads(tc_path.read_text())
        if tc.get("tokenizer_class") in ("TokenizersBackend", None):
            tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        (dest / "tokenizer_config.json").write_text(json.dumps(tc, indent=1))
    return dest


def ct_env() -> dict:
    """The environment for circuit-tracer's venv: none of ct_ray's paths, offline (no model hub here)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def ct_check(venv: str) -> str | None:
    """None when circuit-tracer imports in `venv`; else why not, with how to make the venv."""
    import subprocess

    py = Path(venv) / "bin" / "python"
    if not py.exists():
        return f"circuit-tracer venv not found at {venv} (no {py}); create one with: {INSTALL_HINT.format(v=venv)}"
    p = subprocess.run([str(py), "-c", "import circuit_tracer, nnsight"], env=ct_env(), capture_output=True, text=True)
    if p.returncode != 0:
        return (f"circuit-tracer is not importable in {venv}: {(p.stderr.strip().splitlines() or ['?'])[-1]} "
                "(circuit-tracer 0.5.0 needs nnsight>=0.6,<0.8, e.g. pip install nnsight==0.6.3)")
    return None


def ct_command(venv: str, model_dir: Path, clt_dir: Path, tokens_json: Path, out: Path, **opts) -> list[str]:
    """The command line that runs this driver in circuit-tracer's venv; `opts` are the driver's options
    (underscores for dashes; True for a flag)."""
    cmd = [str(Path(venv) / "bin" / "python"), str(Path(__file__).resolve()), "--model-dir", str(model_dir),
           "--transcoder-dir", str(Path(clt_dir).resolve()), "--tokens", str(tokens_json), "--out", str(out)]
    for k, v in opts.items():
        if v is True:
            cmd.append("--" + k.replace("_", "-"))
        elif v is not None and v is not False:
            cmd += ["--" + k.replace("_", "-"), str(v)]
    return cmd


# --- the driver (circuit-tracer venv) ---------------------------------------------------------------------
def main(argv=None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    ap = argparse.ArgumentParser(description="circuit-tracer side of benchmarks/attribution*.py: one graph")
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--transcoder-dir", required=True)
    ap.add_argument("--tokens", required=True, help="JSON list of token ids (BOS included)")
    ap.add_argument("--out", required=True, help="directory for ct_meta.json (and ct_graph.safetensors)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--max-n-logits", type=int, default=10)
    ap.add_argument("--desired-logit-prob", type=float, default=0.95)
    ap.add_argument("--max-feature-nodes", default="all", help="an integer, or 'all' (every active feature)")
    ap.add_argument("--warmup", default="light", choices=("light", "full", "none"))
    ap.add_argument("--warmup-features", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-dump", action="store_true", help="write ct_meta.json only, not the graph")
    a = ap.parse_args(argv)

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import circuit_tracer
    from circuit_tracer import ReplacementModel, attribute

    tokens = json.loads(Path(a.tokens).read_text())
    t0 = time.perf_counter()
    model = ReplacementModel.from_pretrained(a.model_dir, a.transcoder_dir, backend="nnsight",
                                             device=torch.device("cpu"), dtype=torch.float32)
    t_load = time.perf_counter() - t0
    rss_loaded = status_mb("VmRSS")
    kw = dict(max_n_logits=a.max_n_logits, desired_logit_prob=a.desired_logit_prob, batch_size=a.batch_size)
    mfn = None if a.max_feature_nodes == "all" else int(a.max_feature_nodes)
    t_warm = 0.0
    if a.warmup != "none":
        t1 = time.perf_counter()
        attribute(list(tokens), model, max_feature_nodes=(a.warmup_features if a.warmup == "light" else mfn), **kw)
        t_warm = time.perf_counter() - t1
    print("--- timed graph", file=sys.stderr, flush=True)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    reset = reset_hwm()
    load0 = os.getloadavg()[0]
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    b0 = busy_s()
    t1 = time.perf_counter()
    g = attribute(list(tokens), model, verbose=True, max_feature_nodes=mfn, **kw)
    t_attr = time.perf_counter() - t1
    b1 = busy_s()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    meta = {
        "seconds": t_attr, "cpu_seconds": cpu, "loadavg": [load0, os.getloadavg()[0]],
        "others_cores": max(0.0, (b1 - b0) - cpu) / t_attr, "warmup_seconds": t_warm, "load_seconds": t_load,
        "peak_rss_mb": ru1.ru_maxrss / 1024.0, "rss_loaded_mb": rss_loaded,
        "peak_rss_before_graph_mb": peak_before,
        "peak_rss_attribution_mb": status_mb("VmHWM") if reset else None,
        "tokens": [int(t) for t in g.input_tokens.tolist()],
        "logit_tokens": [int(t) for t in g.logit_token_ids.tolist()],
        "n_active_features": int(g.active_features.shape[0]),
        "n_features": int(g.selected_features.shape[0]),
        "n_nodes": int(g.adjacency_matrix.shape[0]),
        "max_feature_nodes": mfn,
        "threads": torch.get_num_threads(),
        "versions": {"circuit_tracer": circuit_tracer.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__,
                     "nnsight": __import__("nnsight").__version__},
    }
    if not a.no_dump:
        from safetensors.torch import save_file

        feats = g.active_features[g.selected_features].long()
        acts = g.activation_values[g.selected_features].float()
        save_file({"adjacency": g.adjacency_matrix.float().contiguous(), "features": feats.contiguous(),
                   "activations": acts.contiguous(), "logit_probs": g.logit_probabilities.float().contiguous()},
                  os.path.join(a.out, "ct_graph.safetensors"))
    Path(a.out, "ct_meta.json").write_text(json.dumps(meta))
    print(json.dumps({k: meta[k] for k in ("seconds", "peak_rss_mb", "n_nodes", "n_active_features")}), flush=True)


if __name__ == "__main__":
    main()
