"""Lazy public names of a package (PEP 562): `__getattr__, __dir__ = lazy_exports(__name__, table, __all__)`.

A package lists its public names with the module that defines each; the module is imported on first use, so
`import ct_ray.store...` (the CLI's light commands, analysis tasks on Ray workers) never loads torch and transformers.
"""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, table: dict[str, str], names: list[str]):
    def __getattr__(name: str):
        if name in table:
            value = getattr(importlib.import_module(table[name], package), name)
            setattr(sys.modules[package], name, value)  # later lookups skip this function
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted({*vars(sys.modules[package]), *names})

    return __getattr__, __dir__
