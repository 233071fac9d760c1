"""The attribution graph: nodes (a pyarrow table), adjacency (rows = targets, columns = sources), metadata."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..specs.attribution import PruneSpec
from ..store.schemas import GRAPH_NODES_SCHEMA
from . import prune as _prune

NODE_KINDS = ("feature", "error", "embedding", "logit")
SCHEMA_VERSION = 1

NODE_SCHEMA = GRAPH_NODES_SCHEMA  # one definition: store/schemas.py


def node_ids(kind, layer, position, feature, token, n_layers: int) -> list[str]:
    """Node ids as circuit-tracer/Neuronpedia write them, with error nodes as `{layer}_-1_{pos}` (the
    collision-free form adopted upstream; 0.5.0's `0_{layer}_{pos}` can equal a feature's id)."""
    out = []
    for k, l, p, f, t in zip(kind, layer, position, feature, token):
        if k == "feature":
            out.append(f"{l}_{f}_{p}")
        elif k == "error":
            out.append(f"{l}_-1_{p}")
        elif k == "embedding":
            out.append(f"E_{t}_{p}")
        else:
            out.append(f"{n_layers + 1}_{t}_{p}")
    return out


@dataclass
class Graph:
    adjacency: torch.Tensor  # [N, N] float32
    nodes: pa.Table
    meta: dict
    target_values: torch.Tensor  # [N] pre-activation / demeaned logit of target nodes (NaN for pure sources)
    constants: torch.Tensor  # [N] constant terms of each target (biases, BOS), NaN for pure sources
    _cache: dict = field(default_factory=dict, repr=False)

    # --- construction ----------------------------------------------------------------------------------
    @classmethod
    def build(cls, *, adjacency, tokens, token_strs, f_layer, f_pos, f_idx, f_act, error_norms, emb_norms,
              logit_tokens, logit_strs, logit_probs, target_values, constants, meta) -> Graph:
        L, P = error_norms.shape
        nF, nL = len(f_layer), len(logit_tokens)
        toks = tokens.tolist()
        el = torch.arange(L).repeat_interleave(P)
        ep = torch.arange(P).repeat(L)
        kind = ["feature"] * nF + ["error"] * (L * P) + ["embedding"] * P + ["logit"] * nL
        layer = f_layer.tolist() + el.tolist() + [-1] * P + [L] * nL
        position = f_pos.tolist() + ep.tolist() + list(range(P)) + [P - 1] * nL
        feature = f_idx.tolist() + [-1] * (L * P + P + nL)
        token = [toks[p] for p in f_pos.tolist()] + [toks[p] for p in ep.tolist()] + toks + logit_tokens.tolist()
        token_str = [token_strs[p] for p in f_pos.tolist()] + [token_strs[p] for p in ep.tolist()] + list(token_strs)
        token_str += list(logit_strs)
        lvals = target_values[-nL:] if nL else torch.zeros(0)
        activation = torch.cat([f_act, error_norms.flatten(), emb_norms, lvals]).float()
        prob = torch.full((len(kind),), float("nan"))
        if nL:
            prob[-nL:] = logit_probs
        nodes = pa.table(
            {
                "node": pa.array(np.arange(len(kind), dtype=np.int32)),
                "node_id": node_ids(kind, layer, position, feature, token, L),
                "kind": kind,
                "layer": pa.array(layer, pa.int32()),
                "position": pa.array(position, pa.int32()),
                "feature": pa.array(feature, pa.int32()),
                "token": pa.array(token, pa.int32()),
                "token_str": token_str,
                "activation": pa.array(activation.cpu().numpy(), pa.float32()),
                "probability": pa.array(prob.cpu().numpy(), pa.float32()),
                "influence": pa.array(np.full(len(kind), np.nan, dtype=np.float32)),
            },
            schema=NODE_SCHEMA,
        )
        meta = {**meta, "tokens": toks, "token_strs": list(token_strs), "logit_tokens": logit_tokens.tolist(),
                "logit_probs": logit_probs.tolist(), "schema_version": SCHEMA_VERSION}
        return cls(adjacency.float().cpu(), nodes, meta, target_values.cpu(), constants.cpu())  # from a GPU too

    # --- shape helpers ---------------------------------------------------------------------------------
    def _kind_counts(self) -> dict:
        if "counts" not in self._cache:
            kinds = self.nodes.column("kind").to_pylist()
            self._cache["counts"] = {k: kinds.count(k) for k in NODE_KINDS}
        return self._cache["counts"]

    @property
    def n_nodes(self) -> int:
        return self.adjacency.shape[0]

    @property
    def n_edges(self) -> int:
        return int(torch.count_nonzero(self.adjacency))

    n_features = property(lambda self: self._kind_counts()["feature"], doc="number of feature nodes")
    n_errors = property(lambda self: self._kind_counts()["error"], doc="number of error nodes")
    n_embeddings = property(lambda self: self._kind_counts()["embedding"], doc="number of embedding nodes")
    n_logits = property(lambda self: self._kind_counts()["logit"], doc="number of logit nodes")

    @property
    def error_slice(self) -> slice:
        return slice(self.n_features, self.n_features + self.n_errors)

    @property
    def embedding_slice(self) -> slice:
        s = self.n_features + self.n_errors
        return slice(s, s + self.n_embeddings)

    @property
    def logit_weights(self) -> torch.Tensor:
        w = torch.zeros(self.n_nodes)
        w[self.n_nodes - self.n_logits :] = torch.tensor(self.meta["logit_probs"], dtype=torch.float32)
        return w

    def column(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self.nodes.column(name).to_numpy(zero_copy_only=False).copy())

    # --- analysis --------------------------------------------------------------------------------------
    def influence(self) -> torch.Tensor:
        if "influence" not in self._cache:
            self._cache["influence"] = _prune.influence(self.adjacency, self.logit_weights)
        return self._cache["influence"]

    def residuals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The exactness check of docs/design.md, per feature and logit row: (|incoming edges + constant - target
        value|, the magnitudes summed), in float64. A graph is exact when the first is within fp32 tolerance of the
        second (tests/_attr_helpers.assert_exact, benchmarks/gpu_check.py)."""
        A, nF, nL, N = self.adjacency, self.n_features, self.n_logits, self.n_nodes
        rows = torch.cat([torch.arange(nF), torch.arange(N - nL, N)])
        total = A[rows].double().sum(1) + self.constants[rows].double()
        scale = (A[rows].abs().double().sum(1) + self.constants[rows].abs().double()
                 + self.target_values[rows].abs().double())
        return (total - self.target_values[rows].double()).abs(), scale

    def scores(self) -> dict:
        """Replacement and completeness scores (Ameisen et al. 2025) of this graph."""
        return _prune.graph_scores(self.adjacency, self.logit_weights, self.error_slice, self.embedding_slice)

    def _with_influence_column(self, infl: torch.Tensor) -> pa.Table:
        return self.nodes.set_column(self.nodes.schema.get_field_index("influence"), "influence",
                                     pa.array(infl.numpy().astype(np.float32), pa.float32()))

    def with_influence(self) -> Graph:
        """This graph with its nodes' `influence` column filled (computed once, kept with the graph; `prune`
        computes it too). A new Graph sharing the adjacency."""
        return Graph(self.adjacency, self._with_influence_column(self.influence()), self.meta, self.target_values,
                     self.constants, dict(self._cache))

    def prune(self, node_threshold: float = PruneSpec.field_default("node_threshold"),
              edge_threshold: float = PruneSpec.field_default("edge_threshold")) -> Graph:
        """A new graph: the subgraph keeping `node_threshold` of the node influence and `edge_threshold` of the edge
        influence, its nodes' `influence` column filled (influence over this graph). Embedding and logit nodes are
        always kept; node order and kinds are preserved. This graph is not changed (`with_influence` gives it the
        column too)."""
        for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        n_fixed = self.n_embeddings + self.n_logits
        res = _prune.prune(self.adjacency, self.logit_weights, self.n_features, n_fixed, node_threshold,
                           edge_threshold)
        keep = torch.nonzero(res.node_mask).squeeze(1)
        A = self.adjacency[keep][:, keep] * res.edge_mask
        self._cache["influence"] = res.node_influence  # a cache: this graph itself is left as it was
        sub_nodes = self._with_influence_column(res.node_influence).take(pa.array(keep.numpy()))
        meta = {**self.meta, "pruning": {"node_threshold": node_threshold, "edge_threshold": edge_threshold,
                                         "parent_n_nodes": self.n_nodes, "parent_n_edges": self.n_edges}}
        return Graph(A, sub_nodes, meta, self.target_values[keep], self.constants[keep])

    # --- tables ----------------------------------------------------------------------------------------
    def edges(self) -> pa.Table:
        """Non-zero edges as rows (source node, target node, weight)."""
        t, s = torch.nonzero(self.adjacency, as_tuple=True)
        ids = self.nodes.column("node").to_numpy()
        return pa.table(
            {
                "source": pa.array(ids[s.numpy()], pa.int32()),
                "target": pa.array(ids[t.numpy()], pa.int32()),
                "weight": pa.array(self.adjacency[t, s].numpy(), pa.float32()),
            }
        )

    # --- persistence (no pickle) -----------------------------------------------------------------------
    def save(self, url: str) -> None:
        """Write `graph.safetensors` (adjacency, targets, constants), `nodes.parquet`, `graph_meta.json`."""
        from safetensors.torch import save as st_save

        from ..store.fs import atomic_dir

        with atomic_dir(url) as (fs, tmp):
            with fs.open(f"{tmp}/graph.safetensors", "wb") as f:
                f.write(st_save({"adjacency": self.adjacency.contiguous(), "target_values": self.target_values,
                                 "constants": self.constants}))
            with fs.open(f"{tmp}/nodes.parquet", "wb") as f:
                pq.write_table(self.nodes, f)
            with fs.open(f"{tmp}/graph_meta.json", "w") as f:
                json.dump(self.meta, f)

    @classmethod
    def load(cls, url: str) -> Graph:
        from safetensors.torch import load as st_load

        from ..errors import CTRayError, one_line
        from ..store.fs import filesystem

        fs, path = filesystem(url)
        try:
            with fs.open(f"{path}/graph.safetensors", "rb") as f:
                t = st_load(f.read())
            with fs.open(f"{path}/nodes.parquet", "rb") as f:
                nodes = pq.read_table(io.BytesIO(f.read()))
            with fs.open(f"{path}/graph_meta.json") as f:
                meta = json.load(f)
        except FileNotFoundError as e:
            raise CTRayError(f"no graph at {url}: {e}") from e
        except Exception as e:  # corrupt files
            raise CTRayError(f"cannot read graph at {url}: {one_line(e)}") from e
        return cls(t["adjacency"], nodes, meta, t["target_values"], t["constants"])

    def to_json(self, path: str, slug: str | None = None) -> dict:
        from .export import graph_json

        data = graph_json(self, slug=slug)
        from ..store.fs import filesystem

        fs, p = filesystem(path)
        parent = p.rsplit("/", 1)[0] if "/" in p else ""
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(p, "w") as f:
            json.dump(data, f)
        return data

    def summary(self) -> dict:
        return {
            "n_nodes": self.n_nodes,
            "n_edges": self.n_edges,
            "n_features": self.n_features,
            **self.scores(),
        }


