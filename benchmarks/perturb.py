"""Intervention throughput: many interventions of one prompt in batched forward passes vs one pass each.

Both sides run the same code (`Splice.run`) after the same shared clean pass; "one at a time" is `batch_size=1`,
i.e. one forward pass of the spliced model per intervention, which is what a loop over interventions costs.
The interventions are ablations of distinct active features of the prompt (each at its own position), as
graph validation runs them. The batched results are checked against the one-at-a-time results.

    python benchmarks/perturb.py                 # SmolLM2-135M, random CLT (1024 features/layer), 64 ablations
    python benchmarks/perturb.py --quick         # tiny model smoke run (seconds)

Modes: `constrained` and `free` return logits only (constrained rows take the change-only pass of
`ct_ray/perturb/linear.py`); `validate` is constrained with what graph validation also asks for (the watched
features' pre-activations, and the real MLP output and the CLT's response one layer after each intervention).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ct_ray import load_model, random_clt  # noqa: E402
from ct_ray.models.tiny import tiny_model  # noqa: E402
from ct_ray.perturb import Intervention, Splice  # noqa: E402

PROMPT = "The capital of France is Paris, and the capital of Germany is"


def _interventions(sp: Splice, n: int) -> list[list[Intervention]]:
    """n ablations of distinct active features, spread over layers and positions."""
    found = []
    for l in range(sp.L):
        nz = torch.nonzero(sp.clean_acts[l])  # (pos, feature), BOS excluded (zeroed)
        found += [(l, int(p), int(f)) for p, f in nz.tolist()]
    if not found:
        raise SystemExit("the CLT has no active feature on this prompt")
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(found), generator=g)[:n].tolist()
    while len(pick) < n:  # fewer active features than interventions: reuse (still separate rows)
        pick += pick[: n - len(pick)]
    return [[Intervention(features=[(found[i][0], found[i][2])], positions=found[i][1], op="set", value=0.0)]
            for i in pick]


def _time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--features", type=int, default=1024, help="random CLT features per layer")
    ap.add_argument("--clt", help="a trained CLT (URL) instead of the random one")
    ap.add_argument("--firing-rate", type=float, default=0.003)
    ap.add_argument("--span", type=int, default=None, help="decoder span (1 = per-layer transcoder; default: all)")
    ap.add_argument("--n", type=int, default=64, help="interventions")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--modes", default="free,constrained,validate")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats (best of)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--quick", action="store_true", help="tiny random Llama instead of the real model")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    if args.quick:
        model = tiny_model("llama", n_layers=4, d_model=128, d_mlp=512, max_pos=128)
        name = "tiny-llama (4 layers, d 128)"
        args.features, args.firing_rate = min(args.features, 256), max(args.firing_rate, 0.02)
    else:
        model = load_model(args.model)
        name = args.model
    if args.clt:
        from ct_ray.clt.io import load_clt

        clt = load_clt(args.clt)
        args.features, args.span = clt.d_tc[0], (clt.spans[0] if clt.spans[0] < clt.n_layers else None)
    else:
        clt = random_clt(model, args.features, seed=0, firing_rate=args.firing_rate, span=args.span)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    sp = Splice(model, clt, PROMPT)
    t_clean = time.perf_counter() - t0
    rows = _interventions(sp, args.n)
    kind = ("trained " + args.clt if args.clt else "random") + (", cross-layer" if args.span is None else
                                                                  f", span {args.span}")
    print(f"model {name}: {sp.L} layers, d_model {sp.d}; CLT ({kind}) {args.features} features/layer; "
          f"prompt {sp.P} tokens; "
          f"{len(rows)} ablations; torch threads {torch.get_num_threads()}; load {t_load:.1f} s, clean pass "
          f"{t_clean * 1000:.0f} ms")

    # the plain model for reference: one forward pass of the prompt, and of the batch
    def plain(B):
        with torch.no_grad():
            model.model(sp.tokens[None].expand(B, -1), use_cache=False, logits_to_keep=1)

    t_plain1, _ = _time(lambda: plain(1), args.repeats + 1)
    t_plainB, _ = _time(lambda: plain(min(args.batch_size, len(rows))), args.repeats)
    print(f"plain HF forward: batch 1 {t_plain1 * 1000:.1f} ms, batch {min(args.batch_size, len(rows))} "
          f"{t_plainB * 1000:.1f} ms")

    results = {"model": name, "n_layers": sp.L, "d_model": sp.d, "clt": args.clt or "random",
               "clt_features": args.features, "clt_span": args.span,
               "prompt_tokens": sp.P,
               "n_interventions": len(rows), "batch_size": args.batch_size, "threads": torch.get_num_threads(),
               "plain_forward_ms": {"batch1": t_plain1 * 1000, f"batch{args.batch_size}": t_plainB * 1000},
               "modes": {}}
    print(f"{'mode':<12} {'one at a time':>16} {'batched':>16} {'speedup':>8} {'max |Δ| batched vs single':>27}")
    watch = [(iv.features[0][0], iv.positions, iv.features[0][1]) for (iv,) in rows]
    for mode in args.modes.split(","):
        extra = {"watch": watch, "record_mlp_at": [w[0] + 1 for w in watch]} if mode == "validate" else {}
        m = "constrained" if mode == "validate" else mode
        sp.run(rows[:2], m, batch_size=1), sp.run(rows, m, batch_size=args.batch_size, **extra)  # warm-up
        t1, single = _time(partial(sp.run, rows, m, batch_size=1, **extra), args.repeats)
        tb, batched = _time(partial(sp.run, rows, m, batch_size=args.batch_size, **extra), args.repeats)
        diff = float((single.logits - batched.logits).abs().max())
        scale = float(single.logits.abs().max())
        r1, rb = len(rows) / t1, len(rows) / tb
        results["modes"][mode] = {"single_s": t1, "batched_s": tb, "single_per_s": r1, "batched_per_s": rb,
                                  "speedup": tb and t1 / tb, "max_abs_logit_diff": diff, "logit_scale": scale}
        print(f"{mode:<12} {r1:10.1f} int/s {rb:10.1f} int/s {t1 / tb:7.1f}x {diff:15.2e} (logits ~{scale:.0f})")
    results["platform"] = {"python": platform.python_version(), "torch": torch.__version__,
                           "machine": platform.machine(), "cpus": os.cpu_count()}
    results["date"] = _dt.datetime.now().isoformat(timespec="seconds")
    results["command"] = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
