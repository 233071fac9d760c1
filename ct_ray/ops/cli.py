"""`ct-ray submit`, `ct-ray jobs ...`, `ct-ray retrain` and `ct-ray clt list|show|runs|register|promote|rollback`
(in ct_ray/cli.py's command registry: `add_submit`, `add_jobs`, `add_retrain`; `add_clt_parsers` under `clt`)."""

from __future__ import annotations

import datetime as _dt
import json

from ..errors import CTRayError


def cmd_submit(args) -> int:
    import sys

    from .submit import connect, follow, submit

    job_id = submit(args.spec, args.address, date=args.date, job_id=args.submission_id, code=args.code,
                    project=args.project, pip=args.pip, python=args.python, entrypoint_num_cpus=args.entrypoint_num_cpus,
                    note=lambda msg: print(f"ct-ray: note: {msg}", file=sys.stderr))
    print(f"submitted {job_id}; follow it with: ct-ray jobs logs {job_id} --follow --address {args.address or '$RAY_ADDRESS'}")
    if not args.wait:
        return 0
    status = follow(connect(args.address), job_id)
    if status != "SUCCEEDED":
        raise CTRayError(f"job {job_id} ended {status}")
    print(f"job {job_id} SUCCEEDED")
    return 0


def _ts(ms) -> str:
    return _dt.datetime.fromtimestamp(ms / 1000, _dt.timezone.utc).isoformat(timespec="seconds") if ms else "-"


def cmd_jobs(args) -> int:
    from .submit import connect, follow, require_job

    client = connect(args.address)
    if args.action == "list":
        for j in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
            if j.submission_id:
                print(f"{j.submission_id:<48} {str(j.status):<10} {_ts(j.start_time)}  {j.entrypoint}")
        return 0
    if not args.job_id:
        raise CTRayError(f"usage: ct-ray jobs {args.action} JOB_ID --address http://HEAD:8265")
    info = require_job(client, args.job_id)
    if args.action == "status":
        d = {"submission_id": info.submission_id, "status": str(info.status), "message": info.message,
             "entrypoint": info.entrypoint, "start_time": _ts(info.start_time), "end_time": _ts(info.end_time),
             "metadata": info.metadata or {}}
        if args.json:
            print(json.dumps(d, indent=1))
        else:
            print(f"{d['submission_id']}: {d['status']}  ({d['message'] or ''})")
            print(f"  started {d['start_time']}, ended {d['end_time']}; entrypoint: {d['entrypoint']}")
        return 0
    if args.action == "logs":
        if args.follow:
            print(f"-- {args.job_id} ended {follow(client, args.job_id)}")
        else:
            print(client.get_job_logs(args.job_id), end="")
        return 0
    stopped = client.stop_job(args.job_id)
    print(f"{args.job_id}: stop requested" if stopped else f"{args.job_id}: already {info.status}, nothing to stop")
    return 0


def cmd_retrain(args) -> int:
    from .retrain import run_retrain

    state = run_retrain(args.spec, args.date, address=args.address)
    return 0 if state.get("status") == "done" else 1


# --- registry -----------------------------------------------------------------------------------------------
def _registry(args, require: bool = True):
    from .registry import Registry

    reg = Registry(args.registry, **({"endpoint_url": args.endpoint_url} if args.endpoint_url else {}))
    return reg.require() if require else reg


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))


def cmd_clt_list(args) -> int:
    reg = _registry(args)
    prod = (reg.production() or {}).get("version")
    print(f"{'version':<20} {'created':<26} {'fvu':>8} {'l0':>8}  parent")
    for m in reg.versions():
        t = (m.get("metrics") or {}).get("train") or {}
        mark = " *" if m["version"] == prod else ""
        print(f"{m['version']:<20} {m['created_at']:<26} {_fmt(t.get('fvu')):>8} {_fmt(t.get('l0')):>8}  "
              f"{_fmt((m.get('provenance') or {}).get('parent'))}{mark}")
    print(f"production: {prod or '(none)'}" + ("   (* = production)" if prod else ""))
    return 0


def cmd_clt_show(args) -> int:
    reg = _registry(args)
    if args.version:
        out = {**reg.meta(args.version), "url": reg.version_url(args.version), "evals": reg.evals(args.version)}
    else:
        out = {"registry": reg.url, "production": reg.production(), "history": reg.history()}
    print(json.dumps(out, indent=1, default=str))
    return 0


def cmd_clt_runs(args) -> int:
    from .retrain import STAGES, outcome

    for r in _registry(args).runs():
        last = [s for s in STAGES if s in r["stages"]]
        print(f"{r['date']}  {r.get('status', '?'):<8} {last[-1] if last else '-':<10} {outcome(r)}")
    return 0


