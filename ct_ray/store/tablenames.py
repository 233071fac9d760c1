"""Table-name arguments of the maintenance commands, and byte counts for people."""

from __future__ import annotations

from .schemas import TABLE_NAMES


def table_names(tables, order=TABLE_NAMES) -> list[str]:
    """The tables asked for (names, or one comma-separated string), in `order`; a one-line ValueError if unknown."""
    if tables is None:
        return list(order)
    if isinstance(tables, str):
        tables = [tables]
    want = {n.strip() for t in tables for n in str(t).split(",") if n.strip()}
    unknown = sorted(want - set(TABLE_NAMES))
    if unknown:
        raise ValueError(f"unknown table(s) {', '.join(unknown)}: the tables are {', '.join(TABLE_NAMES)}")
    return [n for n in order if n in want]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
