"""Supernodes: named groups of graph nodes, graph views collapsed by them, interventions on them, and a simple
automatic suggestion users can accept or edit (it is a plain spec: dump it, edit it, load it back)."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..specs import parse
from ..specs.intervention import Intervention, InterventionError


class Supernode(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    nodes: list[str] = Field(min_length=1, description="node ids as in the graph's nodes table (e.g. '3_17_5')")

    @field_validator("nodes")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("a node is listed twice")
        return v


class SupernodeSet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    supernodes: list[Supernode] = Field(default_factory=list)

    @model_validator(mode="after")
    def _disjoint(self):
        names = [s.name for s in self.supernodes]
        if len(set(names)) != len(names):
            raise ValueError("supernode names must be unique")
        seen: dict[str, str] = {}
        for s in self.supernodes:
            for n in s.nodes:
                if n in seen:
                    raise ValueError(f"node {n} is in both {seen[n]!r} and {s.name!r}")
                seen[n] = s.name
        return self

    @classmethod
    def parse(cls, data) -> SupernodeSet:
        if isinstance(data, SupernodeSet):
            return data
        if isinstance(data, list):
            data = {"supernodes": data}
        return parse(cls, data, "supernodes", InterventionError, root="supernodes")

    def get(self, name: str) -> Supernode:
        for s in self.supernodes:
            if s.name == name:
                return s
        raise InterventionError(f"no supernode named {name!r}; have {[s.name for s in self.supernodes]}")

    def resolve(self, graph) -> dict[str, list[int]]:
        """Node indices of every supernode's members in `graph`."""
        index = {nid: i for i, nid in enumerate(graph.nodes.column("node_id").to_pylist())}
        out = {}
        for s in self.supernodes:
            missing = [n for n in s.nodes if n not in index]
            if missing:
                raise InterventionError(f"supernode {s.name!r}: node ids not in the graph: {missing[:5]}")
            out[s.name] = [index[n] for n in s.nodes]
        return out


@dataclass
class CollapsedGraph:
    """A graph view with each supernode merged into one node; edges between groups are summed, edges inside
    a supernode are dropped. Nodes not in any supernode stay as themselves."""

    adjacency: torch.Tensor  # [G, G] rows = targets
    labels: list[str]  # supernode name or node id
    kinds: list[str]  # "supernode" or the node's kind
    members: list[list[int]]  # node indices of the parent graph

    def edges(self) -> pa.Table:
        t, s = torch.nonzero(self.adjacency, as_tuple=True)
        return pa.table({
            "source": pa.array([self.labels[i] for i in s.tolist()], pa.string()),
            "target": pa.array([self.labels[i] for i in t.tolist()], pa.string()),
            "weight": pa.array(self.adjacency[t, s].numpy(), pa.float32()),
        })


def collapse(graph, supernodes: SupernodeSet | dict | list) -> CollapsedGraph:
    sset = SupernodeSet.parse(supernodes)
    groups = sset.resolve(graph)
    N = graph.n_nodes
    ids = graph.nodes.column("node_id").to_pylist()
    kinds = graph.nodes.column("kind").to_pylist()
    grouped = {i for m in groups.values() for i in m}
    labels, gkinds, members = [], [], []
    for name, m in groups.items():
        labels.append(name)
        gkinds.append("supernode")
        members.append(sorted(m))
    for i in range(N):
        if i not in grouped:
            labels.append(ids[i])
            gkinds.append(kinds[i])
            members.append([i])
    group_of = torch.empty(N, dtype=torch.long)
    for g, m in enumerate(members):
        group_of[m] = g
    A = graph.adjacency
    A = torch.zeros(len(labels), N, dtype=A.dtype).index_add_(0, group_of, A)
    A = torch.zeros(len(labels), len(labels), dtype=A.dtype).index_add_(1, group_of, A)
    A.fill_diagonal_(0)
    return CollapsedGraph(A, labels, gkinds, members)


def supernode_interventions(graph, supernodes: SupernodeSet | dict | list, name: str, op: str = "set",
                            value: float = 0.0) -> list[Intervention]:
    """One intervention per member feature node (each at its own position), to be applied together."""
    sset = SupernodeSet.parse(supernodes)
    members = sset.resolve(graph)[sset.get(name).name]
    return member_interventions(graph, members, Intervention(op=op, value=value), what=f"supernode {name!r}")


def member_interventions(graph, nodes: list[int], template: Intervention, what: str = "target") -> list[Intervention]:
    """`template` applied to each of the feature `nodes` of `graph`, at the node's own position."""
    kinds = graph.nodes.column("kind").to_pylist()
    layer, pos, feat = (graph.nodes.column(c).to_pylist() for c in ("layer", "position", "feature"))
    bad = [graph.nodes.column("node_id")[i].as_py() for i in nodes if kinds[i] != "feature"]
    if bad:
        raise InterventionError(f"{what}: only feature nodes can be intervened on, not {bad[:5]}")
    return [template.at([(layer[i], feat[i])], pos[i]) for i in nodes]


def suggest_supernodes(graph, similarity: float = 0.9, min_size: int = 2) -> SupernodeSet:
    """Group feature nodes that (1) are the same feature at different positions, or (2) have nearly parallel
    outgoing edges (cosine >= `similarity`: they push the same targets the same way). Greedy, by influence."""
    nF = graph.n_features
    if nF == 0:
        return SupernodeSet()
    ids = graph.nodes.column("node_id").to_pylist()
    layer, feat = graph.column("layer")[:nF], graph.column("feature")[:nF]
    infl = graph.column("influence")[:nF]
    if torch.isnan(infl).any():
        infl = graph.influence()[:nF]
    # (1) same feature across positions
    units: dict[tuple[int, int], list[int]] = {}
    for i in range(nF):
        units.setdefault((int(layer[i]), int(feat[i])), []).append(i)
    unit_list = list(units.items())
    out_vec = graph.adjacency[:, :nF].T.double()  # [nF, N] outgoing edges of each feature
    vecs = torch.stack([out_vec[m].sum(0) for _, m in unit_list])
    norms = vecs.norm(dim=1)
    unit_infl = torch.tensor([float(infl[m].sum()) for _, m in unit_list])
    order = torch.argsort(unit_infl, descending=True).tolist()
    # (2) greedy clustering of units by outgoing-edge cosine, seeds in order of influence
    taken = [False] * len(unit_list)
    groups: list[list[int]] = []
    unit_vn = vecs / norms.clamp_min(1e-30)[:, None]
    for u in order:
        if taken[u]:
            continue
        taken[u] = True
        cluster = [u]
        if norms[u] > 0:
            cos = unit_vn @ unit_vn[u]
            for v in order:
                if not taken[v] and norms[v] > 0 and cos[v] >= similarity:
                    taken[v] = True
                    cluster.append(v)
        groups.append(cluster)
    sns = []
    for k, cluster in enumerate(groups):
        nodes = [i for u in cluster for i in unit_list[u][1]]
        if len(nodes) < min_size:
            continue
        if len(cluster) == 1:
            (l, f), _ = unit_list[cluster[0]]
            name = f"L{l}/F{f}"
        else:
            name = f"group_{k}"
        sns.append(Supernode(name=name, nodes=[ids[i] for i in sorted(nodes)]))
    return SupernodeSet(supernodes=sns)
