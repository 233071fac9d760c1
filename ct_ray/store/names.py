"""Names that become paths: sweep ids, graph keys, export slugs, CLT ids, registry versions.

Anything read from a store (a graph key, a sweep id found by listing a folder, a partition value) is untrusted: a
key stored as `x/../../tmp/PWNED` must never reach a file name. One rule covers every such name, wherever it comes
from (a spec, a query string, a table row): 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit.
Such a name is exactly one path component and never '.' or '..'. `rel_path` joins names below a store root;
`confined` checks a local path still lies inside its root after symlinks are resolved.
"""

from __future__ import annotations

import os
import re

from ..errors import CTRayError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
NAME_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"


def is_name(v) -> bool:
    return isinstance(v, str) and NAME_RE.match(v) is not None


def check_name(v, what: str, error: type[Exception] = CTRayError) -> str:
    """`v` when it is a safe name, else one `error` line naming `what` (the value shown escaped and cut short)."""
    if not is_name(v):
        shown = repr(v) if len(repr(v)) <= 80 else repr(v)[:77] + "..."
        raise error(f"{what} {shown} is not a safe name ({NAME_RULE})")
    return v


def check_rel(rel: str, error: type[Exception] = CTRayError) -> str:
    """A path relative to a store root: non-empty components, none '.' or '..', no NUL, no backslash, not absolute.
    Fixed folder names such as `_sweeps` pass; the caller checks the names it put in with `check_name`."""
    parts = rel.split("/") if isinstance(rel, str) else [""]
    if not rel or any(p in ("", ".", "..") or "\x00" in p or "\\" in p for p in parts):
        raise error(f"path {rel!r:.80} leaves its store folder (empty, '.', '..' or odd component)")
    return rel


def confined(root: str, path: str, error: type[Exception] = CTRayError) -> str:
    """`path` (local) when it resolves inside `root` (symlinks followed as far as they exist), else one error line."""
    base = os.path.realpath(root)
    real = os.path.realpath(path)
    if real != base and not real.startswith(base.rstrip(os.sep) + os.sep):
        raise error(f"{path} resolves to {real}, outside {root}: refused")
    return path
