"""The explorer's data side: JSON-ready views of the tables (sweeps, graphs with their attention attribution, features,
perturbations, supernodes, and the analysis tables: a sweep's overview from feature_stats / circuit_paths, automatic
supernodes, graph diffs).

Every argument coming from the page is validated here; a bad one raises `BadRequest` (HTTP 400). Every answer is
bounded (limits below). Supernode groupings are the only thing written, to `_sweeps/{sweep}/supernodes/{key}.json`,
and only with `allow_write`.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import threading

import numpy as np

from ..errors import CTRayError, finite_float
from ..features.job import FEATURES_DIR, features_id
from ..store.names import is_name
from ..store.tables import SWEEPS_DIR, Store

_NODE_ID = re.compile(r"^(E|-?\d{1,6})_-?\d{1,9}_\d{1,7}$")
_NAME = re.compile(r"^[^\x00-\x1f\x7f<>]{1,64}$")  # printable, no markup
MAX_SUPERNODES, MAX_SUPERNODE_NODES = 200, 2000
MAX_LIMIT = 5000  # graph rows per /api/graphs answer
MAX_OVERVIEW = 200  # recurring features / paths per /api/overview answer
MAX_PROMPTS = 500  # common prompts per /api/diff answer
MAX_PROMPT_CHARS = 2000  # a prompt given in a query string
HIST_BINS = 20
_METHOD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}$")
GRAPH_COLS = ["key", "prompt_index", "prompt", "status", "error", "model", "clt", "n_tokens", "top_token_str", "top_prob",
              "n_nodes_pruned", "n_edges_pruned", "n_features_pruned", "replacement_score", "completeness_score",
              "replacement_score_pruned", "completeness_score_pruned", "created_at"]


class BadRequest(ValueError):
    pass


def graph_pruning(params: str | None) -> dict:
    """The node / edge thresholds a graph was pruned with, from its graphs row's `params` (a sweep's nest them under
    `pruning`; other writers' rows may hold them flat): the explorer's sliders open there. PruneSpec's defaults for
    those not known."""
    from ..attribution.export import prune_defaults

    try:
        p = json.loads(params or "{}")
    except ValueError:
        p = {}
    p = p if isinstance(p, dict) else {}
    src = p["pruning"] if isinstance(p.get("pruning"), dict) else p
    ok = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1  # noqa: E731
    return {k: float(src[k]) if ok(src.get(k)) else v for k, v in prune_defaults().items()}


class Forbidden(PermissionError):
    pass


class NotFound(LookupError):
    pass


def clean(x):
    """JSON-safe: NaN/inf -> null (browsers reject them), timestamps -> ISO strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if hasattr(x, "isoformat"):
        return x.isoformat()
    return x


def check_id(v, what: str) -> str:
    """Sweep ids, keys, clt ids: the store's one name rule (they become paths)."""
    if not is_name(v):
        raise BadRequest(f"bad {what}")
    return v


def _int(v, what: str, lo: int, hi: int) -> int:
    """An integer query field within [lo, hi]: a negative `limit` would slice rows off the end, a huge layer
    overflows Arrow's int64 compare."""
    try:
        i = int(v)
    except (TypeError, ValueError):
        raise BadRequest(f"bad {what}: not an integer") from None
    if not lo <= i <= hi:
        raise BadRequest(f"bad {what}: give {lo}..{hi}")
    return i


def _float(v, what: str) -> float | None:
    if v in (None, ""):
        return None
    return finite_float(v, what, BadRequest)


def _text(v, what: str, hi: int) -> str | None:
    """A free-text query field (a prompt, a filter): at most `hi` characters, no NUL."""
    if v is None:
        return None
    if len(v) > hi or "\x00" in v:
        raise BadRequest(f"bad {what}: at most {hi} characters")
    return v


def _cut(s, n: int = 300):
    return s if not isinstance(s, str) or len(s) <= n else s[: n - 1] + "…"


def histogram(values, bins: int = HIST_BINS) -> dict:
    """Counts of the finite values in `bins` equal bins over [min(0, lo), max(1, hi)] (scores live in [0, 1])."""
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    lo = min(0.0, float(v.min())) if len(v) else 0.0
    hi = max(1.0, float(v.max())) if len(v) else 1.0
    counts, _ = np.histogram(v, bins=bins, range=(lo, hi))
    return {"n": int(len(v)), "missing": len(values) - int(len(v)), "lo": lo, "hi": hi, "counts": counts.tolist(),
            "mean": float(v.mean()) if len(v) else None, "median": float(np.median(v)) if len(v) else None}


