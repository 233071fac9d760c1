"""CLT training throughput.

    .venv/bin/python benchmarks/train.py decode   # sparse vs dense decode, one process, same batch (SmolLM2 shapes)
    .venv/bin/python benchmarks/train.py shards --activations ct_ray_data/activations/smollm2-wiki
                                                 # 1 vs 2 feature-sharded Ray Train workers on a persisted harvest

`decode` times whole trainer steps (`Shard.step`: loss, backward, clipping, fused Adam) of a CLT with SmolLM2's
shapes (30 layers, d 576) at a fixed L0 per layer, with the decoder computed densely vs through gathered active
rows only; `--batch 256,1024,4096` repeats it per batch size.

    .venv/bin/python benchmarks/train.py decode-kernel --threads 1   # the decoder alone, forward + backward

`decode-kernel` times only the decoder's forward and backward (random codes at L0 16, 64, 256 per layer by default,
`--l0s`; 2048 features, d 576, 1024 tokens, one layer unless `--layers`/`--span`): `decode_dense` (`clt.decode`,
dense matmuls) against `decode_sparse` (the codes' nonzeros found, then `_GatherDecode`), the kernel alone from
given indices (what a TopK code hands over), and the previous autograd `embedding_bag` path.

    .venv/bin/python benchmarks/train.py heldout --spec workflows/train_smollm2_quality.yaml --clt URL[,URL]
                                                 # FVU / L0 of trained CLTs on the text after the spec's harvest
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def bench_decode(args) -> None:
    from ct_ray.specs import OptimSpec
    from ct_ray.train.shard import Layout, Shard

    torch.set_num_threads(args.threads)
    L, d, F = args.layers, args.d_model, args.features
    batches = [int(b) for b in str(args.batch).split(",")]
    print(f"CLT {L} layers x {F} features, d_model {d}, span {args.span or 'full'}, {args.activation}, target L0 "
          f"{args.l0}/layer; whole trainer steps (Shard.step: loss, backward, clipping, fused Adam)")
    for n in batches:
        rates = {}
        for sparse in (False, True):
            optim = OptimSpec(steps=1000, batch_tokens=n, lambda_final=1e-3, sparse_decode=sparse)
            topk = args.activation in ("topk", "batchtopk")
            shard = Shard(Layout(L, d, F, args.span, args.activation, "resid_mid", k=args.l0 if topk else None), optim)
            g = torch.Generator().manual_seed(0)
            xs, ys = torch.randn(n, L, d, generator=g), torch.randn(n, L, d, generator=g)
            with torch.no_grad():  # bias so that about `l0` features fire per token and layer (TopK: k = l0)
                clt = shard.clt
                for l in range(L if not topk else 0):
                    h = xs[:, l] @ clt.W_enc[l].T
                    clt.b_enc[l].copy_(clt.threshold[l] - torch.quantile(h, 1 - args.l0 / F, dim=0))
            times = []
            for i in range(args.steps + 1):
                t = time.perf_counter()
                stats = shard.step(xs, ys, 1000)
                if i:  # first step is warm-up
                    times.append(time.perf_counter() - t)
            l0 = float(stats["l0"].mean())
            rate = n / (sum(times) / len(times))
            print(f"batch {n:5d}  {'sparse' if sparse else 'dense ':6} decode: {rate:8.0f} tok/s  "
                  f"({1000 * sum(times) / len(times):.0f} ms/step, measured L0 {l0:.1f}/layer)")
            rates[sparse] = rate
            del shard
        print(f"batch {n:5d}  sparse / dense speed-up: {rates[True] / rates[False]:.2f}x")


def bench_decode_kernel(args) -> None:
    import torch.nn.functional as F

    from ct_ray.clt.training import decode_dense, decode_sparse, gather_decode
    from ct_ray.clt.transcoder import CrossLayerTranscoder

    torch.set_num_threads(args.threads)
    L, d, Fe, n = args.layers, args.d_model, args.features, int(args.batch)
    clt = CrossLayerTranscoder(L, d, Fe, args.span)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in clt.W_dec:
            w.copy_(torch.randn(w.shape, generator=g) / d**0.5)
    grads = [torch.randn(n, d, generator=g) for _ in range(L)]
    print(f"decoder forward + backward: {L} layer(s) x {Fe} features, d_model {d}, spans {clt.spans}, {n} tokens, "
          f"{args.threads} thread(s); best of {args.steps} after one warm-up")

    def timed(fn):
        fn()
        ts = []
        for _ in range(args.steps):
            clt.zero_grad(set_to_none=True)
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return 1000 * min(ts)

    def old_embedding_bag(acts):  # the path before _GatherDecode (autograd's embedding_bag backward)
        out = [torch.zeros(n, d) for _ in range(L)]
        for ls, a in enumerate(acts):
            tok, feat = torch.nonzero(a, as_tuple=True)
            off = torch.searchsorted(tok, torch.arange(n))
            y = F.embedding_bag(feat, clt.W_dec[ls].reshape(Fe, -1), off, mode="sum", per_sample_weights=a[tok, feat])
            for k, yk in enumerate(y.view(n, clt.spans[ls], d).unbind(1)):
                out[ls + k] = out[ls + k] + yk
        return out

    for l0 in [int(x) for x in args.l0s.split(",")]:
        idx = [torch.stack([torch.randperm(Fe, generator=g)[:l0] for _ in range(n)]).sort(1).values for _ in range(L)]
        vals = [torch.rand(n, l0, generator=g) + 0.1 for _ in range(L)]
        acts = [torch.zeros(n, Fe).scatter_(1, i, v).requires_grad_(True) for i, v in zip(idx, vals)]
        tok = torch.arange(n).repeat_interleave(l0)

        def run(dec, acts=acts):
            out = dec(clt, acts, with_bias=False) if dec is not old_embedding_bag else dec(acts)
            torch.autograd.backward(out, grads)

        # from (indices, values): no search for the nonzeros, no dense activation gradient
        def kernel_only(vals=vals, idx=idx, tok=tok):
            out = [torch.zeros(n, d) for _ in range(L)]
            for ls in range(L):
                v = vals[ls].flatten().requires_grad_(True)
                y = gather_decode(v, clt.W_dec[ls].reshape(Fe, -1), tok, idx[ls].flatten(), n)
                for k, yk in enumerate(y.view(n, clt.spans[ls], d).unbind(1)):
                    out[ls + k] = out[ls + k] + yk
            torch.autograd.backward(out, grads)

        def forward_only(vals=vals, idx=idx, tok=tok):  # one pass over the active rows: the kernel's best pass
            with torch.no_grad():
                for ls in range(L):
                    gather_decode(vals[ls].flatten(), clt.W_dec[ls].reshape(Fe, -1), tok, idx[ls].flatten(), n)

        t = {"dense": timed(lambda: run(decode_dense)), "sparse": timed(lambda: run(decode_sparse)),
             "kernel": timed(kernel_only), "embedding_bag": timed(lambda: run(old_embedding_bag)),
             "pass": timed(forward_only)}
        print(f"L0 {l0:4d}/layer: dense {t['dense']:7.1f} ms | sparse {t['sparse']:6.1f} ms "
              f"({t['dense'] / t['sparse']:5.1f}x) | kernel from indices {t['kernel']:6.1f} ms "
              f"({t['dense'] / t['kernel']:5.1f}x) | previous embedding_bag {t['embedding_bag']:6.1f} ms "
              f"({t['dense'] / t['embedding_bag']:4.1f}x)", flush=True)
        # the bound: the dense products run at the GEMM's FLOP rate, the sparse ones at the rate rows stream through
        # the cache (3 passes of nnz rows: forward, ∂/∂codes, ∂/∂W), so at best dense / (3 x one pass)
        flop = 3 * 2 * n * Fe * sum(clt.spans) * d
        rows = n * l0 * sum(clt.spans) * d * 4
        print(f"           dense {flop / t['dense'] / 1e6:5.1f} GFLOP/s; one pass over the active rows "
              f"{t['pass']:5.1f} ms = {rows / t['pass'] / 1e6:5.1f} GB/s; kernel {3 * rows / t['kernel'] / 1e6:5.1f} "
              f"GB/s; bound dense / (3 passes) = {t['dense'] / (3 * t['pass']):5.1f}x", flush=True)


def bench_shards(args) -> None:
    import ray

    from ct_ray.specs import TrainSpec
    from ct_ray.train.run import train

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rates = {}
    args.batch = int(args.batch)
    for workers in (1, 2):
        spec = TrainSpec.model_validate({
            "name": f"bench-shards-{workers}", "activations": args.activations,
            "clt": {"n_features": args.features, "span": args.span},
            "optim": {"steps": args.steps, "batch_tokens": args.batch, "shuffle_buffer_tokens": 2 * args.batch},
            "workers": workers, "num_cpus_per_worker": 2 / workers, "checkpoint": tempfile.mkdtemp(prefix="ct_ray_bench_ckpt"),
            "checkpoint_every": 10_000, "metrics_every": max(1, args.steps // 2), "eval_tokens": 0,
            "out": f"/tmp/ct_ray_bench/clt{workers}", "metrics": None,
            "harvest": {"model": args.model}})
        s = train(spec, progress=False)
        rates[workers] = s["final"]["tokens_per_s"]
        print(f"{workers} worker(s): {rates[workers]:.0f} tok/s (steps {args.steps}, batch {args.batch}, "
              f"fvu {s['final']['fvu']:.3f})")
    print(f"2 vs 1 worker: {rates[2] / rates[1]:.2f}x (2 CPU cores in total: sharding splits, not adds, compute)")


def bench_heldout(args) -> None:
    from ct_ray import load_model
    from ct_ray.clt.evaluate import reconstruction_metrics
    from ct_ray.clt.io import load_clt
    from ct_ray.specs import TrainSpec, load_yaml
    from ct_ray.train.run import held_out_tokens

    spec = load_yaml(args.spec, TrainSpec)
    model = load_model(spec.harvest.model)
    tokens = held_out_tokens(spec, model, args.tokens)
    for url in args.clt.split(","):
        r = reconstruction_metrics(model, load_clt(url), tokens)
        print(f"{url}: held-out fvu {r['fvu']:.4f}, l0 {r['l0']:.1f} ({r['l0'] / len(r['l0_per_layer']):.1f}/layer) "
              f"on {r['eval_positions']} positions; per layer {[round(x, 2) for x in r['fvu_per_layer']]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["decode", "decode-kernel", "shards", "heldout"])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--span", type=int, default=None)
    ap.add_argument("--l0", type=int, default=32)
    ap.add_argument("--activation", default="jumprelu", choices=["jumprelu", "topk", "batchtopk"],
                    help="decode: the trained activation (topk/batchtopk: k = --l0)")
    ap.add_argument("--l0s", default="16,64,256", help="decode-kernel: L0s per layer, comma-separated")
    ap.add_argument("--batch", default="256", help="tokens per step; several comma-separated for `decode`")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="decode: torch threads (1 = one feature shard's share)")
    ap.add_argument("--activations", default="ct_ray_data/activations/smollm2-wiki")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--spec", default="workflows/train_smollm2.yaml", help="heldout: the spec whose harvest to skip")
    ap.add_argument("--clt", default="ct_ray_data/clts/smollm2-plt", help="heldout: CLT URLs, comma-separated")
    ap.add_argument("--tokens", type=int, default=4096, help="heldout: held-out tokens")
    args = ap.parse_args()
    if args.what == "decode-kernel":  # its own defaults: one layer (per-layer), batch 1024
        args.layers = 1 if args.layers == 30 else args.layers
        args.batch = "1024" if args.batch == "256" else args.batch
    run = {"decode": bench_decode, "decode-kernel": bench_decode_kernel, "shards": bench_shards, "heldout": bench_heldout}
    run[args.what](args)


if __name__ == "__main__":
    main()
