"""Attention attribution benchmark (`benchmarks/attribution.py --heads`): what head loadings and QK attribution add
to a graph, on SmolLM2-135M with a seeded random CLT.

Per prompt, in this process: one warm-up attribution, then `--repeats` timed `attribute()` calls (the baseline: the
best one), the graph pruned at the defaults (0.8 / 0.98), then head loadings of the pruned graph's edges and QK
attribution of its top `--qk-topk` (layer, head, query position) triples (at most `--qk-keys` key positions each),
each timed best of `--repeats`. Printed: the ratios heads / attribution and QK / attribution, the exactness of both
decompositions (max relative error of sum of loadings - edge over the edge's magnitudes summed; of sum of QK terms -
real score over the terms' magnitudes summed), and peak RSS before and after the attention step.

    python benchmarks/attribution.py --heads                 # 3 prompts, 2048 features per layer (~5 min)
    python benchmarks/attention.py --prompts 1 --features 512  # quick
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = [
    "The capital of France is",
    "When Mary and John went to the store, John gave a drink to",
    "The Eiffel Tower is located in the city of Paris, which is the capital and largest city of France. The tower "
    "was built for the",
]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(a) -> list[dict]:
    import torch
    from perturb import _time as _best  # best of `repeats` (benchmarks/ is on sys.path: the script's directory)

    from ct_ray import attribute, load_model, random_clt
    from ct_ray.attribution.heads import head_loadings
    from ct_ray.attribution.qk import qk_attribution, select_items
    from ct_ray.attribution.replacement import Replacement
    from ct_ray.models.capture import capture

    torch.set_num_threads(a.threads)
    model = load_model(a.model)
    clt = random_clt(model, a.features, seed=0, firing_rate=a.firing_rate)
    rows = []
    for prompt in PROMPTS[: a.prompts]:
        attribute(model, clt, prompt)  # warm-up
        t_attr, g = _best(lambda: attribute(model, clt, prompt), a.repeats)  # noqa: B023
        p = g.prune(0.8, 0.98)
        rss0 = _peak_mb()

        def heads():
            rep = Replacement(model, clt, capture(model, torch.tensor(p.meta["tokens"])))  # noqa: B023
            return rep, head_loadings(rep, p)  # noqa: B023

        t_heads, (rep, hl) = _best(heads, a.repeats)
        items = select_items(model, rep, p, hl, topk=a.qk_topk, max_keys=a.qk_keys)
        t_qk, res = _best(lambda: qk_attribution(model, rep, items), a.repeats)  # noqa: B023
        err = hl.residual()
        scale = hl.scale() + torch.from_numpy(hl.edge).double().abs()
        row = {
            "prompt": prompt, "tokens": g.meta["n_pos"], "features_active": g.meta["n_active_features"],
            "nodes_pruned": p.n_nodes, "edges_pruned": p.n_edges, "attribute_s": t_attr, "heads_s": t_heads,
            "qk_s": t_qk, "qk_items": len(items), "qk_heads": len({(i.layer, i.head, i.query) for i in items}),
            "heads_ratio": t_heads / t_attr, "qk_ratio": t_qk / t_attr,
            "heads_max_rel_err": float((err / scale.clamp_min(1e-30)).max()),
            "qk_max_rel_err": max(abs(r.score - r.decomposed) / max(r.scale, 1e-30) for r in res) if res else 0.0,
            "peak_rss_mb_before": rss0, "peak_rss_mb_after": _peak_mb(),
        }
        rows.append(row)
        print(f"{row['tokens']:>3} tokens, {row['edges_pruned']:>6} kept edges: attribute {t_attr:.2f} s, "
              f"heads {t_heads:.2f} s ({row['heads_ratio']:.0%}), QK {len(items)} scores / {row['qk_heads']} heads "
              f"{t_qk:.2f} s ({row['qk_ratio']:.0%}); max rel err heads {row['heads_max_rel_err']:.1e} "
              f"QK {row['qk_max_rel_err']:.1e}; peak RSS {rss0:.0f} -> {row['peak_rss_mb_after']:.0f} MB", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--features", type=int, default=2048, help="random CLT features per layer")
    ap.add_argument("--firing-rate", type=float, default=0.02)
    ap.add_argument("--prompts", type=int, default=3, help=f"how many of the {len(PROMPTS)} prompts")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--qk-topk", type=int, default=10)
    ap.add_argument("--qk-keys", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = run(a)
    worst_h = max(r["heads_ratio"] for r in rows)
    worst_q = max(r["qk_ratio"] for r in rows)
    print(f"worst: heads / attribution {worst_h:.0%} (bar <= 50%), QK / attribution {worst_q:.0%} (bar <= 100%)")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
