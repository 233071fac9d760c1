"""The explorer's data side: JSON-ready views of the tables (sweeps, graphs, features, perturbations, supernodes).

Every argument coming from the page is validated here; a bad one raises `BadRequest` (HTTP 400). Supernode
groupings are the only thing written, to `_sweeps/{sweep}/supernodes/{key}.json`, and only with `allow_write`.
"""

from __future__ import annotations

import json
import math
import re
import threading

from ..errors import CTRayError, finite_float
from ..features.job import FEATURES_DIR, features_id
from ..store.names import is_name
from ..store.tables import SWEEPS_DIR, Store

_NODE_ID = re.compile(r"^(E|-?\d{1,6})_-?\d{1,9}_\d{1,7}$")
_NAME = re.compile(r"^[^\x00-\x1f\x7f<>]{1,64}$")  # printable, no markup
MAX_SUPERNODES, MAX_SUPERNODE_NODES = 200, 2000
MAX_LIMIT = 5000  # graph rows per /api/graphs answer
GRAPH_COLS = ["key", "prompt_index", "prompt", "status", "error", "model", "clt", "n_tokens", "top_token_str", "top_prob",
              "n_nodes_pruned", "n_edges_pruned", "n_features_pruned", "replacement_score", "completeness_score",
              "replacement_score_pruned", "completeness_score_pruned", "created_at"]


class BadRequest(ValueError):
    pass


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


class ExplorerAPI:
    def __init__(self, store: Store, allow_write: bool = False, graph_json: str | None = None):
        self.store, self.allow_write, self.graph_json_path = store, allow_write, graph_json
        self._features: dict[str, object] = {}  # clt_id -> Arrow table (read once per job)
        self._lock = threading.Lock()

    def info(self) -> dict:
        return {"store": self.store.url, "writable": self.allow_write, "graph_json": bool(self.graph_json_path)}

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
        return clean({"sweep_id": sid, "meta": row, "nodes": nodes, "edges": edges,
                      "features_id": self._features_id(row["clt"]), "supernodes": self._supernodes(sid, key)})

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

    def graph_json(self) -> bytes:
        if not self.graph_json_path:
            raise NotFound("no --graph-json file given")
        from ..store.fs import filesystem

        fs, path = filesystem(self.graph_json_path)
        with fs.open(path, "rb") as f:
            return f.read()
