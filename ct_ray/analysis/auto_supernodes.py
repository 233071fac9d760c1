"""Automatic supernodes: group the feature nodes of one (pruned) attribution graph that play the same role.

Method (docs/analysis-supernodes.md). Every feature node gets up to five unit-norm descriptions ("blocks"):
  logits    its signed, normalised indirect influence on each logit node: column s of the logit rows of
            M = (I - Ã)^{-1} - I, with Ã = A / (row sums of |A|) (pruning's normalisation, signs kept, so a feature
            that pushes " Paris" and one that suppresses it are opposites, not twins);
  targets   the same on the `n_targets` most influential feature nodes (what it feeds downstream);
  decoder   its decoder summed over the layers it writes (its total write to the residual stream), CLT given;
  encoder   its encoder row (what it reads), CLT given;
  contexts  its top-activating contexts (context ids weighted by activation), `features` table rows given.
The similarity of two nodes is the weighted mean of the cosines of the blocks both have (a node without a
downstream feature target, say, is compared on the other blocks only), the distance is 1 - similarity, and
average-linkage agglomerative clustering (scipy) cut at `threshold` makes the groups; groups of at least
`min_size` nodes are the supernodes, named by layer range and the logit they push most ('L3-5 → " Paris"').

Two entry points share the core: `auto_supernodes(graph)` for a `Graph`, `auto_supernodes_rows(nodes, edges)` for a
sweep's node / edge rows of one graph (the `kept` part). No Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from ..attribution.prune import row_sums
from ..perturb.supernodes import Supernode, SupernodeSet

METHOD = "auto-v1"  # the `method` column of supernodes rows
DEFAULT_WEIGHTS = {"logits": 1.0, "targets": 1.0, "decoder": 1.0, "encoder": 0.5, "contexts": 1.0}
BLOCKS = tuple(DEFAULT_WEIGHTS)


@dataclass
class _View:
    """What the method reads of one graph, whichever entry point it came from (nodes in `node` order)."""

    A: torch.Tensor  # [N, N] float32, rows = targets
    kind: np.ndarray  # [N] str
    layer: np.ndarray  # [N] int
    feature: np.ndarray  # [N] int
    node_id: list[str]
    token_str: list[str | None]
    influence: np.ndarray  # [N] float64 logit influence (for the choice of targets and the groups' order)


def _influence(A: torch.Tensor, kind: np.ndarray, layer: np.ndarray, col: np.ndarray, logit_probs) -> np.ndarray:
    """The nodes' `influence` column, or (when a feature node's is missing) pruning's influence w Σ_k Â^k computed
    here by one triangular solve, which for a 7,500-node graph is much cheaper than the series."""
    col = np.asarray(col, dtype=np.float64)
    if not np.isnan(col[kind == "feature"]).any():
        return col
    logits = np.nonzero(kind == "logit")[0]
    probs = np.asarray(logit_probs if logit_probs is not None else [], dtype=np.float64)
    if len(probs) != len(logits):
        raise ValueError(f"{len(probs)} logit probabilities for {len(logits)} logit nodes")
    if not len(logits):
        return np.zeros(len(kind))
    return probs @ indirect_influence(A, layer, logits, absolute=True).double().numpy()


def _view_of_graph(graph) -> _View:
    nodes = graph.nodes
    kind = np.asarray(nodes.column("kind").to_pylist(), dtype=object)
    infl = nodes.column("influence").to_numpy(zero_copy_only=False)
    layer = nodes.column("layer").to_numpy(zero_copy_only=False).astype(np.int64)
    return _View(graph.adjacency.float(), kind, layer,
                 nodes.column("feature").to_numpy(zero_copy_only=False).astype(np.int64),
                 nodes.column("node_id").to_pylist(), nodes.column("token_str").to_pylist(),
                 _influence(graph.adjacency.float(), kind, layer, infl, graph.meta.get("logit_probs")))


def _view_of_rows(nodes: pa.Table, edges: pa.Table, logit_probs) -> _View:
    if "kept" in nodes.column_names:  # full-graph rows (`graph_rows: full`): the pruned part
        nodes = nodes.filter(nodes.column("kept").fill_null(True))
    if "kept" in edges.column_names:
        edges = edges.filter(edges.column("kept").fill_null(True))
    nodes = nodes.sort_by("node")  # the Graph's own node order
    node = nodes.column("node").to_numpy(zero_copy_only=False).astype(np.int64)
    if len(np.unique(node)) != len(node):
        raise ValueError("node rows of more than one graph (a `node` value repeats)")
    kind = np.asarray(nodes.column("kind").to_pylist(), dtype=object)
    N = len(node)
    src = edges.column("source").to_numpy(zero_copy_only=False).astype(np.int64)
    tgt = edges.column("target").to_numpy(zero_copy_only=False).astype(np.int64)
    s_i, t_i = np.searchsorted(node, src), np.searchsorted(node, tgt)
    ok = (s_i < N) & (t_i < N)
    ok[ok] &= (node[s_i[ok]] == src[ok]) & (node[t_i[ok]] == tgt[ok])
    if not ok.all():
        raise ValueError(f"{int((~ok).sum())} edge rows name nodes that are not (kept) node rows")
    A = torch.zeros(N, N)
    w = torch.from_numpy(edges.column("weight").to_numpy(zero_copy_only=False).astype(np.float32))
    A[torch.from_numpy(t_i), torch.from_numpy(s_i)] = w
    if logit_probs is None and "probability" in nodes.column_names:
        p = nodes.column("probability").to_numpy(zero_copy_only=False)
        logit_probs = p[kind == "logit"]
    infl = nodes.column("influence").to_numpy(zero_copy_only=False) if "influence" in nodes.column_names \
        else np.full(N, np.nan)
    layer = nodes.column("layer").to_numpy(zero_copy_only=False).astype(np.int64)
    return _View(A, kind, layer, nodes.column("feature").to_numpy(zero_copy_only=False).astype(np.int64),
                 nodes.column("node_id").to_pylist(), nodes.column("token_str").to_pylist(),
                 _influence(A, kind, layer, infl, logit_probs))


# --- the blocks ------------------------------------------------------------------------------------------------
def indirect_influence(A: torch.Tensor, layer: np.ndarray, rows: np.ndarray, absolute: bool = False) -> torch.Tensor:
    """Rows `rows` of the signed normalised indirect influence M = (I - Ã)^{-1} - I, Ã = A / (row sums of |A|):
    M[t, s] sums, over every path s -> ... -> t, the product of the edges' signed shares of their target's input.
    `absolute`: with |A| instead of A, i.e. pruning's B (prune.influence = logit probabilities @ B[logits]).

    Attribution graphs are layered (every edge goes from a lower to a higher `layer`), so with nodes in layer
    order I - Ã is triangular and one triangular solve with len(rows) right-hand sides gives the rows, without the
    N x N inverse."""
    N = A.shape[0]
    order = torch.from_numpy(np.argsort(layer, kind="stable"))
    lay = torch.from_numpy(layer)[order]
    rs = row_sums(A)[order]  # in chunks: no second N x N temporary
    T = A[order[:, None], order[None, :]]  # one copy, in layer order
    if absolute:
        T.abs_()
    # layered check: no edge into a node from a node at its own layer or above
    bounds = torch.searchsorted(lay, lay, right=False)  # first row of each node's layer
    starts = torch.unique_consecutive(bounds).tolist() + [N]
    for a, b in zip(starts[:-1], starts[1:]):
        if T[a:b, a:].any():
            raise ValueError("the graph has an edge that does not go up in layers: not an attribution graph")
    T.div_(rs[:, None]).neg_()
    T.diagonal().add_(1.0)  # I - Ã, lower triangular in layer order
    pos = torch.empty(N, dtype=torch.long)
    pos[order] = torch.arange(N)
    E = torch.zeros(N, len(rows))
    E[pos[torch.from_numpy(np.asarray(rows, dtype=np.int64))], torch.arange(len(rows))] = 1.0
    # X (I - Ã) = E^T  <=>  (I - Ã)^T X^T = E, upper triangular
    X = torch.linalg.solve_triangular(T.T, E, upper=True)
    del T
    X -= E
    return X[pos].T.contiguous()  # [len(rows), N] in node order


def _unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows scaled to unit norm, and which rows are non-zero (the block is present)."""
    n = x.norm(dim=1)
    present = n > 1e-12 * float(n.max()) if n.numel() and float(n.max()) > 0 else torch.zeros(len(x), dtype=torch.bool)
    return torch.where(present[:, None], x / n.clamp_min(1e-30)[:, None], torch.zeros_like(x)), present


