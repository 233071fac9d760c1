"""The options the `ct-ray` commands share, defined once (ct_ray/cli.py holds the command registry).

- storage: `--store`, `--catalog`, `--endpoint-url` (`add_store_args`, `store_of`: ct_ray/store/options.py);
- progress: `--no-progress` on every long command (`--quiet` is the same flag, as `attribute` always took it);
- a command group (`ct-ray tables`, `ct-ray clt`) run alone prints its help;
- `--debug` on every parser (ct_ray/cli.py's parser class), so it goes before or after the sub-command.

Light on purpose: the parsers import it, and `ct-ray --help` must not load torch, pyarrow or Ray.
"""

from __future__ import annotations

import argparse

from .store.options import DEFAULT_STORE, add_store_args, storage_options, storage_override, store_of  # noqa: F401

EXIT_USAGE = 2


def positive_int(v: str) -> int:
    n = int(v)  # argparse reports a ValueError as "invalid positive_int value"
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def add_prune_args(p, what: str = "pruning keeps") -> None:
    """--node-threshold / --edge-threshold, their defaults from PruneSpec (one default per setting)."""
    from .specs import PruneSpec

    for name in ("node", "edge"):
        p.add_argument(f"--{name}-threshold", type=float, default=PruneSpec.field_default(f"{name}_threshold"),
                       help=f"{what} the {name}s up to this cumulative influence (default %(default)s)")


def add_progress_arg(p) -> None:
    """`--no-progress` (alias `--quiet`): no progress bars. Read it as `args.no_progress`."""
    p.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true",
                   help="no progress bars (--quiet: the same)")


def add_group(p, dest: str, title: str = "commands"):
    """Sub-commands of `p` (e.g. `tables list`). `p` alone prints its help on stdout, and one error line on stderr
    naming the commands (exit status 2), instead of argparse's "the following arguments are required: DEST"."""
    sub = p.add_subparsers(dest=dest, title=title, metavar="COMMAND")
    p.set_defaults(fn=_help_of(p, sub))
    return sub


def _help_of(p, sub):
    def show(args) -> int:
        import sys

        p.print_help()
        sys.stdout.flush()
        print(f"{p.prog}: error: a command is required: {', '.join(sub.choices)} (see above)", file=sys.stderr)
        return EXIT_USAGE

    return show
