"""`ct-ray tables list|compact|expire|vacuum|import` (in ct_ray/cli.py's command registry: `add_tables`)."""

from __future__ import annotations

import re

from ..errors import CTRayError

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhdw]?)\s*$", re.I)


def parse_duration(text: str) -> float:
    """'7d', '3h', '90m', '0s', '1.5h', '2w' (or plain seconds) -> seconds; a one-line CTRayError otherwise."""
    m = _DURATION_RE.match(str(text))
    if not m:
        raise CTRayError(f"bad duration {text!r}: use a number with a unit s, m, h, d or w (e.g. 7d, 3h, 90m, 0s)")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def _tables(args):
    return args.tables.split(",") if getattr(args, "tables", None) else None


def _run(fn, *a, **kw):
    """Call a maintenance function, turning its argument errors (ValueError) into one-line CLI errors."""
    try:
        return fn(*a, **kw)
    except ValueError as e:
        raise CTRayError(str(e).strip().splitlines()[0] if str(e).strip() else "invalid argument") from e


def _store(args, must_exist: bool = True):
    from .options import store_of

    st = store_of(args)
    if must_exist:  # a mistyped --store is an error, not a store of empty tables
        st.check_exists()
    return st


def cmd_list(args) -> int:
    import pyarrow as pa

    from .maintenance import human_bytes, table_stats
    from .sql import format_table

    rows = _run(table_stats, _store(args), _tables(args))
    t = pa.table({
        "table": [r["table"] for r in rows],
        "snapshots": [r["snapshots"] for r in rows],
        "files": [r["files"] for r in rows],
        "rows": [r["rows"] for r in rows],
        "bytes": [r["bytes"] for r in rows],
        "size": [human_bytes(r["bytes"]) for r in rows],
        "partitions": [r["partitions"] for r in rows],
        "delete_files": [r["delete_files"] for r in rows],
    })
    print(format_table(t, max_rows=len(rows)).rsplit("\n", 1)[0])  # without the "(N rows)" footer
    return 0


def cmd_compact(args) -> int:
    from .maintenance import compact, human_bytes

    if args.target_mb is not None and args.target_mb <= 0:
        raise CTRayError(f"--target-mb must be positive, got {args.target_mb}")
    kw = {"target_bytes": int(args.target_mb * 2**20)} if args.target_mb is not None else {}
    r = _run(compact, _store(args), _tables(args), older_than_s=parse_duration(args.older_than),
           progress=not args.no_progress, **kw)
    print(f"compacted {r['partitions']} partition(s) of {r['tables']} table(s): {r['files_before']} files "
          f"({human_bytes(r['bytes_before'])}) -> {r['files_after']} ({human_bytes(r['bytes_after'])}), {r['rows']} rows"
          f"; {r['recovered']} file(s) of cut rounds removed"
          + (f"; {len(r['failed'])} partition(s) not committed" if r["failed"] else ""))
    if r["failed"]:
        raise CTRayError(f"compact: {len(r['failed'])} partition(s) changed meanwhile and were left as they were "
                         f"(run it again): {r['failed'][0]}")
    return 0


def cmd_expire(args) -> int:
    from .maintenance import expire

    r = _run(expire, _store(args), parse_duration(args.older_than), retain_last=args.retain_last, tables=_tables(args))
    print(f"expired {r['expired']} snapshot(s) of {r['tables']} table(s) ({r['snapshots_before']} -> "
          f"{r['snapshots_after']}); {r['recovered']} file(s) of cut rounds removed")
    return 0


def cmd_vacuum(args) -> int:
    from .maintenance import human_bytes, vacuum

    r = _run(vacuum, _store(args), parse_duration(args.older_than), dry_run=args.dry_run, tables=_tables(args))
    if args.dry_run:
        for p in r["paths"]:
            print(p)
        print(f"would remove {r['files']} orphan file(s) ({human_bytes(r['bytes'])}) of {r['tables']} table(s) (dry run)")
    else:
        print(f"removed {r['files']} orphan file(s) ({human_bytes(r['bytes'])}) of {r['tables']} table(s)")
    return 0


def cmd_recover(args) -> int:
    from .commit import recover

    n = _run(recover, _store(args), args.sweep, older_than_s=parse_duration(args.older_than))
    print(f"removed {n} data file(s) of sweep rounds whose graphs commit is missing"
          + (f" (sweep {args.sweep})" if args.sweep else ""))
    return 0


def cmd_import(args) -> int:
    from .migrate import import_legacy

    r = _run(import_legacy, _store(args, must_exist=False), progress=not args.no_progress)  # may start a store

    def show(v):
        if isinstance(v, float):
            return f"{v:.1f}"
        if isinstance(v, (list, tuple, set)):
            v = list(v)
            return ",".join(map(str, v)) if len(v) <= 5 else f"{len(v)}"
        return str(v)

    print("imported: " + " ".join(f"{k}={show(v)}" for k, v in r.items()))
    return 0


def add_tables(s) -> None:
    from ..cliargs import add_group, add_progress_arg
    from .options import add_store_args

    s.description = "Maintenance of the Iceberg result tables of a store. See docs/tables.md."
    tsub = add_group(s, "tables_cmd")

    def common(p, older_than: str | None, what: str):
        add_store_args(p)
        p.add_argument("--tables", help="comma-separated tables (default: all)")
        if older_than is not None:
            p.add_argument("--older-than", default=older_than, metavar="AGE",
                           help=f"{what} (e.g. 7d, 3h, 90m, 0s; default {older_than})")

    p = tsub.add_parser("list", help="each table's snapshots, live data files, rows, bytes and partitions")
    common(p, None, "")
    p.set_defaults(fn=cmd_list)

    p = tsub.add_parser("compact", help="merge small data files into ~128 MB ones (one commit per partition)")
    common(p, "1h", "merge only files committed longer ago than this, and repair rounds cut short as old")
    p.add_argument("--target-mb", type=float, default=None, help="target data file size in MiB (default 128)")
    add_progress_arg(p)
    p.set_defaults(fn=cmd_compact)

    p = tsub.add_parser("expire", help="drop old snapshots (the current one stays; files go with vacuum)")
    common(p, "7d", "drop snapshots older than this (at least 1h)")
    p.add_argument("--retain-last", type=int, default=1, help="snapshots of the current lineage always kept")
    p.set_defaults(fn=cmd_expire)

    p = tsub.add_parser("vacuum", help="delete files no snapshot or metadata names (uncommitted, expired)")
    common(p, "3d", "delete only files last modified longer ago than this")
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    p.set_defaults(fn=cmd_vacuum)

    p = tsub.add_parser("recover", help="remove the rows of sweep rounds cut between their commits (what ct_ray's "
                        "readers already hide; for other engines)")
    add_store_args(p)
    p.add_argument("--sweep", help="only this sweep (default: all)")
    p.add_argument("--older-than", default="10m", metavar="AGE",
                   help="only rounds older than this: a live driver's round is between two commits for a moment "
                        "(e.g. 10m, 0s; default 10m)")
    p.set_defaults(fn=cmd_recover)

    p = tsub.add_parser("import", help="import a store of the older one-file-per-prompt layout into the tables")
    add_store_args(p)
    add_progress_arg(p)
    p.set_defaults(fn=cmd_import)
