"""`ct-ray analyze` and `ct-ray diff` (registered by ct_ray/cli.py through `add_parsers`)."""

from __future__ import annotations


def add_parsers(sub) -> None:
    for mod in ("run_cli", "diff_cli"):  # each module adds its own command; a missing one is skipped
        try:
            m = __import__(f"ct_ray.analysis.{mod}", fromlist=["add_parsers"])
        except ModuleNotFoundError as e:
            if e.name != f"ct_ray.analysis.{mod}":
                raise
            continue
        m.add_parsers(sub)
