"""GPU check: attribution, perturbation (graph validation) and CLT training on a CUDA device, against the CPU.

    python benchmarks/gpu_check.py --json gpu.json            # SmolLM2-135M, random CLT at realistic density
    python benchmarks/gpu_check.py --quick --device cpu       # tiny model, CPU only: a smoke run of this script

Stages (each timed; an error in one is recorded and the next still runs):
  attribution  per prompt, the same seeded CLT on the CPU and on the device: the replacement model reproduces the
               real logits on the device, every feature/logit row of the device graph sums to its target (the
               exactness invariant of tests/_attr_helpers.py), and the device graph equals the CPU graph
  perturb      `validate` (constrained ablations/steering of the top nodes of the pruned graph) on both
  train        trainer steps (`Shard.step`: loss, backward, clipping, fused Adam) at SmolLM2 shapes on both, and
               a short training of a CLT on the model's own activations (README/docs text) on the device
Nothing here downloads anything; the model is the built-in one (an installed package).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ct_ray import attribute, load_model, random_clt  # noqa: E402
from ct_ray.attribution.replacement import Replacement  # noqa: E402
from ct_ray.models.capture import capture  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "The capital of France is",
    "The Eiffel Tower is in the city of",
    "When Mary and John went to the store, John gave a drink to",
]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev):
    _sync(dev)
    t = time.perf_counter()
    out = fn()
    _sync(dev)
    return time.perf_counter() - t, out


def exactness(g, rtol: float = 1e-5) -> dict:
    """Feature and logit rows: incoming edges + constant == target value (Graph.residuals, as the tests check it)."""
    A = g.adjacency
    nF, nL, N = g.n_features, g.n_logits, g.n_nodes
    err, scale = g.residuals()
    return {"ok": bool(torch.all(err <= rtol * scale + 1e-6)) and not bool(A[nF : N - nL].any()),
            "max_rel_violation": float((err / (scale + 1e-12)).max())}


def logits_reproduced(model, clt, prompt) -> float:
    """max |replacement logits - real logits| / max |real logits| on the model's device."""
    cache = capture(model, model.encode(prompt))
    rep = Replacement(model, clt, cache)
    _, fin = rep.forward(rep.real_sources())
    return float((rep.logits(fin) - cache.logits).abs().max() / cache.logits.abs().max())


def _keys(g) -> list[tuple[int, int, int]]:
    cols = [g.column(c)[: g.n_features].tolist() for c in ("layer", "position", "feature")]
    return list(zip(*cols))


def compare(gc, gd) -> dict:
    """The device graph against the CPU graph: same nodes, and the adjacency on the shared nodes."""
    out = {"same_logits": gc.meta["logit_tokens"] == gd.meta["logit_tokens"]}
    kc, kd = _keys(gc), _keys(gd)
    out["feature_nodes_cpu"], out["feature_nodes_device"] = len(kc), len(kd)
    out["feature_overlap"] = len(set(kc) & set(kd)) / max(1, len(set(kc) | set(kd)))
    out["same_nodes"] = kc == kd and gc.n_nodes == gd.n_nodes
    if out["same_nodes"]:
        diff = (gc.adjacency - gd.adjacency).abs().max()
        out["adjacency_max_abs_diff_rel"] = float(diff / gc.adjacency.abs().max())
    return out


