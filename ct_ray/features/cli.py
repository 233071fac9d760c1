"""`ct-ray features SPEC.yaml` (or flags): feature dashboards into the `features` table."""

from __future__ import annotations

DESCRIPTION = ("ct-ray features [SPEC.yaml] [--clt URL | --random-clt N] [--store URL]: runs the model + CLT over corpus "
               "contexts on a Ray actor pool; re-running a committed job does nothing. Flags override the spec's "
               "fields; the defaults are FeaturesSpec's.")


def cmd_features(args) -> int:
    from ..errors import CTRayError
    from ..store.options import storage_override
    from .job import load_features_spec, parse_features_spec, run_features

    over = {k: v for k, v in {"model": args.model, "clt": args.clt, "n_contexts": args.n_contexts,
                              "context_len": args.context_len, "top_k": args.top_k, "workers": args.workers,
                              "corpus": args.corpus}.items() if v is not None}
    if args.random_clt is not None:
        over["random_clt"] = {"features": args.random_clt, "seed": args.seed}
    base = load_features_spec(args.spec).model_dump(exclude_none=True) if args.spec else {}
    storage = storage_override(args, base.get("storage") or {})
    if storage is not None:
        over["storage"] = storage
    if args.spec:
        if "clt" in over or "random_clt" in over:
            base.pop("clt", None), base.pop("random_clt", None)
        spec = parse_features_spec({**base, **over}, where=args.spec)
    elif "clt" not in over and "random_clt" not in over:
        raise CTRayError("give SPEC.yaml, or --clt URL (or --random-clt N) and the other options as flags")
    else:
        spec = parse_features_spec(over, where="features options")
    r = run_features(spec, address=args.address, progress=not args.no_progress)
    what = "already computed" if r["skipped"] else "computed"
    print(f"features of {r['clt']}: {what} for {r['n_features']} features over {r['n_tokens']} tokens "
          f"({r['n_contexts']} contexts); table features, clt_id={r['clt_id']} in {spec.storage.url}")
    return 0


def add_features(s) -> None:
    from ..cliargs import add_progress_arg
    from ..specs import FeaturesSpec, RandomCLTSpec
    from ..store.options import add_store_args

    d = FeaturesSpec.field_default  # shown in the help; the spec applies them (a flag left out keeps the spec's value)
    s.description = DESCRIPTION
    s.add_argument("spec", nargs="?", help="FeaturesSpec YAML (flags override its fields)")
    s.add_argument("--model", help=f"built-in name, local HF directory or hub id (default {d('model')})")
    s.add_argument("--clt", help="CLT directory URL")
    s.add_argument("--random-clt", type=int, metavar="N", help="a seeded random CLT with N features per layer")
    s.add_argument("--seed", type=int, default=RandomCLTSpec.field_default("seed"),
                   help="seed of --random-clt (default %(default)s)")
    s.add_argument("--corpus", action="append",
                   help=f"corpus name or URL (repeatable; default {','.join(d('corpus'))})")
    s.add_argument("--n-contexts", type=int, help=f"corpus contexts run (default {d('n_contexts')})")
    s.add_argument("--context-len", type=int, help=f"tokens per context (default {d('context_len')})")
    s.add_argument("--top-k", type=int, help=f"top activating contexts kept per feature (default {d('top_k')})")
    s.add_argument("--workers", type=int, help=f"Ray actors, each holding the model and the CLT (default {d('workers')})")
    add_store_args(s, default=None, store_help="storage URL (default: the spec's storage.url, else ./ct_ray_data)")
    s.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    add_progress_arg(s)
    s.set_defaults(fn=cmd_features)
