"""Graph diffs: how the attribution graphs of the same prompts changed between two sweeps (`ct-ray diff`).

Two sweeps (of one store, or of two) are compared prompt by prompt: the 'ok' graphs both hold for the same prompt
text. Nodes of the two graphs are matched, then everything else is measured through that matching:

- same CLT id for the pair (`graphs.clt` equal): feature nodes match by (layer, feature, position) — `match` 'feature';
- different CLTs (a retrained CLT, another seed): a feature of A matches the feature of B of the same layer whose
  decoder is its mutual best cosine match, when that cosine is >= `threshold` (default 0.7) — `match` 'decoder'.
  A decoder is the feature's W_dec rows for every output layer, flattened (the output layers both CLTs write, when
  their spans differ). "Mutual best" is over the whole dictionaries of both layers, not only the features active in
  the sweeps, so a match does not depend on which prompts were compared; it is 1-to-1 by construction.
- error, embedding and logit nodes match by (kind, layer, position, token).

Only the pruned graphs are compared (kept nodes and edges, whatever `graph_rows` the sweeps wrote). Graphs are read in
batches of prompts through `KeyedRows` (bounded memory: one batch's rows and, for decoder matching, chunks of the
decoders); each feature's match is computed once, for the features that appear. No Ray inside. See
docs/analysis-diff.md.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import re
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..errors import CTRayError, one_line
from ..store.names import check_name, is_name
from ..store.schemas import GRAPH_DIFFS_SCHEMA, TABLES_SCHEMA_VERSION

DEFAULT_THRESHOLD = 0.7
TOP_EDGES = 10
BATCH_PROMPTS = 32
TABLE = "graph_diffs"

_GRAPH_COLS = ["key", "prompt_index", "prompt", "status", "model", "clt", "top_token", "top_token_str", "top_prob",
               "logit_tokens", "logit_probs", "replacement_score_pruned", "completeness_score_pruned"]
_NODE_COLS = ["key", "node", "kind", "layer", "position", "feature", "token", "token_str", "influence", "kept"]
_EDGE_COLS = ["key", "source", "target", "weight", "kept"]
_MEAN_COLS = ("replacement_delta", "completeness_delta", "top_prob_delta", "logit_prob_l1", "influence_a",
              "influence_b", "matched_influence_a", "matched_influence_b", "edge_change_l1",
              "edge_change_rel")
_SUM_COLS = ("n_features_a", "n_features_b", "n_matched")


def diff_id_of(sweep_a: str, sweep_b: str) -> str:
    """The `graph_diffs` partition of a diff: `A..B`, or (over 128 characters, or an id holding '..', which would make
    `A..B` ambiguous) the ids' heads plus a hash of both."""
    name = f"{sweep_a}..{sweep_b}"
    if not is_name(name) or ".." in sweep_a or ".." in sweep_b:  # both ids are names: only the length can fail
        h = hashlib.sha256(json.dumps([sweep_a, sweep_b]).encode()).hexdigest()[:16]  # the pair, not the joined text
        name = f"{sweep_a[:50].rstrip('.')}..{sweep_b[:50].rstrip('.')}-{h}"
    return check_name(name, "diff id")


# --- which graphs are compared -------------------------------------------------------------------------------------
def ok_graphs(store, sweep_id: str, side: str) -> dict[str, dict]:
    """{prompt: graphs row} of a sweep's 'ok' graphs (a prompt in the sweep twice: its first occurrence)."""
    check_name(sweep_id, f"sweep {side}")
    store.check_exists()  # a mistyped store must not read as an empty sweep
    g = store.read("graphs", sweep_id, columns=_GRAPH_COLS)
    if not g.num_rows:
        have = store.partitions("graphs")
        raise CTRayError(f"no committed graphs in sweep {sweep_id!r} of {store.url}"
                         + (f"; sweeps there: {', '.join(have[:10])}" if have else " (the store has no graphs)"))
    rows = sorted((r for r in g.to_pylist() if r["status"] == "ok"),
                  key=lambda r: (r["prompt_index"] is None, r["prompt_index"] or 0, r["key"]))
    if not rows:
        raise CTRayError(f"sweep {sweep_id!r} has no 'ok' graphs to compare ({g.num_rows} error rows)")
    out: dict[str, dict] = {}
    for r in rows:
        out.setdefault(r["prompt"], r)
    return out


