"""Automatic supernodes of a sweep (`ct-ray analyze --supernodes`): every graph's groups (supernodes.py), and the
sweep's consensus groups of features.

Per graph: `auto_supernodes_rows` on its kept rows, with its CLT's decoder and encoder directions when the CLT can be
loaded (the CLT id the graphs rows name; a random one is rebuilt), else from the graph alone. Rows of the
`supernodes` table with the graph's key.

Per sweep: two features are *co-grouped* in a graph when one of its groups holds both. Their consensus is the number
of graphs co-grouping them over the number of graphs holding the rarer of the two (`n_prompts`). Features joined by a
consensus of at least `CONSENSUS` in at least `MIN_SUPPORT` graphs are linked; each connected component of links is
cut by average linkage on 1 - consensus at 1 - `CONSENSUS` (so chains a-b, b-c do not join a and c alone), and every
part of two or more features is a sweep-level group:
rows with a null key and method `auto-v1-consensus`, the features in `layers` / `features` (no `node_ids`), their
summed `influence_sum` as `influence`.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from ..store.schemas import TABLES_SCHEMA_VERSION

log = logging.getLogger(__name__)
CONSENSUS, MIN_SUPPORT = 0.5, 2
_CLTS: dict[str, object] = {}  # CLTs loaded in this process (a task worker reads several units of one CLT)


def _clt(clt_id: str, model: str | None):
    if clt_id not in _CLTS:
        from .diff import load_decoders

        try:
            _CLTS[clt_id] = load_decoders(clt_id, model or "")
        except Exception as e:  # the groups are still made, from the graph alone
            log.warning("automatic supernodes without CLT %s: %s", clt_id, e)
            _CLTS[clt_id] = None
    return _CLTS[clt_id]


def graph_groups(nodes: pa.Table, edges: pa.Table, keys: list[str], fcode_of, clt_ids: list[str | None],
                 models: list[str | None], use_clt: bool = True) -> tuple[pa.Table, pa.Table]:
    """(supernodes rows of each graph, co-grouped feature pairs with their counts) of a unit's graphs. `fcode_of`
    maps a graph's node rows to the feature codes of its feature nodes (stats.feature_code)."""
    from ..store.keyed import by_key
    from ..store.schemas import conform
    from .auto_supernodes import auto_supernodes_rows, supernode_rows

    n_by, e_by = by_key(nodes), by_key(edges)
    rows, pairs, skipped = [], [], []
    for i, k in enumerate(keys):
        if k not in n_by:
            continue
        n = n_by[k]
        clt = _clt(clt_ids[i], models[i]) if use_clt and clt_ids[i] else None
        e = e_by.get(k, edges.slice(0, 0))
        try:
            sset = auto_supernodes_rows(n, e, clt=clt)
        except ValueError as err:  # inconsistent rows of one graph: no groups for it, the others go on
            skipped.append((k, err))
            continue
        if not sset.supernodes:
            continue
        rows.append(supernode_rows(sset, n, key=k))
        code = dict(zip(n.column("node_id").to_pylist(), fcode_of(n, i).tolist()))
        for s in sset.supernodes:
            fc = np.unique([code[m] for m in s.nodes if code.get(m, -1) >= 0])
            if len(fc) > 1:
                a, b = np.triu_indices(len(fc), 1)
                pairs.append(np.stack([fc[a], fc[b]], 1))
    if skipped:
        log.warning("%d graph(s) without automatic supernodes, e.g. %s: %s", len(skipped), *skipped[0])
    sn = conform(pa.concat_tables(rows), "supernodes") if rows else conform([], "supernodes")
    p = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    pt = pa.table({"a": p[:, 0], "b": p[:, 1], "n": np.ones(len(p), np.int64)})
    return sn.drop_columns(["sweep_id"]), _sum_pairs(pt)


def _sum_pairs(t: pa.Table) -> pa.Table:
    g = t.group_by(["a", "b"], use_threads=False).aggregate([("n", "sum")])
    return pa.table({"a": g.column("a"), "b": g.column("b"), "n": g.column("n_sum")})