def cmd_clt_register(args) -> int:
    reg = _registry(args, require=False)  # the first registration creates the registry
    vid = reg.register(args.clt, provenance={"registered_by": "ct-ray clt register"})
    print(f"registered {args.clt} as {vid} ({reg.version_url(vid)})")
    return 0


def cmd_clt_promote(args) -> int:
    rec = _registry(args).promote(args.version, reason=args.reason or "manual promote")
    print(f"production: {rec['version']} (was {rec['previous'] or 'none'}, change #{rec['seq']})")
    return 0


def cmd_clt_rollback(args) -> int:
    rec = _registry(args).rollback(args.to, reason=args.reason or "manual rollback")
    print(f"production: {rec['version']} (rolled back from {rec['previous']}, change #{rec['seq']})")
    return 0


def add_clt_parsers(csub) -> None:
    """Registry commands under `ct-ray clt`."""
    from ..store.options import ENDPOINT_HELP

    def reg_args(p):
        p.add_argument("--registry", required=True, help="registry URL (local directory or s3://bucket/prefix)")
        p.add_argument("--endpoint-url", metavar="URL", help=ENDPOINT_HELP)

    commands = [  # name, help, handler, (positional or option, kwargs)...
        ("list", "versions in a CLT registry (* marks production)", cmd_clt_list),
        ("show", "a version's metrics and provenance, or (no VERSION) the pointer and history", cmd_clt_show,
         ("version", {"nargs": "?", "help": "a version id (default: the production pointer and its history)"})),
        ("runs", "nightly retraining runs recorded in the registry (date, status, outcome)", cmd_clt_runs),
        ("register", "copy a CLT directory into the registry as a new immutable version", cmd_clt_register,
         ("clt", {"help": "CLT directory URL"})),
        ("promote", "point production at VERSION", cmd_clt_promote, ("version", {"help": "the version id"}),
         ("--reason", {"help": "why, recorded in the pointer's history (default: manual promote)"})),
        ("rollback", "point production back at the version it replaced (or --to VERSION)", cmd_clt_rollback,
         ("--to", {"metavar": "VERSION", "help": "the version to point production at (default: the one it replaced)"}),
         ("--reason", {"help": "why, recorded in the pointer's history (default: manual rollback)"})),
    ]
    for name, help_, fn, *args in commands:
        p = csub.add_parser(name, help=help_)
        for arg, kw in args:
            p.add_argument(arg, **kw)
        reg_args(p)
        p.set_defaults(fn=fn)


def add_submit(s) -> None:
    s.description = ("Submit SPEC.yaml as a Ray Job with a deterministic submission id (a second "
                     "submit of the same spec is refused). Token auth: RAY_AUTH_MODE=token and "
                     "RAY_AUTH_TOKEN in the environment.")
    s.add_argument("spec", help="a harvest, train, sweep or retrain spec YAML (its `kind:` says which)")
    s.add_argument("--address", help="Ray dashboard URL, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")
    s.add_argument("--date", help="retrain: the night to run (YYYY-MM-DD, default today UTC)")
    s.add_argument("--submission-id", help="override the deterministic id (e.g. to run a spec again)")
    s.add_argument("--code", choices=("project", "image"), default="project",
                   help="ship this project as the working dir (default), or use the ct_ray in the cluster image")
    s.add_argument("--project", help="project directory to ship (default: the checkout ct_ray runs from)")
    s.add_argument("--pip", metavar="REQUIREMENTS", help="pinned requirements file installed in the job's runtime_env")
    s.add_argument("--python", default="python", help="python on the cluster (default: python)")
    s.add_argument("--entrypoint-num-cpus", type=float, default=None,
                   help="CPUs reserved for the job's driver on the cluster (default: Ray's)")
    s.add_argument("--wait", action="store_true", help="follow the job's logs; exit non-zero unless it succeeds")
    s.set_defaults(fn=cmd_submit)


def add_jobs(s) -> None:
    s.add_argument("action", choices=("status", "logs", "stop", "list"), help="what to do: %(choices)s")
    s.add_argument("job_id", nargs="?", help="the submission id (every action but list)")
    s.add_argument("--address", help="Ray dashboard URL (default: $RAY_ADDRESS)")
    s.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    s.add_argument("--json", action="store_true", help="status as JSON")
    s.set_defaults(fn=cmd_jobs)


def add_retrain(s) -> None:
    s.add_argument("spec", help="RetrainSpec YAML (e.g. workflows/nightly_retrain.yaml)")
    s.add_argument("--date", help="the night (YYYY-MM-DD, default today UTC); re-running a date finishes it only")
    s.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray when needed)")
    s.set_defaults(fn=cmd_retrain)
