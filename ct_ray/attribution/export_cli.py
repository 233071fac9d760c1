"""`ct-ray export` (in ct_ray/cli.py's command registry: `add_export`): a sweep's graphs as graph JSON files."""

from __future__ import annotations

from ..errors import CTRayError
from ..store.names import is_name


def cmd_export(args) -> int:
    from ..store.options import store_of
    from .export_files import export_sweep

    if bool(args.keys) == bool(args.all):
        raise CTRayError("give --keys K1,K2 (graphs of the sweep) or --all (every committed graph)")
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
    if keys is not None and not keys:
        raise CTRayError("--keys: give at least one key")
    if args.scan is not None and not is_name(args.scan):
        raise CTRayError(f"--scan {args.scan!r}: a model id (letters, digits, '.', '_', '-'), never a path")
    details = {k: v for k, v in (("neuronpedia_source_set", args.neuronpedia_source_set),
                                 ("feature_json_base_url", args.feature_json_base_url)) if v}
    opts = {"endpoint_url": args.endpoint_url} if args.endpoint_url and args.out.startswith("s3://") else {}
    r = export_sweep(store_of(args), args.sweep, args.out, keys=keys, scan=args.scan, feature_details=details,
                     progress=not args.no_progress, **opts)
    print(f"exported {r['graphs']} graph(s) of sweep {r['sweep_id']} to {r['out']} ({r['written']} written, "
          f"{r['unchanged']} unchanged); index {r['index']} lists {r['index_graphs']}")
    return 0


def add_export(s) -> None:
    from ..cliargs import add_progress_arg
    from ..store.options import add_store_args

    s.description = ("Rebuild each committed graph of a sweep from the tables (no model needed) as "
                     "DIR/<sweep>-<key>.json plus DIR/graph-metadata.json, the index circuit-tracer's "
                     "local server lists. Re-running rewrites only what changed. See docs/export.md.")
    add_store_args(s)
    s.add_argument("--sweep", required=True, help="sweep id")
    s.add_argument("--keys", help="comma-separated graph keys (the graphs table's `key`)")
    s.add_argument("--all", action="store_true", help="every committed ('ok') graph of the sweep")
    s.add_argument("--out", required=True, help="output directory (local path or s3:// URL)")
    s.add_argument("--scan", help="metadata.scan, the viewer's model id (default: from the model's hub id)")
    s.add_argument("--neuronpedia-source-set", help="feature_details.neuronpedia_source_set (Neuronpedia dashboards)")
    s.add_argument("--feature-json-base-url", help="feature_details.feature_json_base_url (your feature JSON files)")
    add_progress_arg(s)
    s.set_defaults(fn=cmd_export)