def stage_attribution(args, cpu_model, dev_model, clt_cpu, clt_dev, dev, res) -> dict:
    graphs = {}
    kw = dict(max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size)
    t_w, _ = _timed(lambda: attribute(dev_model, clt_dev, PROMPTS[0], **kw), dev)  # CUDA init, kernels, allocator
    res["attribution"] = {"warmup_device_s": t_w, "prompts": []}
    # the exactness invariant holds for a graph that keeps every active feature (dropped features' edges are not
    # in a selected graph): checked on the first prompt with max_feature_nodes=None, on both devices
    full = {"prompt": PROMPTS[0]}
    kw_full = dict(max_feature_nodes=None, batch_size=args.batch_size)
    full["cpu_s"], fc = _timed(lambda: attribute(cpu_model, clt_cpu, PROMPTS[0], **kw_full), torch.device("cpu"))
    full["device_s"], fd = _timed(lambda: attribute(dev_model, clt_dev, PROMPTS[0], **kw_full), dev)
    full["speedup"] = full["cpu_s"] / full["device_s"]
    full["n_active_features"], full["n_nodes"] = fd.meta["n_active_features"], fd.n_nodes
    full["exact_device"], full["exact_cpu"], full["vs_cpu"] = exactness(fd), exactness(fc), compare(fc, fd)
    print(json.dumps(full), flush=True)
    res["attribution"]["all_features"] = full
    del fc, fd
    cpu_spent = full["cpu_s"]
    for prompt in PROMPTS[: args.n_prompts]:
        row = {"prompt": prompt, "n_tokens": int(cpu_model.encode(prompt).numel())}
        row["logits_rel_err_device"] = logits_reproduced(dev_model, clt_dev, prompt)
        row["device_s"], gd = _timed(lambda p=prompt: attribute(dev_model, clt_dev, p, **kw), dev)
        gc = None
        if cpu_spent < args.cpu_budget_s:  # the CPU baseline of later prompts is skipped past the budget
            row["cpu_s"], gc = _timed(lambda p=prompt: attribute(cpu_model, clt_cpu, p, **kw), torch.device("cpu"))
            row["speedup"] = row["cpu_s"] / row["device_s"]
            cpu_spent += row["cpu_s"]
        row["n_active_features"] = gd.meta["n_active_features"]
        row["n_nodes"] = gd.n_nodes
        row["device_timings_s"] = gd.meta["timings_s"]
        row["vs_cpu"] = compare(gc, gd) if gc is not None else None
        row["top_logit"] = dev_model.decode([gd.meta["logit_tokens"][0]])[0]
        print(json.dumps(row), flush=True)
        res["attribution"]["prompts"].append(row)
        graphs[prompt] = (gc, gd)
    return graphs


def stage_perturb(args, cpu_model, dev_model, clt_cpu, clt_dev, dev, graphs, res) -> None:
    from ct_ray.perturb.validate import validate

    prompt = next(p for p, (gc, _) in graphs.items() if gc is not None)
    gc, gd = graphs[prompt]
    pc, pd = gc.prune(), gd.prune()
    out = {"prompt": prompt, "pruned_nodes_cpu": pc.n_nodes, "pruned_nodes_device": pd.n_nodes}
    kw = dict(top_k=args.top_k)
    _timed(lambda: validate(dev_model, clt_dev, pd, **kw), dev)  # warm-up
    out["cpu_s"], vc = _timed(lambda: validate(cpu_model, clt_cpu, pc, **kw), torch.device("cpu"))
    out["device_s"], vd = _timed(lambda: validate(dev_model, clt_dev, pd, **kw), dev)
    out["speedup"] = out["cpu_s"] / out["device_s"]
    out["n_interventions"] = vd.metrics["n_interventions"]
    keep = ("logit_spearman", "logit_sign_agreement", "feature_spearman", "kl_influence_spearman",
            "faithfulness_cosine")
    out["metrics_cpu"] = {k: vc.metrics[k] for k in keep}
    out["metrics_device"] = {k: vd.metrics[k] for k in keep}
    # the same intervention on the same graph, measured on both devices (the CPU graph validated on the device)
    same = validate(dev_model, clt_dev, pc, **kw)
    scale = float(vc.measured_logits.abs().max().clamp_min(1e-12))
    out["measured_logits_max_diff_rel"] = float((same.measured_logits - vc.measured_logits).abs().max()) / scale
    out["kl_max_abs_diff"] = float((same.kl - vc.kl).abs().max())
    print(json.dumps(out), flush=True)
    res["perturb"] = out


