"""Perturbation rows as a table: the `perturbations` schema (store/schemas.py, docs/tables.md) is the one row type of
`validate`, `ct-ray perturb --out` (DIR/perturbations.parquet) and a sweep's perturbations table."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

from ..store.schemas import PERTURBATIONS_SCHEMA


def graph_id(graph) -> str:
    """The graph's own id when it has one (meta 'graph_id'), else a digest of model, CLT and tokens."""
    if graph.meta.get("graph_id"):
        return str(graph.meta["graph_id"])
    key = json.dumps([graph.meta.get("model"), graph.meta.get("clt"), graph.meta.get("tokens")])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def perturbation_table(rows: list[dict]) -> pa.Table:
    """Row dicts (any subset of the columns; the rest null) -> a table with the perturbations schema (no partition
    column: a sweep adds `sweep_id` when it commits)."""
    return pa.Table.from_pylist(rows, schema=PERTURBATIONS_SCHEMA)
