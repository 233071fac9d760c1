"""Attention attribution of a (pruned) graph: head loadings of its edges, QK attribution of its top heads, as rows.

One entry point for the CLI, the sweep worker and the benchmark: `attention_attribution(model, clt, graph, ...)`
rebuilds the prompt's replacement model (one forward pass), splits every edge over heads (heads.py) and, with `qk`,
explains the scores of the heads carrying the most of the graph (qk.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from ..models.capture import capture
from ..store.schemas import EDGE_HEADS_SCHEMA, QK_ATTRIBUTIONS_SCHEMA
from .heads import HeadLoadings, head_loadings
from .qk import QKResult, qk_attribution, select_items
from .replacement import Replacement

EDGE_HEADS_COLUMNS = pa.schema([f for f in EDGE_HEADS_SCHEMA if f.name != "key"])
QK_COLUMNS = pa.schema([f for f in QK_ATTRIBUTIONS_SCHEMA if f.name != "key"])


@dataclass
class Attention:
    loadings: HeadLoadings
    edge_heads: pa.Table  # EDGE_HEADS_COLUMNS
    qk: list[QKResult] = field(default_factory=list)
    qk_rows: pa.Table = field(default_factory=QK_COLUMNS.empty_table)  # QK_COLUMNS
    seconds: dict = field(default_factory=dict)


def qk_table(results: list[QKResult]) -> pa.Table:
    """QK results as rows: per score, its top pairwise terms and its top query- and key-side marginals."""
    rows: dict[str, list] = {f.name: [] for f in QK_COLUMNS}

    def add(r: QKResult, role: str, rank: int, q: str | None, k: str | None, w: float) -> None:
        it = r.item
        for name, v in (("target", it.target), ("layer", it.layer), ("head", it.head), ("query_position", it.query),
                        ("key_position", it.key), ("score", r.score), ("pattern", r.pattern), ("role", role),
                        ("rank", rank), ("query_source", q), ("key_source", k), ("weight", w)):
            rows[name].append(v)

    for r in results:
        for i, (q, k, w) in enumerate(r.pairs):
            add(r, "pair", i, q, k, w)
        for i, (q, w) in enumerate(r.query_side):
            add(r, "query", i, q, None, w)
        for i, (k, w) in enumerate(r.key_side):
            add(r, "key", i, None, k, w)
    return pa.table(rows, schema=QK_COLUMNS)


@torch.no_grad()
def attention_attribution(model, clt, graph, *, heads_top: int = 8, qk: bool = False, qk_topk: int = 10,
                          qk_top_fraction: float = 0.6, qk_keys: int = 3, qk_pairs: int = 10) -> Attention:
    """Head loadings of `graph`'s edges (and, with `qk`, QK attribution of its top heads). `graph` is a graph of
    `model` with `clt` (pruned or not); the options are those of `AttributionSpec` (specs/attribution.py)."""
    t0 = time.perf_counter()
    tokens = torch.tensor(graph.meta["tokens"]).to(next(model.model.parameters()).device)
    rep = Replacement(model, clt, capture(model, tokens))
    t1 = time.perf_counter()
    hl = head_loadings(rep, graph)
    t2 = time.perf_counter()
    out = Attention(hl, hl.rows(heads_top), seconds={"setup": t1 - t0, "heads": t2 - t1})
    if qk:
        items = select_items(model, rep, graph, hl, top_fraction=qk_top_fraction, topk=qk_topk, max_keys=qk_keys)
        out.qk = qk_attribution(model, rep, items, top=qk_pairs)
        out.qk_rows = qk_table(out.qk)
        out.seconds["qk"] = time.perf_counter() - t2
    return out


def with_key(table: pa.Table, key: str) -> pa.Table:
    return table.add_column(0, "key", pa.array([key] * table.num_rows, pa.string()))
