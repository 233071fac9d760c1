"""The store options of the command line, defined once: every command that opens a store takes `--store`,
`--catalog` and `--endpoint-url` through `add_store_args` and opens it with `store_of`.

Light on purpose (no pyarrow, no pyiceberg at import): `ct-ray --help` and the parsers of every command import it.
"""

from __future__ import annotations

DEFAULT_STORE = "./ct_ray_data"
CATALOG_HELP = "Iceberg catalog URI (default: $CT_RAY_CATALOG, else SQLite in the store; see docs/engines.md)"
ENDPOINT_HELP = "S3-compatible endpoint URL (credentials come from the AWS env/chain)"


def add_store_args(p, default: str | None = DEFAULT_STORE, *, store_help: str | None = None) -> None:
    """`--store URL`, `--catalog URI`, `--endpoint-url URL` on parser `p`. `default=None`: the flags override a spec's
    `storage:` only when given (sweep, features)."""
    g = p.add_argument_group("store")
    g.add_argument("--store", default=default, metavar="URL",
                   help=store_help or f"storage URL: a local folder or s3://bucket/prefix (default {DEFAULT_STORE})")
    g.add_argument("--catalog", metavar="URI", help=CATALOG_HELP)
    g.add_argument("--endpoint-url", metavar="URL", help=ENDPOINT_HELP)


def storage_options(args) -> dict:
    """The fsspec options the flags give (only the endpoint: credentials never come from the command line)."""
    return {"endpoint_url": args.endpoint_url} if getattr(args, "endpoint_url", None) else {}


def store_of(args, url: str | None = None):
    """The store the command line names (`--store`, `--catalog`, `--endpoint-url`), or `url` with the same catalog
    and endpoint."""
    from .tables import Store

    return Store(url or getattr(args, "store", None) or DEFAULT_STORE, catalog=getattr(args, "catalog", None),
                 **storage_options(args))


def storage_override(args, storage: dict) -> dict | None:
    """A spec's `storage:` mapping with the flags given on the command line applied (None when no flag was given)."""
    if not (args.store or args.endpoint_url or args.catalog):
        return None
    return {**storage, "url": args.store or storage.get("url") or DEFAULT_STORE,
            "endpoint_url": args.endpoint_url or storage.get("endpoint_url"),
            "catalog": args.catalog or storage.get("catalog")}
