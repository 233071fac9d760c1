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

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--contexts", type=int, default=64)
    ap.add_argument("--context-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    torch.set_num_threads(2)

    from ct_ray.harvest.activations import harvest_batch, training_mask
    from ct_ray.harvest.pipeline import build_contexts, harvest_to_store
    from ct_ray.models import load_model
    from ct_ray.specs import HarvestSpec

    spec = HarvestSpec(model=args.model, context_len=args.context_len,
                       n_tokens=args.contexts * (args.context_len - 1), batch_contexts=args.batch, num_cpus=1)
    lm = load_model(args.model, attn="sdpa")
    ctx = build_contexts(spec, lm.tokenizer)
    batches = [torch.from_numpy(ctx.tokens[i : i + args.batch]).long() for i in range(0, len(ctx), args.batch)]
    n_tok = sum(b.numel() for b in batches)
    backbone = lm.model.get_decoder()

    with torch.no_grad():  # warm-up
        backbone(input_ids=batches[0])
    t = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            backbone(input_ids=b, use_cache=False)
    bare = n_tok / (time.perf_counter() - t)

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

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        with tempfile.TemporaryDirectory() as d:
            harvest_to_store(spec, f"{d}/store", progress=False)  # warm-up: actor start, model load
            t = time.perf_counter()
            m = harvest_to_store(spec, f"{d}/store2", progress=False)
            ray_rate = n_tok / (time.perf_counter() - t)
        print(f"Ray Data pipeline   {ray_rate:9.0f} tok/s   ratio {ray_rate / bare:.3f}  "
              f"(1 actor, shards written, incl. actor start + model load; {m['n_tokens']} training tokens kept)")


if __name__ == "__main__":
    main()