def graph_rows(full: Graph, pruned: Graph, which: str = "pruned", key: str | None = None) -> tuple[pa.Table, pa.Table]:
    """The `nodes` and `edges` rows of a graph and its pruned subgraph, as a sweep writes them and `ct-ray attribute
    --out` saves them: `which` 'pruned' (the pruned graph's rows) or 'full' (every row of the full graph, its
    influence filled), each row with `kept` (in the pruned graph) and, given `key`, the graph's key first."""
    if which == "pruned":
        nodes, edges = pruned.nodes, pruned.edges()
        kept_n = np.ones(nodes.num_rows, dtype=bool)
        kept_e = np.ones(edges.num_rows, dtype=bool)
    elif which == "full":
        nodes, edges = full.with_influence().nodes, full.edges()
        kept_n = np.isin(nodes.column("node").to_numpy(), pruned.nodes.column("node").to_numpy())
        pe, n = pruned.edges(), np.int64(full.n_nodes)
        code = lambda e: e.column("source").to_numpy().astype(np.int64) * n + e.column("target").to_numpy()  # noqa: E731
        kept_e = np.isin(code(edges), code(pe))
    else:
        raise ValueError(f"which: 'pruned' or 'full', not {which!r}")
    nodes = nodes.append_column("kept", pa.array(kept_n))
    edges = edges.append_column("kept", pa.array(kept_e))
    if key is not None:
        nodes = nodes.add_column(0, "key", pa.array([key] * nodes.num_rows, pa.string()))
        edges = edges.add_column(0, "key", pa.array([key] * edges.num_rows, pa.string()))
    return nodes, edges

