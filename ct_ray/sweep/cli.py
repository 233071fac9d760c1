"""`ct-ray sweep ...` and `ct-ray sql ...` (in ct_ray/cli.py's command registry: `add_sweep`, `add_sql`)."""

from __future__ import annotations

import json

from ..cliargs import add_progress_arg, add_store_args, storage_override, store_of  # noqa: F401 (store_of: callers)


def cmd_sweep(args) -> int:
    from ..errors import CTRayError

    words = args.what
    if words[0] == "status":
        if len(words) != 2:
            raise CTRayError("usage: ct-ray sweep status SWEEP_ID [--store URL]")
        from .status import format_status, sweep_status

        st = store_of(args)
        st.check_exists()  # a mistyped --store is an error, not an empty sweep
        c = sweep_status(words[1], store=st)
        print(json.dumps(c, indent=1, default=str) if args.json else format_status(c))
        return 0
    if words[0] == "repair":
        if len(words) != 2:
            raise CTRayError("usage: ct-ray sweep repair SWEEP_ID [--store URL]")
        from ..store.lease import SweepLease, repair
        from ..store.names import check_name

        st = store_of(args)
        st.check_exists()
        lease = SweepLease(st, check_name(words[1], "sweep id")).acquire(args.wait_lease)  # no driver meanwhile
        try:
            dup = repair(st, words[1])
        finally:
            lease.release()
        print(f"sweep {words[1]}: {len(dup)} key(s) were committed more than once; all their rows were removed"
              + (": run the sweep again to recompute them" if dup else ""))
        return 0
    if words[0] == "list":
        st = store_of(args)
        st.check_exists()
        for sid in st.sweeps():
            print(sid)
        return 0
    if len(words) != 1:
        raise CTRayError("usage: ct-ray sweep SPEC.yaml [--address ADDR] | ct-ray sweep status SWEEP_ID [--store URL]")
    from ..specs import load_sweep_spec
    from .runner import run_sweep

    spec = load_sweep_spec(words[0])
    upd = {}
    if args.sweep_id:
        upd["sweep_id"] = args.sweep_id
    st = storage_override(args, spec.storage.model_dump())
    if st is not None:
        upd["storage"] = st
    if args.workers:
        upd["resources"] = {**spec.resources.model_dump(), "workers": args.workers}
    if upd:
        from ..specs import parse_sweep_spec

        spec = parse_sweep_spec({**spec.model_dump(), **upd}, where=words[0])
    r = run_sweep(spec, address=args.address, progress=not args.no_progress, retry_errors=args.retry_errors,
                  new_plan=args.new_plan, lease_wait_s=args.wait_lease)
    print(f"sweep {r.sweep_id}: {r.n_prompts} prompts ({r.duplicates} duplicates dropped); "
          f"{r.skipped} already committed, {r.ok} attributed, {r.failed} failed, {r.perturbed} perturbed "
          f"in {r.seconds:.1f} s" + (f"; worker restarts {r.worker_restarts}" if r.worker_restarts else ""))
    if r.perturbation_skipped and not spec.perturbation.empty:
        print(f"perturbations skipped: {r.perturbation_skipped}")
    for idx, kind, msg in r.errors[:10]:
        print(f"  prompt {idx}: {kind} error: {msg}")
    if len(r.errors) > 10:
        print(f"  ... {len(r.errors) - 10} more (see the graphs table)")
    print(f"tables in {r.store}; try: ct-ray sql --store {r.store} "
          f"\"SELECT status, count(*) FROM graphs WHERE sweep_id = '{r.sweep_id}' GROUP BY status\"")
    if spec.export_dir and "ok" in spec.storage.store().committed(r.sweep_id).column("status").to_pylist():
        from ..attribution.export_files import export_sweep

        opts = spec.storage.storage_options() if spec.export_dir.startswith("s3://") else {}
        e = export_sweep(spec.storage.store(), r.sweep_id, spec.export_dir, progress=not args.no_progress, **opts)
        print(f"graph JSON: {e['graphs']} graph(s) in {e['out']} ({e['written']} written), listed in {e['index']}")
    return 0


def cmd_sql(args) -> int:
    from ..errors import CTRayError
    from ..store.sql import format_table, query

    if not args.query:
        raise CTRayError('give a query, e.g. ct-ray sql "SELECT sweep_id, count(*) FROM graphs GROUP BY 1"')
    if args.timeout < 0:
        raise CTRayError("--timeout: 0 (no limit) or more seconds")
    t = query(args.query, store=store_of(args), timeout_s=args.timeout or None, memory_limit=args.memory_limit)
    if t.num_columns:
        print(format_table(t, args.format, max_rows=args.max_rows))
    return 0


def add_sweep(s) -> None:
    s.description = ("ct-ray sweep SPEC.yaml [--address ADDR]: attribute every prompt on a Ray actor "
                     "pool into Parquet tables; re-running finishes only what is missing.  "
                     "ct-ray sweep status SWEEP_ID --store URL: progress read from storage.  "
                     "ct-ray sweep repair SWEEP_ID --store URL: remove every row of keys committed more "
                     "than once (two drivers at once), so the next run recomputes them.  "
                     "ct-ray sweep list --store URL: sweeps in a store.")
    s.add_argument("what", nargs="+", metavar="SPEC.yaml | status SWEEP_ID | repair SWEEP_ID | list",
                   help="a SweepSpec YAML to run, or status / repair SWEEP_ID, or list")
    s.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    add_store_args(s, default=None, store_help="storage URL (default: the spec's storage.url; status, repair, list: "
                                               "./ct_ray_data)")
    s.add_argument("--sweep-id", help="override the spec's sweep_id")
    s.add_argument("--workers", type=int, help="override resources.workers")
    s.add_argument("--retry-errors", action="store_true", help="also retry prompts that failed permanently")
    s.add_argument("--wait-lease", type=float, default=0.0, metavar="SECONDS",
                   help="another driver runs this sweep: wait up to SECONDS for it (default: refuse at once)")
    s.add_argument("--new-plan", action="store_true",
                   help="the spec's model/CLT/params differ from the sweep's committed plan: remove its rows, start over")
    add_progress_arg(s)
    s.add_argument("--json", action="store_true", help="status as JSON")
    s.set_defaults(fn=cmd_sweep)


def add_sql(s) -> None:
    s.add_argument("query", nargs="?", help="one read-only SQL statement over the views (see docs/sql.md)")
    add_store_args(s)
    from ..store.sql import FORMATS

    s.add_argument("--format", choices=tuple(FORMATS), default="table", metavar="FORMAT",
                   help="; ".join(f"{k}: {v}" for k, v in FORMATS.items()))
    s.add_argument("--max-rows", type=int, default=100, help="rows shown by --format table and markdown")
    s.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="stop the statement after SECONDS (default 300; 0: no limit)")
    s.add_argument("--memory-limit", metavar="SIZE",
                   help="DuckDB's memory limit, e.g. 2GB (default: $CT_RAY_SQL_MEMORY, else a quarter of RAM)")
    s.set_defaults(fn=cmd_sql)
