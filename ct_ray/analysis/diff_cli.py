"""`ct-ray diff SWEEP_A SWEEP_B` (in ct_ray/cli.py's command registry: `add_diff`): graph diffs between two sweeps."""

from __future__ import annotations

from ..errors import finite_float


def cmd_diff(args) -> int:
    from ..store.options import store_of
    from ..store.tables import Store
    from .diff import diff_sweeps, format_summary

    store_a = store_of(args)
    store_b = None
    if args.store_b:
        opts = {"endpoint_url": args.endpoint_url} if args.endpoint_url and args.store_b.startswith("s3://") else {}
        store_b = Store(args.store_b, catalog=args.catalog_b, **opts)
    elif args.catalog_b:
        from ..errors import CTRayError

        raise CTRayError("--catalog-b names the catalog of --store-b: give --store-b too")
    r = diff_sweeps(store_a, args.sweep_a, args.sweep_b, store_b=store_b,
                    threshold=finite_float(args.threshold, "--threshold"), batch=args.batch, top_edges=args.top_edges,
                    write=not args.no_write, progress=not args.no_progress)
    print(format_summary(r, show=args.show))
    return 0


def add_diff(s) -> None:
    from ..cliargs import add_progress_arg
    from ..store.options import add_store_args
    from .diff import BATCH_PROMPTS, DEFAULT_THRESHOLD, TOP_EDGES

    s.description = ("Compare the 'ok' graphs two sweeps hold for the same prompt texts: score deltas, "
                     "logit probability changes, feature influence on matched features, edge changes. "
                     "Same CLT: features match by (layer, feature); different CLTs: by mutual best "
                     "decoder cosine >= --threshold. Writes partition SWEEP_A..SWEEP_B of the "
                     "graph_diffs table of --store (re-running replaces it). See docs/analysis-diff.md.")
    add_store_args(s)
    s.add_argument("sweep_a", metavar="SWEEP_A", help="the reference sweep (of --store)")
    s.add_argument("sweep_b", metavar="SWEEP_B", help="the sweep compared to it (of --store-b, default --store)")
    s.add_argument("--store-b", help="storage URL of SWEEP_B (default: --store)")
    s.add_argument("--catalog-b", help="Iceberg catalog URI of --store-b (default: $CT_RAY_CATALOG, else SQLite in that store)")
    s.add_argument("--threshold", default=DEFAULT_THRESHOLD,
                   help=f"decoder cosine a feature match needs, different CLTs only (default {DEFAULT_THRESHOLD})")
    s.add_argument("--batch", type=int, default=BATCH_PROMPTS,
                   help=f"prompts whose rows are read together (default {BATCH_PROMPTS}; memory grows with it)")
    s.add_argument("--top-edges", type=int, default=TOP_EDGES,
                   help=f"most changed edges listed per prompt (default {TOP_EDGES})")
    s.add_argument("--show", type=int, default=5, help="most changed prompts printed (default 5)")
    s.add_argument("--no-write", action="store_true", help="compute and print, write no table")
    add_progress_arg(s)
    s.set_defaults(fn=cmd_diff)
