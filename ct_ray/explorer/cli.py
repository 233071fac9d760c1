"""`ct-ray serve` (in ct_ray/cli.py's command registry: `add_serve`)."""

from __future__ import annotations


def cmd_serve(args) -> int:
    from .server import make_server

    srv = make_server(args.store, host=args.host, port=args.port, allow_write=args.allow_write,
                      graph_json=args.graph_json, endpoint_url=args.endpoint_url, catalog=args.catalog,
                      allow_hosts=args.allow_host or ())
    host, port = srv.server_address[:2]
    mode = "read-write (supernodes can be saved)" if args.allow_write else "read-only"
    print(f"ct-ray explorer on http://{host}:{port}/  store {srv.api.store.url}  {mode}  (Ctrl-C stops)", flush=True)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        names = ", ".join(sorted(srv.allowed_names))
        print(f"reachable from other machines; answers to IP addresses and the names {names} "
              "(--allow-host adds names; see docs/security.md)", flush=True)
    try:
        srv.serve_forever()
    finally:
        srv.server_close()
    return 0


def add_serve(s) -> None:
    from ..store.options import add_store_args

    s.description = ("ct-ray serve --store URL: browse sweeps, draw graphs, feature dashboards, supernodes, "
                     "perturbation results. Read-only unless --allow-write.")
    add_store_args(s)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    s.add_argument("--allow-host", action="append", metavar="NAME",
                   help="also answer requests addressed to this host name (repeatable; IP addresses, localhost and "
                        "the --host name always work; other names are refused against DNS rebinding)")
    s.add_argument("--allow-write", action="store_true", help="let the page save supernode groupings to the store")
    s.add_argument("--graph-json", help="also serve this graph JSON file (circuit-tracer / Neuronpedia format)")
    s.set_defaults(fn=cmd_serve)