def diff_id_of(a: str, b: str) -> str:
    """The graph_diffs partition `ct-ray diff A B` writes (ct_ray/analysis/diff.py owns the rule)."""
    try:
        from ..analysis.diff import diff_id_of as rule
    except ImportError:  # the diff module is optional here: its plain form
        return f"{a}..{b}"
    return rule(a, b)


FEATURE_STATS_COLS = ["clt", "layer", "feature", "node_prefix", "n_prompts", "n_prompts_kept", "frac_prompts",
                      "activation_mean", "activation_max", "influence_sum", "influence_mean", "influence_max",
                      "top_logits", "top_logit_weights", "top_keys", "top_key_influence"]
PATH_COLS = ["key", "path", "hops", "node_ids", "logit_str", "score", "support", "support_frac", "mean_score"]
EDGE_HEADS_COLS = ["source", "target", "layer", "head", "weight"]
QK_COLS = ["target", "layer", "head", "query_position", "key_position", "score", "pattern", "role", "rank",
           "query_source", "key_source", "weight"]
SUPERNODE_COLS = ["key", "method", "supernode", "size", "node_ids", "influence", "label"]


class ExplorerAPI:
    def __init__(self, store: Store, allow_write: bool = False, graph_json: str | None = None):
        self.store, self.allow_write, self.graph_json_path = store, allow_write, graph_json
        self._features: dict[str, object] = {}  # clt_id -> Arrow table (read once per job)
        self._lock = threading.Lock()

    def info(self) -> dict:
        from ..attribution.export import prune_defaults

        return {"store": self.store.url, "writable": self.allow_write, "graph_json": bool(self.graph_json_path),
                "prune_defaults": prune_defaults()}

    def sweeps(self) -> list[dict]:
        out = []
        for sid in self.store.sweeps():
            g = self.store.read("graphs", sid, columns=["status"]).column("status").to_pylist()
            plan = self.store.read_json(f"{SWEEPS_DIR}/{sid}/plan.json") or {}
            out.append({"sweep_id": sid, "graphs": len(g), "ok": g.count("ok"), "model": plan.get("model"),
                        "clt": plan.get("clt")})
        return out

    def graphs(self, q: dict) -> list[dict]:
        sweeps = [check_id(q["sweep"], "sweep")] if q.get("sweep") else self.store.sweeps()
        text = (q.get("q") or "").lower()
        status = q.get("status") or None
        if status not in (None, "ok", "error"):
            raise BadRequest("status must be ok or error")
        mins = {c: _float(q.get(f"min_{c}"), f"min_{c}") for c in ("completeness", "replacement")}
        limit = _int(q.get("limit") or 500, "limit", 1, MAX_LIMIT)
        out = []
        for sid in sweeps:
            for r in self.store.read("graphs", sid, columns=GRAPH_COLS).to_pylist():
                if text and text not in (r["prompt"] or "").lower() or status and r["status"] != status:
                    continue
                if any(m is not None and not ((r[f"{c}_score"] or -1) >= m) for c, m in mins.items()):
                    continue
                out.append({"sweep_id": sid, **r})
        out.sort(key=lambda r: (r["sweep_id"], r["prompt_index"] if r["prompt_index"] is not None else 1 << 30))
        return clean(out[:limit])

    def _graph_row(self, sid: str, key: str) -> dict:
        rows = self.store.read("graphs", sid, keys=[key]).to_pylist()
        if not rows:
            raise NotFound(f"no graph {key} in sweep {sid}")
        return rows[0]

    def graph(self, q: dict) -> dict:
        sid, key = check_id(q.get("sweep"), "sweep"), check_id(q.get("key"), "key")
        row = self._graph_row(sid, key)
        if row["status"] != "ok":
            raise NotFound(f"graph {key} failed: {row['error']}")
        nodes = self.store.read("nodes", sid, keys=[key]).drop_columns(["key"]).sort_by("node").to_pylist()
        e = self.store.read("edges", sid, keys=[key])
        edges = {c: e.column(c).to_pylist() for c in ("source", "target", "weight")}
        row.pop("created_at", None)
        return clean({"sweep_id": sid, "meta": row, "nodes": nodes, "edges": edges, "pruning": graph_pruning(row.get("params")),
                      "features_id": self._features_id(row["clt"]), "supernodes": self._supernodes(sid, key),
                      **self._attention(sid, key)})

    def _attention(self, sid: str, key: str) -> dict:
        """A graph's attention attribution, when its sweep computed one (`attribution: {heads/qk: true}`):
        `edge_heads` (each kept edge split over heads, as columns like `edges`) and `qk` (the explained attention
        scores' rows). Empty when the tables do not exist (Store.read reads nothing then) or hold nothing for the key."""
        eh = self.store.read("edge_heads", sid, columns=EDGE_HEADS_COLS, keys=[key])
        qk = self.store.read("qk_attributions", sid, columns=QK_COLS, keys=[key])
        if qk.num_rows:
            qk = qk.sort_by([("target", "ascending"), ("layer", "ascending"), ("head", "ascending"),
                             ("query_position", "ascending"), ("key_position", "ascending"), ("role", "ascending"),
                             ("rank", "ascending")])
        return {"edge_heads": {c: eh.column(c).to_pylist() for c in EDGE_HEADS_COLS}, "qk": qk.to_pylist()}

    def _features_id(self, clt: str | None) -> str | None:
        """The features partition of a graph's CLT: its own id, else one whose job names the same CLT directory."""
        if not clt:
            return None
        have = self.store.partitions("features")
        cid = features_id(clt)
        if cid in have:
            return cid
        base = clt.rstrip("/").rsplit("/", 1)[-1]
        for c in filter(is_name, have):  # partition values come from the store: never a path unchecked
            rec = self.store.read_json(f"{FEATURES_DIR}/{c}/job.json") or {}
            if str(rec.get("clt", "")).rstrip("/").rsplit("/", 1)[-1] == base:
                return c
        return None

    def feature(self, q: dict) -> dict:
        cid = check_id(q.get("clt_id"), "clt_id")
        layer, feat = _int(q.get("layer"), "layer", -1, 1 << 20), _int(q.get("feature"), "feature", 0, (1 << 31) - 1)
        with self._lock:
            t = self._features.get(cid)
            if t is None:
                t = self.store.read("features", cid)  # the committed job's rows only (one commit replaces them)
                if not t.num_rows:
                    raise NotFound(f"no feature dashboards for {cid} (run ct-ray features)")
                self._features[cid] = t
        import pyarrow.compute as pc

        hit = t.filter(pc.and_(pc.equal(t.column("layer"), layer), pc.equal(t.column("feature"), feat)))
        if not hit.num_rows:
            raise NotFound(f"feature {layer}/{feat} is not in {cid}")
        return clean(hit.to_pylist()[0])

    def perturbations(self, q: dict) -> list[dict]:
        sid, key = check_id(q.get("sweep"), "sweep"), check_id(q.get("key"), "key")
        cols = ["intervention", "node", "node_id", "layer", "position", "feature", "op", "value", "mode", "target_id",
                "target_kind", "baseline", "predicted_delta", "measured_delta", "status", "error"]
        return clean(self.store.read("perturbations", sid, columns=cols, keys=[key]).to_pylist())

    # --- supernodes -------------------------------------------------------------------------------------------
    def _supernodes(self, sid: str, key: str) -> list[dict]:
        return (self.store.read_json(f"{SWEEPS_DIR}/{sid}/supernodes/{key}.json") or {}).get("supernodes", [])

    def get_supernodes(self, q: dict) -> dict:
        sid, key = check_id(q.get("sweep"), "sweep"), check_id(q.get("key"), "key")
        return {"supernodes": self._supernodes(sid, key)}

    def put_supernodes(self, q: dict, body: bytes) -> dict:
        if not self.allow_write:
            raise Forbidden("read-only explorer: start ct-ray serve with --allow-write to save supernodes")
        sid, key = check_id(q.get("sweep"), "sweep"), check_id(q.get("key"), "key")
        try:
            data = json.loads(body.decode("utf-8"))
        except (ValueError, RecursionError):  # also numbers past int's digit limit
            raise BadRequest("body must be JSON") from None
        groups = data.get("supernodes") if isinstance(data, dict) else None
        if not isinstance(groups, list) or len(groups) > MAX_SUPERNODES:
            raise BadRequest(f"give {{'supernodes': [...]}} with at most {MAX_SUPERNODES} groups")
        for g in groups:
            if not isinstance(g, dict) or set(g) != {"name", "nodes"}:
                raise BadRequest("each supernode is {name, nodes}")
            if not isinstance(g["name"], str) or not _NAME.match(g["name"]) or g["name"] != g["name"].strip():
                raise BadRequest("a supernode name is 1-64 printable characters without < or >")
            if not isinstance(g["nodes"], list) or not 1 <= len(g["nodes"]) <= MAX_SUPERNODE_NODES:
                raise BadRequest(f"a supernode has 1-{MAX_SUPERNODE_NODES} nodes")
            if not all(isinstance(n, str) and _NODE_ID.match(n) for n in g["nodes"]):
                raise BadRequest("bad node id")
        from ..perturb.supernodes import SupernodeSet

        try:  # unique names, disjoint groups, no repeated node
            SupernodeSet.model_validate({"supernodes": groups})
        except Exception as e:
            raise BadRequest(f"bad supernodes: {str(e).splitlines()[-1].strip() if str(e) else e}") from None
        row = self._graph_row(sid, key)
        have = set(self.store.read("nodes", sid, columns=["node_id"], keys=[key]).column("node_id").to_pylist())
        missing = sorted({n for g in groups for n in g["nodes"]} - have)
        if missing:
            raise BadRequest(f"node {missing[0]} is not in the graph")
        from ..attribution.export import supernode_params

        # also in the viewers' qParams form ([name, *node ids], members pinned): paste into a graph JSON as is
        sn, pinned = supernode_params(groups, have)
        try:
            self.store.write_json(f"{SWEEPS_DIR}/{sid}/supernodes/{key}.json",
                                  {"sweep_id": sid, "key": key, "prompt": row["prompt"], "supernodes": groups,
                                   "qParams": {"supernodes": sn, "pinnedIds": pinned}})
        except CTRayError as e:
            raise BadRequest(str(e)) from None
        return {"supernodes": groups}

    # --- the analysis tables ----------------------------------------------------------------------------------
    def overview(self, q: dict) -> dict:
        """A sweep at a glance: histograms of its graphs' pruned scores, its most recurring features
        (feature_stats) and its strongest recurring paths (circuit_paths), and the diffs that name it."""
        import pyarrow as pa
        import pyarrow.compute as pc

        sid = check_id(q.get("sweep"), "sweep")
        n_feat = _int(q.get("features") or 25, "features", 1, MAX_OVERVIEW)
        n_paths = _int(q.get("paths") or 20, "paths", 1, MAX_OVERVIEW)
        g = self.store.read("graphs", sid, columns=["key", "prompt", "status", "replacement_score_pruned",
                                                    "completeness_score_pruned"])
        if not g.num_rows and sid not in self.store.sweeps():
            raise NotFound(f"no sweep {sid}")
        ok = g.filter(pc.equal(g.column("status"), "ok"))
        plan = self.store.read_json(f"{SWEEPS_DIR}/{sid}/plan.json") or {}
        prompt_of = dict(zip(g.column("key").to_pylist(), g.column("prompt").to_pylist()))
        out = {"sweep_id": sid, "graphs": g.num_rows, "ok": ok.num_rows, "model": plan.get("model"),
               "clt": plan.get("clt"), "store": self.store.url,
               "scores": {c: histogram(ok.column(f"{c}_score_pruned").to_pylist())
                          for c in ("replacement", "completeness")},
               "command": f"ct-ray analyze {sid} --store {shlex.quote(self.store.url)}"}

        fs = self.store.read("feature_stats", sid, columns=FEATURE_STATS_COLS)
        top = fs.sort_by([("n_prompts", "descending"), ("influence_sum", "descending"), ("layer", "ascending"),
                          ("feature", "ascending")]).slice(0, n_feat).to_pylist()
        fid = {c: self._features_id(c) for c in {r["clt"] for r in top}}
        feats = []
        for r in top:
            logits = list(zip(r.pop("top_logits") or [], r.pop("top_logit_weights") or []))
            keys = list(zip(r.pop("top_keys") or [], r.pop("top_key_influence") or []))
            feats.append({**r, "features_id": fid.get(r["clt"]),
                          "top_logits": [{"token": t, "weight": w} for t, w in logits[:10]],
                          "top_graphs": [{"key": k, "prompt": _cut(prompt_of.get(k)), "influence": v}
                                         for k, v in keys[:10] if is_name(k)]})

        cp = self.store.read("circuit_paths", sid, columns=PATH_COLS)
        paths, n_distinct = [], 0
        if cp.num_rows:
            agg = cp.group_by("path").aggregate([("support", "max"), ("support_frac", "max"), ("mean_score", "max"),
                                                 ("hops", "max"), ("key", "count")])
            n_distinct = agg.num_rows
            agg = agg.sort_by([("support_max", "descending"), ("mean_score_max", "descending"),
                               ("path", "ascending")]).slice(0, n_paths)
            want = agg.column("path")
            best: dict = {}  # path -> its strongest row (the example graph)
            for r in cp.filter(pc.is_in(cp.column("path"), value_set=pa.array(want.to_pylist(), pa.string()))).to_pylist():
                b = best.get(r["path"])
                if b is None or (r["score"] or 0) > (b["score"] or 0):
                    best[r["path"]] = r
            for a in agg.to_pylist():
                ex = best[a["path"]]
                paths.append({"path": a["path"], "hops": a["hops_max"], "support": a["support_max"],
                              "support_frac": a["support_frac_max"], "mean_score": a["mean_score_max"],
                              "logit_str": ex["logit_str"],
                              "example": {"key": ex["key"], "prompt": _cut(prompt_of.get(ex["key"])),
                                          "score": ex["score"], "node_ids": (ex["node_ids"] or [])[:32]}})
        out.update({"analysed": bool(fs.num_rows or cp.num_rows), "n_features": fs.num_rows, "features": feats,
                    "n_paths": n_distinct, "paths": paths, "diffs": self._diffs_naming(sid)})
        return clean(out)

    def _diffs_naming(self, sid: str, limit: int = 50) -> list[dict]:
        """The sweep-level rows of graph_diffs whose A or B is `sid`."""
        from pyiceberg.expressions import And, In, IsNull

        head = sid[:50].rstrip(".")  # diff ids are `A..B`, or a readable head plus a hash when that is too long
        cand = [p for p in self.store.partitions("graph_diffs")
                if p.startswith(f"{sid}..") or p.endswith(f"..{sid}") or f"..{head}-" in p or p.startswith(f"{head}..")]
        if not cand:
            return []
        t = self.store.read("graph_diffs", columns=["diff_id", "sweep_a", "sweep_b", "n_prompts", "replacement_delta",
                                                    "completeness_delta"], where=And(In("diff_id", cand), IsNull("prompt")))
        rows = [r for r in t.to_pylist() if sid in (r["sweep_a"], r["sweep_b"])
                and is_name(r["sweep_a"]) and is_name(r["sweep_b"])]
        return sorted(rows, key=lambda r: r["diff_id"] or "")[:limit]

    def auto_supernodes(self, q: dict) -> dict:
        """A graph's automatic supernodes (rows of the supernodes table), of one method, by decreasing |influence|."""
        sid, key = check_id(q.get("sweep"), "sweep"), check_id(q.get("key"), "key")
        method = q.get("method") or None
        if method is not None and not _METHOD.match(method):
            raise BadRequest("bad method")
        rows = self.store.read("supernodes", sid, columns=SUPERNODE_COLS, keys=[key]).to_pylist()
        methods = sorted({r["method"] or "" for r in rows})
        if method is None and methods:
            method = "auto-v1" if "auto-v1" in methods else methods[0]
        rows = [r for r in rows if (r["method"] or "") == method]

        def order(r):
            v = r["influence"]
            return (-abs(v) if v is not None and math.isfinite(v) else math.inf, r["supernode"] or "")

        rows.sort(key=order)
        groups = [{"name": _cut(r["supernode"] or f"group {i + 1}", 64), "size": r["size"], "influence": r["influence"],
                   "label": _cut(r["label"], 200), "nodes": (r["node_ids"] or [])[:MAX_SUPERNODE_NODES]}
                  for i, r in enumerate(rows[:MAX_SUPERNODES])]
        return clean({"sweep_id": sid, "key": key, "method": method, "methods": methods, "supernodes": groups,
                      "truncated": len(rows) > MAX_SUPERNODES})

    def _ok_rows(self, sid: str) -> list[dict]:
        """A sweep's 'ok' graphs (key, prompt) in prompt order; the sweep must exist."""
        g = self.store.read("graphs", sid, columns=["key", "prompt", "prompt_index", "status"])
        if not g.num_rows:
            raise NotFound(f"no graphs in sweep {sid}")
        rows = [r for r in g.to_pylist() if r["status"] == "ok" and r["prompt"] is not None and is_name(r["key"])]
        return sorted(rows, key=lambda r: (r["prompt_index"] is None, r["prompt_index"] or 0, r["key"]))

    def diff(self, q: dict) -> dict:
        """Two sweeps' graphs of the same prompt (matched by prompt text, as `ct-ray diff` does: a prompt's first
        'ok' graph). Without `prompt` / `key_a`: the prompts both hold (at most `limit`, filtered by `q`). With one:
        the two keys and the graph_diffs row of that prompt when `ct-ray diff A B` wrote one."""
        from pyiceberg.expressions import EqualTo, IsNull, Or

        a, b = check_id(q.get("a"), "sweep a"), check_id(q.get("b"), "sweep b")
        prompt = _text(q.get("prompt"), "prompt", MAX_PROMPT_CHARS)
        key_a = check_id(q["key_a"], "key_a") if q.get("key_a") else None
        text = (_text(q.get("q"), "q", 200) or "").lower()
        limit = _int(q.get("limit") or 200, "limit", 1, MAX_PROMPTS)
        rows_a, rows_b = self._ok_rows(a), self._ok_rows(b)
        ga: dict[str, dict] = {}
        gb: dict[str, dict] = {}
        for r in rows_a:
            ga.setdefault(r["prompt"], r)
        for r in rows_b:
            gb.setdefault(r["prompt"], r)
        common = [p for p in ga if p in gb]
        have = set(self.store.partitions("graph_diffs"))
        did = next((d for d in (diff_id_of(a, b), diff_id_of(b, a)) if d in have), None)
        out = {"a": a, "b": b, "diff_id": did, "diffed": did is not None, "n_a": len(ga), "n_b": len(gb),
               "n_common": len(common), "command": f"ct-ray diff {a} {b} --store {shlex.quote(self.store.url)}"}
        if key_a is not None:
            hit = next((r for r in rows_a if r["key"] == key_a), None)
            if hit is None:
                raise NotFound(f"no 'ok' graph {key_a} in sweep {a}")
            prompt = hit["prompt"]
        rows = []
        if did is not None:
            where = IsNull("prompt") if prompt is None else Or(IsNull("prompt"), EqualTo("prompt", prompt))
            rows = self.store.read("graph_diffs", did, where=where).drop_columns(["schema_version"]).to_pylist()
            for r in rows:
                r["top_changed_edges"] = [_cut(e) for e in (r["top_changed_edges"] or [])[:50]]
        out["aggregate"] = next((r for r in rows if r["prompt"] is None), None)
        if prompt is None:
            sel = [p for p in common if text in p.lower()]
            out["prompts"] = [{"prompt": _cut(p), "key_a": ga[p]["key"], "key_b": gb[p]["key"]} for p in sel[:limit]]
            out["n_listed"] = len(sel)
            return clean(out)
        if prompt not in ga:
            raise NotFound(f"sweep {a} has no 'ok' graph of that prompt")
        if prompt not in gb:
            raise NotFound(f"sweep {b} has no 'ok' graph of that prompt")
        out.update({"prompt": prompt, "key_a": key_a or ga[prompt]["key"], "key_b": gb[prompt]["key"],
                    "row": next((r for r in rows if r["prompt"] == prompt), None)})
        return clean(out)

    def graph_json(self) -> bytes:
        if not self.graph_json_path:
            raise NotFound("no --graph-json file given")
        from ..store.fs import filesystem

        fs, path = filesystem(self.graph_json_path)
        with fs.open(path, "rb") as f:
            return f.read()
