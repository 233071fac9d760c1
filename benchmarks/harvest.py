"""Harvest throughput vs a bare forward pass of the same model on the same batches, in the same run.

    .venv/bin/python benchmarks/harvest.py [--model smollm2-135m] [--contexts 64] [--context-len 64] [--batch 8]

Prints tokens/s of (a) a bare HF forward (no hooks), (b) `harvest_batch` (hooks, stacking, masking) in process,
(c) the full Ray Data pipeline (1 actor) writing shards to a local store; and the ratios (b)/(a), (c)/(a).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    import ct_ray  # noqa: F401, I001  (first: its OpenMP wait policy must be set before torch loads, as in the actors)
    import torch  # noqa: I001

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--contexts", type=int, default=64)
    ap.add_argument("--context-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--actor-cpus", type=int, default=2, help="CPUs (= torch threads) of the harvest actor")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"],
                    help="activation shard dtype (the workflows write bfloat16)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    torch.set_num_threads(2)

    from ct_ray.harvest.activations import harvest_batch, training_mask
    from ct_ray.harvest.pipeline import build_contexts, harvest_to_store
    from ct_ray.models import load_model
    from ct_ray.specs import HarvestSpec

    spec = HarvestSpec(model=args.model, context_len=args.context_len,
                       n_tokens=args.contexts * (args.context_len - 1), batch_contexts=args.batch, num_cpus=1,
                       dtype=args.dtype)
    lm = load_model(args.model, attn="sdpa")
    ctx = build_contexts(spec, lm.tokenizer)
    batches = [torch.from_numpy(ctx.tokens[i : i + args.batch]).long() for i in range(0, len(ctx), args.batch)]
    n_tok = sum(b.numel() for b in batches)
    backbone = lm.model.get_decoder()

    def bare_forward() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                backbone(input_ids=b, use_cache=False)
        return n_tok / (time.perf_counter() - t)

    with torch.no_grad():  # warm-up
        backbone(input_ids=batches[0])
    bare = bare_forward()

    t = time.perf_counter()
    for b in batches:
        x, _ = harvest_batch(lm, b)
        training_mask(x)
    hooked = n_tok / (time.perf_counter() - t)
    print(f"tokens: {n_tok} ({len(batches)} batches of {args.batch}x{args.context_len}) on {torch.get_num_threads()} threads")
    print(f"bare forward        {bare:9.0f} tok/s")
    print(f"harvest_batch       {hooked:9.0f} tok/s   ratio {hooked / bare:.3f}")
    if not args.skip_ray:
        import ray

        # the actor gets as many threads as the bare forward (Ray sets OMP_NUM_THREADS = its num_cpus); one more
        # logical CPU for the read/tokenise tasks (an actor holding every CPU starves them)
        ray.init(num_cpus=args.actor_cpus + 1, include_dashboard=False, log_to_driver=False)
        rates = {}
        with tempfile.TemporaryDirectory() as d:
            for mult in (1, 3):  # two sizes: the difference removes actor start-up and model load
                sp = spec.model_copy(update={"n_tokens": spec.n_tokens * mult, "num_cpus": args.actor_cpus})
                t = time.perf_counter()
                m = harvest_to_store(sp, f"{d}/store{mult}", progress=False)
                rates[mult] = (time.perf_counter() - t, m["n_tokens"])
        ray.shutdown()
        # the baseline again after the pipeline, averaged: this machine drifts by ±20% between runs
        bare2 = bare_forward()
        print(f"bare forward again  {bare2:9.0f} tok/s   (baseline below: the mean of both)")
        bare = (bare + bare2) / 2
        (t1, _), (t3, _) = rates[1], rates[3]
        whole = 3 * n_tok / t3
        steady = 2 * n_tok / max(1e-9, t3 - t1)
        print(f"Ray Data pipeline   {whole:9.0f} tok/s   ratio {whole / bare:.3f}  (1 actor x {args.actor_cpus} CPUs, "
              f"{3 * n_tok} tokens, {args.dtype} shards written, incl. actor start + model load)")
        print(f"  steady state      {steady:9.0f} tok/s   ratio {steady / bare:.3f}  (run of {3 * n_tok} minus run of "
              f"{n_tok} tokens: {t3:.1f} s - {t1:.1f} s)")

if __name__ == "__main__":
    main()
