"""Graph diff benchmark: sweeps of the same prompts with two CLTs (and a CLT against itself), diffed (`ct-ray diff`).

Three sweeps of the same prompts into one store: A (CLT A), A-copy (CLT A again, from a copy at another path: a
different CLT id, so its features are matched by decoder) and B (CLT B). Then, timed:
  1. A..A      the sweep against itself: every delta must be exactly zero (asserted);
  2. A..A-copy the decoder matching path on identical CLTs: every feature must be found again (cosine 1), no change;
  3. A..B      the comparison the issue asks for (two CLTs trained with different seeds, or, by default, two random
               CLTs: those share no feature, so the matched share is ~0 by construction).
Printed: each diff's summary (`format_summary`), its timings (plan = reading graphs rows + planning the data files,
diff = reading nodes/edges batch by batch + matching + comparing, of which loading CLTs and decoder matching,
write = the graph_diffs commit) and a JSON line with the numbers.

The sweeps run in this process by default (the sweep's own worker and committer, the rows run_sweep writes, no Ray
start-up: on 2 cores that is the difference between one minute and several); `--ray` runs them with run_sweep. With
`--workdir`, sweeps already in its store are not run again (re-time the diffs alone).

    .venv/bin/python benchmarks/diff.py                         # tiny model, random CLTs (seeds 1, 2), 32 prompts (~1 min)
    .venv/bin/ct-ray train /tmp/ctdiff/train_s1.yaml            # two SmolLM2 CLTs, optim.seed 1 and 2 (see
    .venv/bin/ct-ray train /tmp/ctdiff/train_s2.yaml            #   docs/analysis-diff.md for the specs)
    .venv/bin/python benchmarks/diff.py --model smollm2-135m --clt-a /tmp/ctdiff/clts/seed1 --clt-b /tmp/ctdiff/clts/seed2
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "benchmarks"))
from sweep import PROMPTS as SWEEP_PROMPTS  # noqa: E402  (the sweep benchmark's 24, plus 8 to reach 32)

PROMPTS = [*SWEEP_PROMPTS, "The capital of Japan is", "Two plus two equals", "The color of the sky is",
           "Birds can fly because they have", "The author of Hamlet is", "Snow is white and coal is",
           "The opposite of big is", "A, B, C, D,"]
ZERO = ("replacement_delta", "completeness_delta", "top_prob_delta", "logit_prob_l1", "edge_change_l1",
        "edge_change_rel")


def prepare(args, work: Path) -> tuple[str, str, str, str]:
    """(model, CLT A, a copy of CLT A at another path, CLT B)."""
    from ct_ray import load_model, random_clt, save_clt
    from ct_ray.models.tiny import save_tiny

    model = args.model
    if model == "tiny":
        model = str(save_tiny("llama", work / "tiny", n_layers=4, d_model=128, d_mlp=512, max_pos=128))
    clt_a, clt_b = args.clt_a, args.clt_b
    if not clt_a or not clt_b:
        lm = load_model(model)
        if not clt_a:
            clt_a = str(work / "clt-seed1")
            save_clt(random_clt(lm, args.features, seed=1, firing_rate=args.firing_rate), clt_a)
        if not clt_b:
            clt_b = str(work / "clt-seed2")
            save_clt(random_clt(lm, args.features, seed=2, firing_rate=args.firing_rate), clt_b)
    copy = str(work / "clt-a-copy")
    shutil.copytree(clt_a, copy, dirs_exist_ok=True)
    return model, clt_a, copy, clt_b


def in_process(spec) -> bool:
    """A sweep in this process: the sweep's worker class and committer, no Ray (the rows run_sweep writes). False when
    the store holds the sweep already."""
    from ct_ray.store.commit import Committer
    from ct_ray.sweep import read_prompts
    from ct_ray.sweep.driver import _item_dict
    from ct_ray.sweep.worker import SweepWorker, worker_config

    store = spec.storage.store()
    store.check_writable()
    items = read_prompts(spec)[0]
    done = store.committed(spec.sweep_id)
    if sorted(k for k, st in zip(done.column("key").to_pylist(), done.column("status").to_pylist()) if st == "ok") \
            == sorted(it.key for it in items):
        print(f"sweep {spec.sweep_id}: already in the store (--workdir reused)")
        return False
    w = SweepWorker(worker_config(spec, store))
    if w.init_error:
        raise SystemExit(f"sweep {spec.sweep_id}: {w.init_error}")
    for it in items:
        out = w.run_prompt(_item_dict(it))
        if out["status"] != "ok":
            raise SystemExit(f"sweep {spec.sweep_id}: prompt {it.prompt!r}: {out.get('error')}")
    c = Committer(store, spec.sweep_id)
    assert c.add(w.flush())
    c.commit()
    return True


def run_sweeps(args, model: str, clts: dict, prompts: list[str], store: str) -> dict:
    from ct_ray.sweep import parse_sweep_spec, run_sweep

    seconds = {}
    for sid, clt in clts.items():
        spec = parse_sweep_spec({"sweep_id": sid, "model": model, "clt": clt, "prompts": prompts, "storage": store,
                                 "attribution": {"max_n_logits": 10, "desired_logit_prob": 0.95, "batch_size": 128},
                                 "resources": {"workers": 1, "num_cpus": args.threads, "torch_threads": args.threads}})
        t0 = time.perf_counter()
        if args.ray:
            r = run_sweep(spec)
            assert r.ok + r.skipped == len(prompts), r.errors
            ran = r.ok > 0
        else:
            ran = in_process(spec)
        if ran:
            seconds[sid] = time.perf_counter() - t0
            print(f"sweep {sid}: {len(prompts)} prompts in {seconds[sid]:.1f} s", flush=True)
    return seconds


def timed_diff(store, a: str, b: str, batch: int) -> dict:
    from ct_ray.analysis.diff import diff_sweeps, format_summary

    r = diff_sweeps(store, a, b, batch=batch)
    s = r["seconds"]
    print(format_summary(r))
    f = r["features"] or {}
    print(f"  timings: total {s['total']:.2f} s = plan {s['plan']:.2f} + diff {s['diff']:.2f} (loading CLTs "
          f"{f.get('load_seconds', 0.0):.2f}, decoder matching {f.get('seconds', 0.0):.2f}) + write {s['write']:.2f}; "
          f"{1000 * s['diff'] / r['n_prompts']:.0f} ms/prompt\n", flush=True)
    return r


def numbers(r: dict) -> dict:
    agg, f = r["aggregate"], r["features"] or {}
    keep = ("n_prompts", "match", *ZERO, "influence_a", "influence_b", "matched_influence_a", "matched_influence_b",
            "n_features_a", "n_features_b", "n_matched")
    out = {k: agg[k] for k in keep}
    out["matched_influence_share_a"] = agg["matched_influence_a"] / agg["influence_a"] if agg["influence_a"] else None
    out["features_matched"], out["features_queried"] = f.get("matched"), f.get("queried")
    out["mean_cosine"] = f.get("mean_cosine")
    out["seconds"] = r["seconds"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (default) or a built-in name / HF dir (smollm2-135m)")
    ap.add_argument("--clt-a", help="CLT A (default: a random CLT of --features, seed 1)")
    ap.add_argument("--clt-b", help="CLT B (default: a random CLT of --features, seed 2)")
    ap.add_argument("--features", type=int, default=128, help="features per layer of the random CLTs")
    ap.add_argument("--firing-rate", type=float, default=0.02)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="prompts read together by the diff")
    ap.add_argument("--ray", action="store_true", help="run the sweeps with run_sweep on a local Ray")
    ap.add_argument("--workdir", help="keep the store and CLTs here (default: a temporary folder)")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from ct_ray.store.tables import Store

    work = Path(args.workdir or tempfile.mkdtemp(prefix="ct_diff_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    prompts = (PROMPTS * (1 + args.prompts // len(PROMPTS)))[: args.prompts]
    if len(set(prompts)) < len(prompts):
        prompts = list(dict.fromkeys(prompts))
    t0 = time.perf_counter()
    model, clt_a, copy, clt_b = prepare(args, work)
    print(f"model {model}; CLT A {clt_a}; CLT B {clt_b}; {len(prompts)} prompts; store {work / 'store'}", flush=True)
    sweep_s = run_sweeps(args, model, {"A": clt_a, "A-copy": copy, "B": clt_b}, prompts, str(work / "store"))
    store = Store(str(work / "store"))

    self_diff = timed_diff(store, "A", "A", args.batch)
    for row in self_diff["table"].to_pylist():
        assert all(row[c] == 0.0 for c in ZERO) and row["top_changed_edges"] == [], row
        assert row["n_matched"] == row["n_features_a"] == row["n_features_b"], row
    copy_diff = timed_diff(store, "A", "A-copy", args.batch)
    ab = timed_diff(store, "A", "B", args.batch)

    out = {"date": _dt.date.today().isoformat(), "cores": os.cpu_count(), "load_avg": os.getloadavg()[0],
           "argv": sys.argv, "model": args.model, "clt_a": args.clt_a or f"random(features={args.features},seed=1)",
           "clt_b": args.clt_b or f"random(features={args.features},seed=2)", "n_prompts": len(prompts),
           "sweep_seconds": sweep_s, "self": numbers(self_diff), "copy": numbers(copy_diff), "a_vs_b": numbers(ab),
           "total_seconds": time.perf_counter() - t0}
    print("self diff A..A: exactly zero (asserted); A..A-copy: "
          f"{copy_diff['features']['matched']}/{copy_diff['features']['queried']} features matched, "
          f"edge change L1 {copy_diff['aggregate']['edge_change_l1']:.3g}")
    print(json.dumps(out, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