def _trainer_steps(dev, L, d, F, n, steps, l0) -> dict:
    from ct_ray.specs import OptimSpec
    from ct_ray.train.shard import Layout, Shard

    shard = Shard(Layout(L, d, F, None, "jumprelu", "resid_mid"),
                  OptimSpec(steps=1000, batch_tokens=n, lambda_final=1e-3), device=dev)
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(n, L, d, generator=g).to(dev), torch.randn(n, L, d, generator=g).to(dev)
    with torch.no_grad():  # bias so that about `l0` features fire per token and layer
        clt = shard.clt
        for l in range(L):
            h = xs[:, l] @ clt.W_enc[l].T
            clt.b_enc[l].copy_(clt.threshold[l] - torch.quantile(h[:, : min(F, 2**24 // n)], 1 - l0 / F, dim=0).mean())
    t_first, _ = _timed(lambda: shard.step(xs, ys, 1000), dev)
    t, stats = _timed(lambda: [shard.step(xs, ys, 1000) for _ in range(steps)][-1], dev)
    return {"features": F, "batch_tokens": n, "steps": steps, "first_step_s": t_first, "step_s": t / steps,
            "tokens_per_s": n * steps / t, "l0_per_layer": float(stats["l0"].mean())}


def _text_activations(model, n_tokens: int, root: Path, window: int = 128):
    """The model's own CLT inputs/targets on this repo's docs (no corpus download), BOS dropped."""
    from ct_ray.harvest.activations import harvest_batch

    text = "\n".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    ids = torch.tensor(model.tokenizer(text[:400_000], add_special_tokens=False)["input_ids"])
    rows = ids[: (len(ids) // window) * window].view(-1, window)[: max(1, n_tokens // window)]
    bos = model.tokenizer.bos_token_id if model.tokenizer is not None else None
    if bos is not None:
        rows = torch.cat([torch.full((len(rows), 1), bos), rows], 1)
    xs, ys = [], []
    for i in range(0, len(rows), 8):
        x, y = harvest_batch(model, rows[i : i + 8])
        xs.append(x[:, 1:].flatten(0, 1))
        ys.append(y[:, 1:].flatten(0, 1))
    return torch.cat(xs), torch.cat(ys)


def _short_training(model, dev, F, steps, batch, root: Path) -> dict:
    from ct_ray.specs import OptimSpec
    from ct_ray.train.data import norm_scales
    from ct_ray.train.shard import Layout, Shard

    t0 = time.perf_counter()
    xs, ys = _text_activations(model, n_tokens=16 * batch, root=root)
    keep = (xs.norm(dim=-1) <= 10 * xs.norm(dim=-1).median(0).values).all(-1)  # massive-activation tokens out
    xs, ys = xs[keep].float(), ys[keep].float()
    t_harvest = time.perf_counter() - t0
    L, d = xs.shape[1], xs.shape[2]
    sx, sy = (s.to(dev) for s in norm_scales(xs.norm(dim=-1).mean(0).tolist(), ys.norm(dim=-1).mean(0).tolist(), d))
    xs, ys = xs * sx[:, None], ys * sy[:, None]
    shard = Shard(Layout(L, d, F, None, "jumprelu", "resid_mid"),
                  OptimSpec(steps=steps, batch_tokens=batch, lr=1e-3, lambda_final=1e-4), device=dev)
    g = torch.Generator(device=xs.device).manual_seed(0)
    shard.init_from_data(xs[torch.randperm(len(xs), generator=g, device=xs.device)[:batch]])
    hist = []

    def run():
        for s in range(steps):
            idx = torch.randint(0, len(xs), (batch,), generator=g, device=xs.device)
            st = shard.step(xs[idx], ys[idx], steps)
            if s in (0, steps - 1):
                hist.append(shard.metrics(st, ys[idx]))

    t, _ = _timed(run, dev)
    first, last = hist[0], hist[-1]
    return {"tokens": len(xs), "features": F, "steps": steps, "batch_tokens": batch, "harvest_s": t_harvest,
            "train_s": t, "tokens_per_s": steps * batch / t, "fvu_first": first["fvu"], "fvu_last": last["fvu"],
            "l0_first": first["l0"] / L, "l0_last": last["l0"] / L}


def stage_train(args, dev_model, dev, res) -> None:
    L, d = dev_model.n_layers, dev_model.d_model
    out = {"shape": {"n_layers": L, "d_model": d}}
    out["cpu"] = _trainer_steps(torch.device("cpu"), L, d, args.train_features, args.train_batch, args.cpu_steps, 16)
    out["device"] = _trainer_steps(dev, L, d, args.train_features, args.train_batch, args.device_steps, 16)
    out["speedup"] = out["device"]["tokens_per_s"] / out["cpu"]["tokens_per_s"]
    out["device_large"] = _trainer_steps(dev, L, d, 2 * args.train_features, 4 * args.train_batch,
                                         args.device_steps, 32)
    print(json.dumps(out), flush=True)
    out["short_training"] = _short_training(dev_model, dev, args.train_features, args.short_steps, args.train_batch,
                                           Path(args.text_dir))
    print(json.dumps(out["short_training"]), flush=True)
    res["train"] = out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, small sizes (smoke run)")
    ap.add_argument("--features", type=int, default=4096, help="random CLT features per layer")
    ap.add_argument("--firing-rate", type=float, default=0.02, help="~80 active features per layer and token")
    ap.add_argument("--max-feature-nodes", type=int, default=7500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--n-prompts", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--train-features", type=int, default=4096)
    ap.add_argument("--train-batch", type=int, default=1024)
    ap.add_argument("--cpu-steps", type=int, default=3)
    ap.add_argument("--device-steps", type=int, default=20)
    ap.add_argument("--short-steps", type=int, default=300)
    ap.add_argument("--cpu-budget-s", type=float, default=60, help="CPU attribution baselines stop past this")
    ap.add_argument("--text-dir", default=str(ROOT), help="README.md and docs/*.md here: the training text")
    ap.add_argument("--stages", default="attribution,perturb,train")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.quick:
        args.features, args.max_feature_nodes, args.batch_size = 64, 200, 32
        args.train_features, args.train_batch, args.short_steps, args.device_steps = 128, 256, 30, 5
    dev = torch.device(args.device)
    res = {"command": " ".join(sys.argv), "torch": torch.__version__, "python": platform.python_version(),
           "device": args.device, "cpu_threads": torch.get_num_threads(), "errors": {}, "times_s": {}}
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(dev)
    t0 = time.perf_counter()
    if args.quick:
        from ct_ray.models.tiny import tiny_model

        cpu_model = tiny_model("llama")
        dev_model = tiny_model("llama")
        dev_model.model.to(dev)
    else:
        cpu_model = load_model(args.model)
        dev_model = load_model(args.model, device=str(dev))
    clt_cpu = random_clt(cpu_model, args.features, seed=0, firing_rate=args.firing_rate)
    clt_dev = random_clt(dev_model, args.features, seed=0, firing_rate=args.firing_rate)
    # the same seeded draws; the calibration reads each model's own activations (equal to fp32 round-off)
    res["clt_max_rel_diff"] = max(float((a - b.cpu()).abs().max() / a.abs().max().clamp_min(1e-30))
                                  for a, b in zip(clt_cpu.parameters(), clt_dev.parameters()))
    res["clt_on"] = str(next(clt_dev.parameters()).device)
    res["times_s"]["load"] = time.perf_counter() - t0
    res["settings"] = {k: v for k, v in vars(args).items() if k not in ("json", "stages")}
    print(json.dumps({k: v for k, v in res.items() if k != "errors"}), flush=True)

    graphs = {}
    stages = args.stages.split(",")
    for name in stages:
        t = time.perf_counter()
        try:
            if name == "attribution":
                graphs = stage_attribution(args, cpu_model, dev_model, clt_cpu, clt_dev, dev, res)
            elif name == "perturb":
                if not graphs:
                    raise RuntimeError("no graphs (the attribution stage failed or did not run)")
                stage_perturb(args, cpu_model, dev_model, clt_cpu, clt_dev, dev, graphs, res)
            elif name == "train":
                stage_train(args, dev_model, dev, res)
            else:
                raise SystemExit(f"unknown stage {name!r}")
        except Exception as e:  # recorded; the next stage still runs
            res["errors"][name] = "".join(traceback.format_exception(e))[-4000:]
            print(f"stage {name} failed:\n{res['errors'][name]}", flush=True)
        res["times_s"][name] = time.perf_counter() - t
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
    if dev.type == "cuda":
        res["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    print(json.dumps({"errors": list(res["errors"]), "times_s": res["times_s"]}), flush=True)
    sys.exit(1 if res["errors"] else 0)


if __name__ == "__main__":
    main()