def merge_pairs(tables: list[pa.Table]) -> pa.Table:
    return _sum_pairs(pa.concat_tables(tables))


def sweep_groups(pairs: pa.Table, fcode: np.ndarray, n_prompts: np.ndarray, influence: np.ndarray,
                 decode, clts: list[str], label_of) -> pa.Table:
    """The sweep-level groups (rows with a null key) from the co-grouped pairs; `fcode` sorted, aligned with
    `n_prompts` and `influence`; `decode(codes)` -> (clt code, layer, feature); `label_of(i)` a feature's top logit."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not pairs.num_rows:
        return _empty()
    a, b, n = (pairs.column(c).to_numpy() for c in ("a", "b", "n"))
    ia, ib = np.searchsorted(fcode, a), np.searchsorted(fcode, b)
    cons = n / np.maximum(np.minimum(n_prompts[ia], n_prompts[ib]), 1)
    keep = (n >= MIN_SUPPORT) & (cons >= CONSENSUS)
    if not keep.any():
        return _empty()
    g = coo_matrix((np.ones(int(keep.sum())), (ia[keep], ib[keep])), shape=(len(fcode), len(fcode)))
    _, comp = connected_components(g, directed=False)
    members = np.unique(np.r_[ia[keep], ib[keep]])
    cons_of = {(int(x), int(y)): float(c) for x, y, c in zip(ia[keep], ib[keep], cons[keep])}
    groups = []
    for c in np.unique(comp[members]):
        groups += _split(members[comp[members] == c], cons_of)
    rows = []
    for m in groups:
        if len(m) < 2:
            continue
        cc, lay, fea = decode(fcode[m])
        order = np.lexsort((fea, lay))
        m, lay, fea = m[order], lay[order], fea[order]
        top = m[np.argmax(influence[m])]
        span = f"L{lay.min()}" if lay.min() == lay.max() else f"L{lay.min()}-{lay.max()}"
        lbl = label_of(top)
        rows.append({"key": None, "method": "auto-v1-consensus", "supernode": f"{span} {lbl}".strip()[:64],
                     "size": len(m), "node_ids": [],
                     "layers": lay.tolist(), "features": fea.tolist(), "influence": float(influence[m].sum()),
                     "label": f"{clts[int(cc[0])]}: {lbl}"[:500], "schema_version": TABLES_SCHEMA_VERSION})
    rows.sort(key=lambda r: -r["influence"])
    return pa.Table.from_pylist(rows, schema=_schema()) if rows else _empty()


def _split(m: np.ndarray, cons_of: dict, max_dense: int = 2000) -> list[np.ndarray]:
    """A connected component cut where its members are not consensus-linked on average: average linkage over
    1 - consensus (0 consensus for pairs never co-grouped enough), cut at 1 - CONSENSUS. Components chain otherwise
    (a-b and b-c linked puts a and c together whatever a-c says)."""
    if len(m) <= 2 or len(m) > max_dense:
        return [m]
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    idx = {int(x): i for i, x in enumerate(m)}
    d = np.ones((len(m), len(m)))
    np.fill_diagonal(d, 0.0)
    for (x, y), c in cons_of.items():
        if x in idx and y in idx:
            d[idx[x], idx[y]] = d[idx[y], idx[x]] = 1.0 - min(c, 1.0)
    labels = fcluster(linkage(squareform(d, checks=False), "average"), 1.0 - CONSENSUS, criterion="distance")
    return [m[labels == k] for k in np.unique(labels)]


def _schema() -> pa.Schema:
    from ..store.schemas import SCHEMAS

    return pa.schema([f for f in SCHEMAS["supernodes"] if f.name != "sweep_id"])


def _empty() -> pa.Table:
    return _schema().empty_table()


def label_from_lists(top_logits: pa.Array):
    """label_of for sweep_groups: a feature's top pushed logit, quoted (or '')."""
    vals = top_logits.to_pylist()
    return lambda i: (f"→ {vals[i][0]!r}" if vals[i] else "")