# --- feature matching ----------------------------------------------------------------------------------------------
class SameFeatures:
    """One CLT on both sides: a feature is itself."""

    kind = "feature"

    def map(self, layer: int, feats: np.ndarray) -> np.ndarray:
        return feats


class DecoderMatcher:
    """Features of two CLTs matched layer by layer by mutual best decoder cosine >= threshold (see the module doc).

    Matches are computed on demand, for the features of A that appear in the graphs, and cached: per query, one pass
    over B's decoders of the layer (A's rows against all of B's) and one over A's (each best candidate against all of
    A's), in chunks of bounded size, so a lazily loaded CLT's decoders are streamed from its files, never held."""

    kind = "decoder"

    def __init__(self, clt_a, clt_b, threshold: float = DEFAULT_THRESHOLD, chunk_bytes: int = 64 << 20):
        if (clt_a.n_layers, clt_a.d_model) != (clt_b.n_layers, clt_b.d_model):
            raise CTRayError(f"cannot match features of CLTs of different shapes: {clt_a.n_layers} layers x d_model "
                             f"{clt_a.d_model} vs {clt_b.n_layers} x {clt_b.d_model}")
        self.a, self.b, self.threshold, self.chunk_bytes = clt_a, clt_b, float(threshold), chunk_bytes
        self.spans = [min(sa, sb) for sa, sb in zip(clt_a.spans, clt_b.spans)]
        self.cache: list[dict[int, int]] = [{} for _ in range(clt_a.n_layers)]
        self.cosine: list[dict[int, float]] = [{} for _ in range(clt_a.n_layers)]
        self.seconds = 0.0

    def _unit(self, clt, layer: int, idx=None, start: int = 0, stop: int | None = None):
        """Unit-norm flattened decoders of `layer` (rows `idx`, or rows start:stop), float32."""
        import torch

        from ..clt.lazy import decoder_rows

        span = self.spans[layer]
        if idx is not None:
            w = decoder_rows(clt, layer, torch.as_tensor(idx, dtype=torch.long))
        else:
            w = clt.W_dec[layer].detach()[start:stop]
        w = w[:, :span].reshape(len(w), -1).float()
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)  # a zero decoder: cosine 0 with everything

    def _best(self, q, clt, layer: int):
        """(best cosine, index of the best row) of each row of `q` among all of `clt`'s decoders of `layer`; ties go
        to the lower index."""
        import torch

        n = clt.W_dec[layer].shape[0]
        chunk = max(1, self.chunk_bytes // (4 * q.shape[1]))
        best_v = torch.full((len(q),), -math.inf)
        best_i = torch.zeros(len(q), dtype=torch.long)
        for s in range(0, n, chunk):
            v, i = (q @ self._unit(clt, layer, start=s, stop=s + chunk).T).max(1)
            better = v > best_v
            best_v = torch.where(better, v, best_v)
            best_i = torch.where(better, i + s, best_i)
        return best_v, best_i

    def _resolve(self, layer: int, feats: list[int]) -> None:
        from ..attribution.budget import torch_threads

        t0 = time.perf_counter()
        # small ops, one thread: OpenMP threads waiting on a descheduled peer make them ~10x slower on a busy machine
        with torch_threads(1):
            fwd_v, fwd_i = self._best(self._unit(self.a, layer, feats), self.b, layer)
            cands = sorted(set(fwd_i.tolist()))
            _, back_i = self._best(self._unit(self.b, layer, cands), self.a, layer)
        back = dict(zip(cands, back_i.tolist()))
        for f, v, g in zip(feats, fwd_v.tolist(), fwd_i.tolist()):
            ok = back[g] == f and v >= self.threshold
            self.cache[layer][f] = g if ok else -1
            if ok:
                self.cosine[layer][f] = v
        self.seconds += time.perf_counter() - t0

    def map(self, layer: int, feats: np.ndarray) -> np.ndarray:
        """B's feature matching each of A's features `feats` of `layer` (-1: none)."""
        memo = self.cache[layer]
        todo = sorted({int(f) for f in feats} - memo.keys())
        if todo:
            self._resolve(layer, todo)
        return np.array([memo[int(f)] for f in feats], dtype=np.int64)

    def stats(self) -> dict:
        queried = sum(len(c) for c in self.cache)
        matched = sum(len(c) for c in self.cosine)
        cos = [v for c in self.cosine for v in c.values()]
        return {"queried": queried, "matched": matched, "mean_cosine": float(np.mean(cos)) if cos else None,
                "seconds": self.seconds}


_RANDOM_RE = re.compile(r"^random\((.*)\)$")


def _number(v: str):
    """A field of a random(...) CLT id (from the store: untrusted): None, an int or a float, nothing else."""
    if v == "None":
        return None
    try:
        return int(v)
    except ValueError:
        return float(v)  # a ValueError here is the caller's one-line error


def _random_clt(clt_id: str, model: str, models: dict):
    """Rebuild a sweep's `random(features=..,seed=..,...)` CLT exactly as its workers did (clt/io.py)."""
    from ..clt.transcoder import random_clt
    from ..models import load_model
    from ..specs.common import RandomCLTSpec

    m = _RANDOM_RE.match(clt_id)
    fields = {}
    for part in (m.group(1).split(",") if m and m.group(1) else []):
        k, _, v = part.partition("=")
        fields[k.strip()] = _number(v.strip())
    r = RandomCLTSpec.model_validate(fields)
    if model not in models:
        models[model] = load_model(model)
    return random_clt(models[model], r.features, seed=r.seed, firing_rate=r.firing_rate, span=r.span)


def load_decoders(clt_id: str, model: str, *, models: dict | None = None, storage_options: dict | None = None):
    """The CLT a sweep's graphs name (`graphs.clt`; `model`: `graphs.model`, needed to rebuild a random CLT)."""
    from ..clt.io import load_clt

    try:
        if clt_id.startswith("random("):
            return _random_clt(clt_id, model, {} if models is None else models)
        opts = storage_options if clt_id.startswith("s3://") else {}
        return load_clt(clt_id, **(opts or {}))
    except Exception as e:  # a CLT that moved, a model that is not here, a bad id: one line naming the CLT
        raise CTRayError(f"cannot load CLT {clt_id!r} to match features by decoder: {one_line(e)}") from None


# --- one pair of graphs --------------------------------------------------------------------------------------------
def _kept(t: pa.Table | None) -> pa.Table | None:
    """The pruned graph's rows (rows of a `graph_rows: full` sweep carry `kept`; pruned rows are all kept)."""
    if t is None:
        return None
    return t.filter(t.column("kept").fill_null(True)) if t.num_rows else t


def _col(t: pa.Table, name: str) -> np.ndarray:
    return t.column(name).to_numpy(zero_copy_only=False)


def _quote(s) -> str:
    return json.dumps(s if s is not None else "", ensure_ascii=False)


def _label(kind: str, layer: int, pos: int, feat: int, tok_str, feat_b: int | None = None) -> str:
    """A node as the edge strings show it: `L3/F17@2` (decoder match: `L3/F17=F21@2`, B's index), `L3/err@2`,
    `E"cat"@2`, `"Paris"` (a logit)."""
    if kind == "feature":
        other = f"=F{feat_b}" if feat_b is not None and feat_b != feat else ""
        return f"L{layer}/F{feat}{other}@{pos}"
    if kind == "error":
        return f"L{layer}/err@{pos}"
    if kind == "embedding":
        return f"E{_quote(tok_str)}@{pos}"
    return _quote(tok_str)


@dataclass
class _Side:
    """One graph's kept nodes under canonical ids (shared by both sides when nodes match), and its kept edges."""

    cid: np.ndarray  # canonical id of each node row
    is_feature: np.ndarray
    influence: np.ndarray
    lookup: np.ndarray  # node index -> canonical id (-1: not a kept node)
    edges: pa.Table | None


def _side(nodes: pa.Table, edges: pa.Table | None, fmap, ids: dict, labels: dict, is_a: bool) -> _Side:
    """Give each kept node its canonical id (`ids`: node key -> id, shared by both sides; `labels`: id -> what
    `_label` needs, formatted only for the edges shown)."""
    kind = nodes.column("kind").to_pylist()
    layer, pos, feat = _col(nodes, "layer"), _col(nodes, "position"), _col(nodes, "feature")
    tok, tok_str = nodes.column("token").to_pylist(), nodes.column("token_str").to_pylist()
    is_f = np.array([k == "feature" for k in kind], dtype=bool)
    mapped = feat.astype(np.int64)
    if is_a:  # A's features under B's indices (only A's side is mapped: mutual matches are 1-to-1)
        for l in np.unique(layer[is_f]):
            m = is_f & (layer == l)
            mapped[m] = fmap.map(int(l), feat[m].astype(np.int64))
    cid = np.empty(len(kind), dtype=np.int64)
    for i, k in enumerate(kind):
        if k == "feature":
            key = ("feature", int(layer[i]), int(mapped[i]), int(pos[i])) if mapped[i] >= 0 else ("a", i)
        else:
            key = (k, int(layer[i]), int(pos[i]), tok[i])
        c = ids.setdefault(key, len(ids))
        cid[i] = c
        if c not in labels:
            labels[c] = (k, int(layer[i]), int(pos[i]), int(feat[i]), tok_str[i],
                         int(mapped[i]) if is_a and k == "feature" and mapped[i] >= 0 else None)
    node = _col(nodes, "node").astype(np.int64)
    lookup = np.full(int(node.max()) + 1 if len(node) else 0, -1, dtype=np.int64)
    lookup[node] = cid
    infl = np.nan_to_num(_col(nodes, "influence").astype(np.float64))  # NaN: not computed, counts as none
    return _Side(cid, is_f, infl, lookup, edges)


def _edge_codes(s: _Side, n_ids: int) -> tuple[np.ndarray, np.ndarray]:
    """Each kept edge as one int64 (source id x n_ids + target id) and its weight; edges off the kept nodes dropped."""
    if s.edges is None or not s.edges.num_rows or not len(s.lookup):
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    src, tgt = _col(s.edges, "source").astype(np.int64), _col(s.edges, "target").astype(np.int64)
    ok = (src < len(s.lookup)) & (tgt < len(s.lookup))
    src, tgt, w = src[ok], tgt[ok], _col(s.edges, "weight").astype(np.float64)[ok]
    cs, ct = s.lookup[src], s.lookup[tgt]
    ok = (cs >= 0) & (ct >= 0)
    return cs[ok] * n_ids + ct[ok], w[ok]


def _probs(row: dict) -> dict[int, float]:
    return {int(t): float(p) for t, p in zip(row["logit_tokens"] or [], row["logit_probs"] or [])}


def _prob_of(row: dict, token) -> float:
    """The model's probability of `token` in a graph's row; a token that is not one of its logit nodes counts as 0
    (it is below the graph's logit cut-off)."""
    if token is not None and token == row["top_token"] and row["top_prob"] is not None:
        return float(row["top_prob"])
    return _probs(row).get(token, 0.0) if token is not None else 0.0


def compare_graphs(row_a: dict, nodes_a: pa.Table, edges_a: pa.Table | None, row_b: dict, nodes_b: pa.Table,
                   edges_b: pa.Table | None, fmap, top_edges: int = TOP_EDGES) -> tuple[dict, list]:
    """One `graph_diffs` row for a pair of graphs (their graphs rows, node and edge rows), and the pair's largest edge
    changes as (|change|, string) for the sweep-level row."""
    nodes_a, nodes_b = _kept(nodes_a), _kept(nodes_b)
    ids: dict = {}
    labels: dict = {}
    a = _side(nodes_a, _kept(edges_a), fmap, ids, labels, True)
    b = _side(nodes_b, _kept(edges_b), fmap, ids, labels, False)
    in_a = np.zeros(len(ids), dtype=bool)
    in_a[a.cid] = True
    in_b = np.zeros(len(ids), dtype=bool)
    in_b[b.cid] = True
    matched_a, matched_b = a.is_feature & in_b[a.cid], b.is_feature & in_a[b.cid]

    # edges: weights of both graphs on the union of (matched) edges; an edge absent from a graph weighs 0 there
    code_a, w_a = _edge_codes(a, len(ids))
    code_b, w_b = _edge_codes(b, len(ids))
    uniq, inv = np.unique(np.concatenate([code_a, code_b]), return_inverse=True)
    wa = np.bincount(inv[: len(code_a)], weights=w_a, minlength=len(uniq))
    wb = np.bincount(inv[len(code_a):], weights=w_b, minlength=len(uniq))
    has_a = np.bincount(inv[: len(code_a)], minlength=len(uniq)) > 0
    has_b = np.bincount(inv[len(code_a):], minlength=len(uniq)) > 0
    change = np.abs(wb - wa)
    top = [i for i in np.argsort(-change, kind="stable")[:top_edges] if change[i] > 0]
    n = len(ids)
    strings = [f"{_label(*labels[int(uniq[i] // n)])} > {_label(*labels[int(uniq[i] % n)])}: "
               f"{f'{wa[i]:.4g}' if has_a[i] else 'none'} -> {f'{wb[i]:.4g}' if has_b[i] else 'none'}" for i in top]

    pa_, pb_ = _probs(row_a), _probs(row_b)
    top_a = row_a["top_token"]
    row = {
        "prompt": row_a["prompt"], "key_a": row_a["key"], "key_b": row_b["key"], "match": fmap.kind,
        "replacement_delta": _delta(row_b["replacement_score_pruned"], row_a["replacement_score_pruned"]),
        "completeness_delta": _delta(row_b["completeness_score_pruned"], row_a["completeness_score_pruned"]),
        "top_token_a": row_a["top_token_str"], "top_token_b": row_b["top_token_str"],
        "top_prob_delta": _prob_of(row_b, top_a) - _prob_of(row_a, top_a),
        "logit_prob_l1": float(sum(abs(pb_.get(t, 0.0) - pa_.get(t, 0.0)) for t in set(pa_) | set(pb_))),
        "influence_a": float(a.influence[a.is_feature].sum()), "influence_b": float(b.influence[b.is_feature].sum()),
        "matched_influence_a": float(a.influence[matched_a].sum()),
        "matched_influence_b": float(b.influence[matched_b].sum()),
        "n_features_a": int(a.is_feature.sum()), "n_features_b": int(b.is_feature.sum()),
        "n_matched": int(matched_a.sum()),
        "edge_change_l1": float(change.sum()),
        # the same over both graphs' edge mass: 0 unchanged, 1 nothing in common (compares across models)
        "edge_change_rel": float(change.sum() / max(np.abs(wa).sum() + np.abs(wb).sum(), 1e-30)),
        "top_changed_edges": strings,
    }
    return row, [(float(change[i]), s) for i, s in zip(top, strings)]


def _delta(b, a) -> float | None:
    return None if a is None or b is None else float(b) - float(a)


def aggregate(rows: list[dict], sweep_a: str, sweep_b: str, top: list) -> dict:
    """The sweep-level row: means of the per-prompt measures (NaN ones left out), totals of the counts, the largest
    edge changes over all prompts (each prefixed with its prompt) and `n_prompts`."""
    out = {"sweep_a": sweep_a, "sweep_b": sweep_b, "prompt": None, "key_a": None, "key_b": None,
           "top_token_a": None, "top_token_b": None,
           "match": ",".join(sorted({r["match"] for r in rows})), "n_prompts": len(rows),
           "top_changed_edges": [s for _, s in sorted(top, key=lambda t: -t[0])]}
    for c in _MEAN_COLS:
        v = np.array([r[c] for r in rows if r[c] is not None], dtype=np.float64)
        v = v[np.isfinite(v)]
        out[c] = float(v.mean()) if len(v) else None
    for c in _SUM_COLS:
        out[c] = int(sum(r[c] for r in rows))
    return out


# --- two sweeps ----------------------------------------------------------------------------------------------------
class _Matchers:
    """The feature matching of each (CLT of A, CLT of B) pair met, built once (CLTs loaded only for decoder matching)."""

    def __init__(self, threshold: float, storage_options: dict):
        self.threshold, self.storage_options = threshold, storage_options
        self.pairs: dict[tuple, object] = {}
        self.models: dict = {}
        self.load_seconds = 0.0

    def get(self, row_a: dict, row_b: dict):
        ca, cb = row_a["clt"] or "", row_b["clt"] or ""
        if (ca, cb) not in self.pairs:
            if ca == cb:
                self.pairs[ca, cb] = SameFeatures()
            else:
                from ..attribution.budget import torch_threads

                t0 = time.perf_counter()
                with torch_threads(1):  # as in DecoderMatcher._resolve
                    clt_a = load_decoders(ca, row_a["model"], models=self.models, storage_options=self.storage_options)
                    clt_b = load_decoders(cb, row_b["model"], models=self.models, storage_options=self.storage_options)
                self.load_seconds += time.perf_counter() - t0
                self.pairs[ca, cb] = DecoderMatcher(clt_a, clt_b, self.threshold)
        return self.pairs[ca, cb]

    def stats(self) -> dict | None:
        ms = [m for m in self.pairs.values() if isinstance(m, DecoderMatcher)]
        if not ms:
            return None
        st = [m.stats() for m in ms]
        cos = [s["mean_cosine"] for s in st if s["mean_cosine"] is not None]
        return {"queried": sum(s["queried"] for s in st), "matched": sum(s["matched"] for s in st),
                "mean_cosine": float(np.mean(cos)) if cos else None, "clt_pairs": len(ms),
                "seconds": sum(s["seconds"] for s in st), "load_seconds": self.load_seconds}


def _prefetch(matchers: _Matchers, chunk: list[tuple[dict, dict]], nodes_a: dict[str, pa.Table]) -> None:
    """Match the features of a whole batch of A's graphs at once: each decoder matching pass scans whole layers of
    both CLTs, so one pass per layer and batch instead of one per graph."""
    todo: dict[int, tuple] = {}
    for a, b in chunk:
        m, n = matchers.get(a, b), nodes_a.get(a["key"])
        if isinstance(m, DecoderMatcher) and n is not None and n.num_rows:
            n = _kept(n)
            f = np.array([k == "feature" for k in n.column("kind").to_pylist()], dtype=bool)
            todo.setdefault(id(m), (m, []))[1].append((_col(n, "layer")[f], _col(n, "feature")[f]))
    for m, parts in todo.values():
        layer = np.concatenate([p[0] for p in parts]).astype(np.int64)
        feat = np.concatenate([p[1] for p in parts]).astype(np.int64)
        for l in np.unique(layer):
            m.map(int(l), np.unique(feat[layer == l]))


def _batches(pairs: list[tuple[dict, dict]], nodes_a, nodes_b, batch: int):
    """The pairs in batches, ordered by the files that hold them, so that consecutive batches share their reads."""
    order = sorted(pairs, key=lambda p: (nodes_a.first_file(p[0]["key"]), nodes_b.first_file(p[1]["key"])))
    for i in range(0, len(order), batch):
        yield order[i:i + batch]


def check_threshold(threshold) -> float:
    t = float(threshold)
    if not (0.0 < t <= 1.0):
        raise CTRayError(f"--threshold {threshold}: a cosine similarity in (0, 1]")
    return t


def diff_sweeps(store_a, sweep_a: str, sweep_b: str, *, store_b=None, threshold: float = DEFAULT_THRESHOLD,
                batch: int = BATCH_PROMPTS, top_edges: int = TOP_EDGES, write: bool = True,
                progress: bool = False) -> dict:
    """Compare the graphs that sweeps `sweep_a` (of `store_a`) and `sweep_b` (of `store_b`, default the same store)
    hold for the same prompts; write the rows as partition `A..B` of `graph_diffs` in `store_a` (replacing it whole)
    unless `write` is false. Returns the rows (`table`: per prompt, then the sweep-level row) and a summary."""
    from tqdm.auto import tqdm

    from ..store.keyed import KeyedRows

    t0 = time.perf_counter()
    threshold = check_threshold(threshold)
    if batch < 1:
        raise CTRayError(f"--batch {batch}: at least 1 prompt per read")
    if top_edges < 0:
        raise CTRayError(f"--top-edges {top_edges}: 0 or more")
    store_b = store_b or store_a
    diff_id = diff_id_of(check_name(sweep_a, "sweep A"), check_name(sweep_b, "sweep B"))
    ga, gb = ok_graphs(store_a, sweep_a, "A"), ok_graphs(store_b, sweep_b, "B")
    common = [p for p in ga if p in gb]  # in A's prompt order
    if not common:
        raise CTRayError(f"sweeps {sweep_a!r} and {sweep_b!r} have no prompt in common among their 'ok' graphs "
                         f"({len(ga)} and {len(gb)} prompts)")
    pairs = [(ga[p], gb[p]) for p in common]
    nodes_a = KeyedRows(store_a, "nodes", sweep_a, {a["key"] for a, _ in pairs})
    edges_a = KeyedRows(store_a, "edges", sweep_a, {a["key"] for a, _ in pairs})
    nodes_b = KeyedRows(store_b, "nodes", sweep_b, {b["key"] for _, b in pairs})
    edges_b = KeyedRows(store_b, "edges", sweep_b, {b["key"] for _, b in pairs})
    matchers = _Matchers(threshold, store_b.storage_options)
    t_plan = time.perf_counter()

    rows: dict[str, dict] = {}
    top: list = []  # the largest edge changes over all prompts (a bounded heap)
    bar = tqdm(total=len(pairs), desc=f"diff {diff_id}", unit="prompt", disable=not progress)
    try:
        for chunk in _batches(pairs, nodes_a, nodes_b, batch):
            ka, kb = [a["key"] for a, _ in chunk], [b["key"] for _, b in chunk]
            na, ea = nodes_a.read(ka, _NODE_COLS), edges_a.read(ka, _EDGE_COLS)
            nb, eb = nodes_b.read(kb, _NODE_COLS), edges_b.read(kb, _EDGE_COLS)
            _prefetch(matchers, chunk, na)
            for a, b in chunk:
                for side, k, got in (("A", a["key"], na), ("B", b["key"], nb)):
                    if k not in got:
                        raise CTRayError(f"graph {k} of sweep {sweep_a if side == 'A' else sweep_b!r}: no node rows "
                                         "committed (the tables are inconsistent)")
                row, changes = compare_graphs(a, na[a["key"]], ea.get(a["key"]), b, nb[b["key"]], eb.get(b["key"]),
                                              matchers.get(a, b), top_edges)
                rows[a["prompt"]] = {"sweep_a": sweep_a, "sweep_b": sweep_b, **row}
                for c, s in changes:
                    item = (c, f"{_short(a['prompt'])}: {s}")
                    (heapq.heappush if len(top) < top_edges else heapq.heappushpop)(top, item)
                bar.update()
    finally:
        bar.close()
    t_diff = time.perf_counter()

    per_prompt = [rows[p] for p in common]
    agg = aggregate(per_prompt, sweep_a, sweep_b, top)
    out = [*per_prompt, agg]
    for r in out:
        r["schema_version"] = TABLES_SCHEMA_VERSION
    table = pa.Table.from_pylist(out, schema=GRAPH_DIFFS_SCHEMA)
    if write:
        from ..store.commit import replace_partition

        replace_partition(store_a, TABLE, diff_id, table, {"ct-ray.diff": diff_id})
    t_end = time.perf_counter()
    return {"diff_id": diff_id, "sweep_a": sweep_a, "sweep_b": sweep_b, "store": store_a.url,
            "store_b": store_b.url, "n_prompts": len(common), "only_a": len(ga) - len(common),
            "only_b": len(gb) - len(common), "threshold": threshold, "match": agg["match"],
            "features": matchers.stats(), "aggregate": agg, "table": table, "written": write,
            "seconds": {"plan": t_plan - t0, "diff": t_diff - t_plan, "write": t_end - t_diff, "total": t_end - t0}}


def _short(prompt: str, n: int = 40) -> str:
    p = prompt.replace("\n", " ")
    return _quote(p if len(p) <= n else p[: n - 3] + "...")


def _fmt(v, spec: str = "+.4f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def format_summary(r: dict, show: int = 5) -> str:
    """A few lines for the terminal: what was compared, the mean deltas, the most changed prompts."""
    agg = r["aggregate"]
    lines = [f"diff {r['diff_id']}: {r['n_prompts']} prompt(s) compared, match by {r['match']}"
             + (f" ({r['only_a']} only in A, {r['only_b']} only in B)" if r["only_a"] or r["only_b"] else "")]
    f = r["features"]
    if f:
        lines.append(f"  decoder matching (mutual best cosine >= {r['threshold']:g}): {f['matched']} of {f['queried']} "
                     f"features of A matched" + (f", mean cosine {f['mean_cosine']:.3f}" if f["mean_cosine"] else ""))
    n_a, n_m = agg["n_features_a"], agg["n_matched"]
    share = agg["matched_influence_a"] / agg["influence_a"] if agg["influence_a"] else None
    lines += [
        f"  mean replacement delta {_fmt(agg['replacement_delta'])}, completeness delta "
        f"{_fmt(agg['completeness_delta'])} (pruned graphs, B - A)",
        f"  mean top-token probability delta {_fmt(agg['top_prob_delta'])}, mean logit probability L1 "
        f"{_fmt(agg['logit_prob_l1'], '.4f')}",
        f"  feature nodes matched: {n_m} of {n_a} in A, {agg['n_features_b']} in B; "
        f"influence on matched features: {_fmt(share, '.1%')} of A's",
        f"  mean edge change L1 {_fmt(agg['edge_change_l1'], '.4g')}",
    ]
    per = [row for row in r["table"].to_pylist() if row["prompt"] is not None]
    moved = sorted(per, key=lambda x: -(x["edge_change_l1"] or 0.0))[:show]
    if moved and moved[0]["edge_change_l1"]:
        lines.append("  most changed prompts (edge change L1, top token A -> B):")
        for x in moved:
            lines.append(f"    {_short(x['prompt'])}: {x['edge_change_l1']:.4g}, {_quote(x['top_token_a'])} -> "
                         f"{_quote(x['top_token_b'])}"
                         + (f"; {x['top_changed_edges'][0]}" if x["top_changed_edges"] else ""))
    lines.append(f"  wrote {r['table'].num_rows} row(s) to table {TABLE}, diff_id={r['diff_id']} of {r['store']}"
                 if r["written"] else "  not written (--no-write)")
    return "\n".join(lines)
