"""`ct-ray perturb` (ct_ray/cli.py's command registry: `add_perturb`): validate a graph by perturbing its top nodes
and print predicted vs measured effects."""

from __future__ import annotations

import json

from ..errors import finite_float
from ..specs.intervention import InterventionError


def add_perturb(s) -> None:
    """`ct-ray perturb`'s arguments (ct_ray/cli.py's command registry); defaults from ValidationSpec and PruneSpec."""
    from ..cliargs import add_progress_arg, add_prune_args, positive_int
    from ..specs import RandomCLTSpec
    from ..specs.common import DEFAULT_MODEL
    from ..specs.intervention import DEFAULT_OPS, ValidationSpec

    v = ValidationSpec.field_default
    s.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, local HF directory or hub id "
                                                         "(default %(default)s)")
    s.add_argument("--clt", help="CLT directory URL (circuit-tracer layout; local path or s3://)")
    s.add_argument("--random-clt", type=positive_int, metavar="N", help="use a seeded random CLT with N features per layer")
    s.add_argument("--seed", type=int, default=RandomCLTSpec.field_default("seed"),
                   help="seed of --random-clt (default %(default)s)")
    s.add_argument("--graph", metavar="DIR", help="a graph directory written by Graph.save (pruned if it is not)")
    s.add_argument("--prompt", help="attribute this prompt on the fly instead of loading --graph")
    s.add_argument("--top-k", type=int, default=v("top_k"),
                   help="perturb the K most influential feature nodes (default %(default)s)")
    s.add_argument("--mode", default=v("mode").mode, help="constrained (default) or free")
    s.add_argument("--layers", metavar="START:END", help="constrained layer range, inclusive (default: all)")
    s.add_argument("--freeze-attention", action="store_true", help="free layers keep the clean attention patterns")
    s.add_argument("--ops", default=",".join(f"{op}:{val:g}" for op, val in DEFAULT_OPS),
                   help="comma-separated OP:VALUE (set/scale/add; default %(default)s)")
    s.add_argument("--supernodes", metavar="FILE", help="YAML/JSON list of {name, nodes} to perturb as well")
    add_prune_args(s, "pruning of an unpruned graph keeps")
    s.add_argument("--batch-size", type=int, default=v("batch_size"),
                   help="interventions per forward pass (default %(default)s)")
    s.add_argument("--all-logits", action="store_true", help="print every logit node, not only the top one")
    s.add_argument("--out", metavar="DIR", help="write perturbations.parquet (the perturbations table's row type) and "
                                                "validation.json (the metrics) here")
    add_progress_arg(s)
    s.set_defaults(fn=cmd_perturb)


def _parse_ops(text: str) -> list[tuple[str, float]]:  # (op, value) pairs: ValidationSpec makes templates
    ops = []
    for part in text.split(","):
        op, _, val = part.strip().partition(":")
        if op not in ("set", "scale", "add") or not val:
            raise InterventionError(f"bad --ops item {part!r}: expected OP:VALUE with OP in set/scale/add")
        ops.append((op, finite_float(val, "--ops value", InterventionError)))
    return ops


def _parse_layers(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    a, sep, b = text.partition(":")
    try:
        return (int(a), int(b)) if sep else (int(a), int(a))
    except ValueError:
        raise InterventionError(f"bad --layers {text!r}: expected START:END") from None


def _load_supernodes(path: str | None):
    if path is None:
        return None
    from ..errors import CTRayError
    from ..specs import safe_yaml
    from .supernodes import SupernodeSet

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CTRayError(f"cannot read supernodes file {path}: {e.strerror}") from e
    return SupernodeSet.parse(safe_yaml(raw, path))  # JSON is YAML


def cmd_perturb(args) -> int:
    from ..attribution.attribute import attribute
    from ..attribution.graph import Graph
    from ..clt.io import load_clt
    from ..clt.transcoder import random_clt
    from ..errors import CTRayError
    from ..models import load_model
    from .validate import validate

    if (args.graph is None) == (args.prompt is None):
        raise CTRayError("give exactly one of --graph DIR (a saved graph) or --prompt TEXT (attribute on the fly)")
    if not args.clt and not args.random_clt:
        raise CTRayError("give --clt URL (a CLT directory) or --random-clt N (a seeded random CLT, for testing)")
    if args.top_k < 1:
        raise CTRayError("--top-k must be >= 1")
    if args.mode not in ("constrained", "free"):
        raise CTRayError(f"--mode must be 'constrained' or 'free', not {args.mode!r}")
    ops = _parse_ops(args.ops)
    layers = _parse_layers(args.layers)
    supernodes = _load_supernodes(args.supernodes)

    model = load_model(args.model)
    clt = load_clt(args.clt) if args.clt else random_clt(model, args.random_clt, seed=args.seed)
    clt.check_model(model.n_layers, model.d_model)
    if args.graph is not None:
        graph = Graph.load(args.graph)
        if "pruning" not in graph.meta:
            graph = graph.prune(args.node_threshold, args.edge_threshold)
    else:
        graph = attribute(model, clt, args.prompt, verbose=not args.no_progress).prune(args.node_threshold,
                                                                                 args.edge_threshold)

    v = validate(model, clt, graph, top_k=args.top_k, ops=ops, mode=args.mode, layers=layers,
                 freeze_attention=args.freeze_attention or None, supernodes=supernodes, batch_size=args.batch_size)
    m = v.metrics
    rows = v.table.to_pylist()
    top_tok = graph.meta["logit_tokens"][0]
    w = max(12, *(len(t.name) for t in v.targets))
    print(f"graph {m['graph_id']}: {graph.n_features} feature nodes, logits "
          f"{[s for s in model.decode(graph.meta['logit_tokens'])][:5]}; mode {m['mode']}")
    print(f"{'target':<{w}} {'influence':>9} {'op':>11} {'KL':>8}  {'token':>12} {'predicted':>10} {'measured':>10}")
    for r in rows:
        if not args.all_logits and r["target_token"] != top_tok:
            continue
        op = f"{r['op']}({r['value']:g})"
        print(f"{r['node_id'] or r['supernode']:<{w}} {r['influence']:9.4f} {op:>11} {r['kl']:8.4f}  "
              f"{r['target_str']!r:>12} "
              f"{r['predicted_delta']:10.4f} {r['measured_delta']:10.4f}")

    def f(x):
        return "nan" if x != x else f"{x:.3f}"

    print(f"logits:   spearman {f(m['logit_spearman'])}  sign agreement {f(m['logit_sign_agreement'])}  "
          f"({m['n_logit_pairs']} pairs)")
    print(f"features: spearman {f(m['feature_spearman'])}  sign agreement {f(m['feature_sign_agreement'])}  "
          f"({m['n_feature_pairs']} pairs)")
    print(f"KL under ablation vs influence: spearman {f(m['kl_influence_spearman'])} ({m['n_ablations']} nodes)")
    print(f"faithfulness one layer after: cosine {f(m['faithfulness_cosine'])}  nMSE {f(m['faithfulness_nmse'])}")
    if args.out:
        import pyarrow.parquet as pq

        from ..store.fs import filesystem

        fs, out = filesystem(args.out)
        fs.makedirs(out, exist_ok=True)
        with fs.open(f"{out}/perturbations.parquet", "wb") as fh:
            pq.write_table(v.table, fh)
        with fs.open(f"{out}/validation.json", "w") as fh:
            json.dump(m, fh, indent=1)
        print(f"wrote {args.out}/perturbations.parquet and validation.json")
    return 0