def _clt_blocks(clt, layer: np.ndarray, feature: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    from ..clt.lazy import decoder_rows

    d = clt.d_model
    dec, enc = torch.zeros(len(layer), d), torch.zeros(len(layer), d)
    for l in np.unique(layer).tolist():
        m = np.nonzero(layer == l)[0]
        idx = torch.from_numpy(feature[m])
        if int(idx.max()) >= clt.d_tc[l]:
            raise ValueError(f"feature {int(idx.max())} of layer {l} is not in the CLT (another CLT's graph?)")
        mi = torch.from_numpy(m)
        dec[mi] = decoder_rows(clt, l, idx).float().cpu().sum(1)  # every layer it writes: its total write
        enc[mi] = clt.W_enc[l].detach()[idx.to(clt.W_enc[l].device)].float().cpu()
    return dec, enc


def _context_block(features: pa.Table, layer: np.ndarray, feature: np.ndarray):
    """Sparse [n, contexts] matrix: each node's top contexts weighted by activation / its top activation."""
    from scipy import sparse

    rows = features.select(["layer", "feature", "top_contexts"]).to_pylist()
    ctx_of = {(r["layer"], r["feature"]): r["top_contexts"] or [] for r in rows}
    col_of: dict[int, int] = {}
    ii, jj, vv = [], [], []
    for i, (l, f) in enumerate(zip(layer.tolist(), feature.tolist())):
        ctx = [c for c in ctx_of.get((l, f), []) if c.get("activation") is not None]
        top = max((float(c["activation"]) for c in ctx), default=0.0)
        if top <= 0:
            continue
        w: dict[int, float] = {}
        for c in ctx:
            j = col_of.setdefault(int(c["context"]), len(col_of))
            w[j] = max(w.get(j, 0.0), max(float(c["activation"]), 0.0) / top)
        for j, v in w.items():
            ii.append(i)
            jj.append(j)
            vv.append(v)
    X = sparse.csr_matrix((np.asarray(vv, dtype=np.float64), (ii, jj)), shape=(len(layer), max(1, len(col_of))))
    n = np.sqrt(np.asarray(X.multiply(X).sum(1)).ravel())
    present = n > 0
    X = sparse.diags(np.where(present, 1.0 / np.where(present, n, 1.0), 0.0)) @ X
    return X, torch.from_numpy(present)


# --- the core --------------------------------------------------------------------------------------------------
def _distances(v: _View, feats: np.ndarray, M: torch.Tensor, n_logits: int, *, clt, features,
               weights: dict) -> np.ndarray:
    """Condensed (scipy) distances 1 - (weighted mean of the cosines of the blocks both nodes have) between the
    feature nodes. `M`: rows of the indirect influence (logits first, then the targets) over their columns."""
    F = len(feats)
    blocks: list[tuple[float, torch.Tensor, torch.Tensor]] = []  # (weight, unit rows, present)
    for name, part in (("logits", M[:n_logits]), ("targets", M[n_logits:])):
        if weights[name] > 0 and len(part):
            blocks.append((weights[name], *_unit(part.T)))
    if clt is not None and (weights["decoder"] > 0 or weights["encoder"] > 0):
        dec, enc = _clt_blocks(clt, v.layer[feats], v.feature[feats])
        for name, x in (("decoder", dec), ("encoder", enc)):
            if weights[name] > 0:
                blocks.append((weights[name], *_unit(x)))
    ctx = None
    if features is not None and weights["contexts"] > 0 and features.num_rows:
        ctx = _context_block(features, v.layer[feats], v.feature[feats])
    if not blocks and ctx is None:
        raise ValueError("no block to compare nodes on: every weight is 0 (or no logits, targets, CLT, features)")
    # Σ_b w_b cos_b as one product: the unit blocks side by side, each scaled by sqrt(w_b)
    X = torch.cat([U * w**0.5 for w, U, _ in blocks], 1) if blocks else None
    pres = [p.float() * w for w, _, p in blocks]
    if ctx is not None:
        pres.append(ctx[1].float() * weights["contexts"])
    # divided by Σ_b w_b [i has b][j has b]: a function of the two nodes' sets of blocks, so computed per pair of
    # sets (few) rather than as another F x F product; in the usual case every node has every block (one number)
    P = torch.stack(pres, 1)
    patterns, which = torch.unique(P > 0, dim=0, return_inverse=True)
    den = (patterns.float() * P.max(0).values) @ patterns.float().T  # [patterns, patterns]
    # the condensed upper triangle, a block of rows at a time against the rows after them: half the products of a
    # full F x F similarity and no F x F temporary (scipy's linkage takes this float64 vector as it is)
    out = np.empty(F * (F - 1) // 2, dtype=np.float64)
    step = max(1, (32 << 20) // (4 * max(F, 1)))  # rows per block: ~32 MiB of products
    at = 0
    for r0 in range(0, F - 1, step):
        r1 = min(F - 1, r0 + step)
        S = X[r0:r1] @ X[r0:].T if X is not None else torch.zeros(r1 - r0, F - r0)
        if ctx is not None:
            S += torch.from_numpy((ctx[0][r0:r1] @ ctx[0][r0:].T).toarray()).float() * weights["contexts"]
        if len(patterns) == 1:
            S.div_(float(den[0, 0]) if float(den[0, 0]) > 0 else 1.0)
        else:
            d = den[which[r0:r1]][:, which[r0:]]
            S.div_(d.clamp_min(1e-30)).masked_fill_(d <= 0, 0.0)
        S = S.neg_().add_(1.0).clamp_(0.0, 2.0).numpy()
        for i in range(r0, r1):
            k = F - 1 - i
            out[at : at + k] = S[i - r0, i - r0 + 1 :]
            at += k
    return out


def _group(v: _View, *, clt, features, threshold: float, n_targets: int, weights: dict | None,
           min_size: int) -> SupernodeSet:
    from scipy.cluster.hierarchy import fcluster, linkage

    if min_size < 2:
        raise ValueError("min_size must be >= 2 (a supernode groups several nodes)")
    if not 0.0 <= threshold <= 2.0:
        raise ValueError(f"threshold is a cosine distance in [0, 2], got {threshold}")
    unknown = set(weights or {}) - set(BLOCKS)
    if unknown:
        raise ValueError(f"unknown block weights {sorted(unknown)}; blocks: {', '.join(BLOCKS)}")
    w = {**DEFAULT_WEIGHTS, **(weights or {})}
    feats = np.nonzero(v.kind == "feature")[0]
    if len(feats) < min_size:
        return SupernodeSet()
    logits = np.nonzero(v.kind == "logit")[0]
    # the downstream targets: the most influential feature nodes (ties by node order)
    targets = np.sort(feats[np.argsort(-v.influence[feats], kind="stable")][: max(0, n_targets)])
    if w["targets"] <= 0:
        targets = targets[:0]
    rows = np.concatenate([logits, targets])
    M = indirect_influence(v.A, v.layer, rows) if len(rows) else torch.zeros(0, len(v.kind))
    D = _distances(v, feats, M[:, torch.from_numpy(feats)], len(logits), clt=clt, features=features, weights=w)
    Z = linkage(D, method="average")
    del D
    labels = fcluster(Z, t=threshold, criterion="distance")
    groups = [feats[labels == c] for c in np.unique(labels)]
    groups = [g for g in groups if len(g) >= min_size]
    groups.sort(key=lambda g: (-float(np.abs(v.influence[g]).sum()), int(g.min())))
    # what each node contributes to each logit in logit units: its share of the logit's input (M) times that input's
    # size, so that "the logit it pushes most" compares tokens on one scale (shares of a small logit's input are big)
    push = (M[: len(logits)].double() * row_sums(v.A)[torch.from_numpy(logits)].double()[:, None]).numpy() \
        if len(logits) else None  # [nL, N]
    out, seen = [], {}
    for g in groups:
        name = _name(v, g, logits, push)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name} ({seen[name]})"
        out.append(Supernode(name=name, nodes=[v.node_id[i] for i in g.tolist()]))
    return SupernodeSet(supernodes=out)


def _name(v: _View, g: np.ndarray, logits: np.ndarray, push) -> str:
    lo, hi = int(v.layer[g].min()), int(v.layer[g].max())
    name = f"L{lo}" if lo == hi else f"L{lo}-{hi}"
    if push is None:
        return name
    total = push[:, g].sum(1)  # the group's signed contribution to each logit
    j = int(np.argmax(total)) if total.max() > 0 else int(np.argmin(total))
    arrow = "→" if total[j] > 0 else "⊣"
    return f'{name} {arrow} "{_printable(v.token_str[logits[j]])}"'


def _printable(tok: str | None, limit: int = 32) -> str:
    """A token as the explorer accepts it in a supernode name (printable, no < >, at most 64 characters in all)."""
    t = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in (tok or ""))
    t = t.replace("<", "‹").replace(">", "›")
    return t if len(t) <= limit else t[: limit - 1] + "…"


# --- entry points ----------------------------------------------------------------------------------------------
def auto_supernodes(graph, *, clt=None, features: pa.Table | None = None, threshold: float = 0.5,
                    n_targets: int = 256, weights: dict | None = None, min_size: int = 2) -> SupernodeSet:
    """Automatic supernodes of `graph` (usually pruned): groups of its feature nodes that play the same role.

    clt: the graph's CLT, for the decoder / encoder blocks (else they are skipped).
    features: rows of the `features` table (layer, feature, top_contexts) of that CLT, for the contexts block.
    threshold: average-linkage cut, a distance 1 - similarity (0: identical nodes only; larger: larger groups).
    n_targets: the most influential feature nodes used as downstream targets in the influence profiles.
    weights: per block ('logits', 'targets', 'decoder', 'encoder', 'contexts'), default DEFAULT_WEIGHTS; 0 drops one.
    min_size: smallest group returned.
    Deterministic: the same graph (and CLT, features) gives the same groups, in decreasing total |influence|.
    """
    return _group(_view_of_graph(graph), clt=clt, features=features, threshold=threshold, n_targets=n_targets,
                  weights=weights, min_size=min_size)


def auto_supernodes_rows(nodes: pa.Table, edges: pa.Table, logit_probs=None, *, clt=None,
                         features: pa.Table | None = None, threshold: float = 0.5, n_targets: int = 256,
                         weights: dict | None = None, min_size: int = 2) -> SupernodeSet:
    """`auto_supernodes` from a sweep's rows of one graph: `nodes` (node, node_id, kind, layer, feature, token_str,
    influence, optionally probability and kept) and `edges` (source, target, weight, optionally kept). Only kept
    rows are used: the pruned graph. `logit_probs`: the graphs row's, in node order of the logit nodes (default:
    the nodes' `probability`); only read when `influence` is missing. Same groups as `auto_supernodes` on the Graph
    the rows were written from."""
    return _group(_view_of_rows(nodes, edges, logit_probs), clt=clt, features=features, threshold=threshold,
                  n_targets=n_targets, weights=weights, min_size=min_size)


def supernode_rows(sset: SupernodeSet, nodes: pa.Table, *, key: str | None = None, method: str = METHOD) -> pa.Table:
    """Rows of the `supernodes` table (graph-level: one per supernode) for `sset` over `nodes` (a Graph's nodes or
    a sweep's node rows of that graph)."""
    by_id = {r["node_id"]: r for r in nodes.select(["node_id", "layer", "feature", "influence"]).to_pylist()}
    rows = []
    for s in sset.supernodes:
        ms = [by_id[n] for n in s.nodes]
        infl = [m["influence"] for m in ms if m["influence"] is not None and not np.isnan(m["influence"])]
        rows.append({"key": key, "method": method, "supernode": s.name, "size": len(s.nodes), "node_ids": list(s.nodes),
                     "layers": [m["layer"] for m in ms], "features": [m["feature"] for m in ms],
                     "influence": float(np.sum(infl)) if infl else None, "label": s.name})
    schema = pa.schema([("key", pa.string()), ("method", pa.string()), ("supernode", pa.string()), ("size", pa.int32()),
                        ("node_ids", pa.list_(pa.string())), ("layers", pa.list_(pa.int32())),
                        ("features", pa.list_(pa.int32())), ("influence", pa.float32()), ("label", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)
