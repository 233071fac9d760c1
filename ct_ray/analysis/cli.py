"""`ct-ray analyze` and `ct-ray diff` (registered by ct_ray/cli.py through `add_parsers`)."""

from __future__ import annotations


def add_parsers(sub) -> None:
    from .diff_cli import add_parsers as add_diff
    from .run_cli import add_parsers as add_analyze

    add_analyze(sub)
    add_diff(sub)
