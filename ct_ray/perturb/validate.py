"""Perturbation validation of an attribution graph.

For the top-k feature nodes (by influence; supernodes optional) every op (ablate, steer, ...) runs as one
intervention on the spliced model, and per intervention the graph's predicted change of each logit node and each
downstream feature node is compared with the measured change. Per graph this gives:
  logit_spearman / logit_sign_agreement     predicted vs measured demeaned-logit changes, over all
                                            (intervention, logit node) pairs;
  feature_spearman / feature_sign_agreement the same over (intervention, downstream feature node) pairs
                                            (pre-activation changes);
  kl_influence_spearman                     does node influence predict the KL of the output distribution under
                                            the node's ablation (the paper's check);
  faithfulness_cosine / faithfulness_nmse   one layer after the intervened feature's layer, the CLT's response
                                            (its features recomputed on the perturbed input) against the real
                                            MLP's response to the same input, over the positions from the
                                            intervention on; averaged over interventions.
Undefined metrics (too few pairs, constant values) are NaN.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import torch

from ..errors import CTRayError
from ..specs import parse
from ..specs.intervention import DEFAULT_OPS, Intervention, InterventionError, SpliceMode, ValidationSpec, parse_mode
from .predict import Predictor
from .splice import Splice
from .supernodes import SupernodeSet, member_interventions
from .table import graph_id as _graph_id
from .table import perturbation_table


@dataclass
class Target:
    name: str  # node id or supernode name
    kind: str  # "node" | "supernode"
    nodes: list[int]  # feature node indices in the graph
    influence: float


@dataclass
class Validation:
    table: pa.Table  # rows of the `perturbations` table (docs/tables.md), one per (target, op, logit node)
    metrics: dict
    targets: list[Target]
    ops: list[Intervention]  # templates; row i of the arrays below is targets[i // len(ops)] with ops[i % len(ops)]
    predicted_logits: torch.Tensor  # [n_interventions, n_logits]
    measured_logits: torch.Tensor
    predicted_features: torch.Tensor  # [n_interventions, n_features] pre-activation changes
    measured_features: torch.Tensor
    kl: torch.Tensor  # [n_interventions]


# --- statistics ------------------------------------------------------------------------------------------------
def _rank(x: torch.Tensor) -> torch.Tensor:
    """Ranks with ties averaged."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    _, inv, counts = torch.unique(x, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inv, ranks)
    return (sums / counts)[inv]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.flatten(), y.flatten()
    if x.numel() < 2:
        return float("nan")
    rx, ry = _rank(x), _rank(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / den if den > 0 else float("nan")


def sign_agreement(pred: torch.Tensor, meas: torch.Tensor, rel_tol: float = 1e-6) -> float:
    """Fraction of pairs with the same sign, over pairs where either value is above rounding noise."""
    pred, meas = pred.flatten().double(), meas.flatten().double()
    if pred.numel() == 0:
        return float("nan")
    scale = max(float(pred.abs().max()), float(meas.abs().max()))
    keep = (pred.abs() > rel_tol * scale) | (meas.abs() > rel_tol * scale)
    if not keep.any():
        return float("nan")
    return float((torch.sign(pred[keep]) == torch.sign(meas[keep])).double().mean())


# --- validation ----------------------------------------------------------------------------------------------
def _check_graph(graph, sp: Splice) -> None:
    """The graph must come from this model, CLT and prompt: its feature activations are recomputed here."""
    meta = graph.meta
    if meta.get("n_layers") not in (None, sp.L):
        raise CTRayError(f"the graph has {meta['n_layers']} layers, the model {sp.L}")
    nF = graph.n_features
    if nF == 0:
        return
    l, p, f = (graph.column(c)[:nF].long() for c in ("layer", "position", "feature"))
    if int(l.max()) >= sp.L or int(p.max()) >= sp.P or any(int(f[i]) >= sp.clt.d_tc[int(l[i])] for i in range(nF)):
        raise CTRayError("the graph's feature nodes do not exist in this model + CLT (built with another CLT?)")
    ours = torch.stack([sp.clean_acts[int(l[i])][int(p[i]), int(f[i])] for i in range(nF)]).float().cpu()
    theirs = graph.column("activation")[:nF].float()
    if not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-4 * float(theirs.abs().max()) + 1e-6):
        raise CTRayError("the graph's feature activations differ from this model + CLT's (built with another CLT "
                         "or model?)")


def _influence(graph) -> torch.Tensor:
    infl = graph.column("influence").double()
    if torch.isnan(infl).any():
        infl = graph.influence().double()
    return infl


def select_targets(graph, top_k: int, supernodes: SupernodeSet | dict | list | None = None,
                   nodes: list[int] | None = None) -> list[Target]:
    """The `top_k` feature nodes by influence (or the given `nodes`, values of the `node` column), then the
    supernodes."""
    nF = graph.n_features
    if nF == 0:
        raise CTRayError("the graph has no feature nodes to intervene on")
    infl = _influence(graph)
    ids = graph.nodes.column("node_id").to_pylist()
    if nodes is not None:
        where = {v: i for i, v in enumerate(graph.nodes.column("node").to_pylist())}
        missing = [n for n in nodes if where.get(n, nF) >= nF]
        if missing:
            raise CTRayError(f"nodes {missing[:5]} are not feature nodes of the graph")
        top = [where[n] for n in nodes]
    else:
        top = torch.argsort(infl[:nF], descending=True, stable=True)[: min(top_k, nF)].tolist()
    targets = [Target(ids[i], "node", [i], float(infl[i])) for i in top]
    if supernodes is not None:
        sset = SupernodeSet.parse(supernodes)
        for name, members in sset.resolve(graph).items():
            targets.append(Target(name, "supernode", members, float(infl[members].sum())))
    return targets


def validate(model, clt, graph, *, top_k: int = 10, ops=DEFAULT_OPS, mode: str | SpliceMode | dict | None = "constrained",
             layers: tuple[int, int] | None = None, freeze_attention: bool | None = None, supernodes=None,
             batch_size: int = 32, graph_id: str | None = None, spec: ValidationSpec | dict | None = None,
             nodes: list[int] | None = None) -> Validation:
    """Validate `graph` (usually pruned) of a prompt by perturbing its top-k nodes on `model` + `clt`.

    `ops`: intervention templates or `(op, value)` pairs. `spec` (a `ValidationSpec` or its dict, e.g. from a YAML
    file) replaces top_k / ops / mode / batch_size. `nodes` (values of the `node` column) replaces the top-k.
    The faithfulness metric compares MLP responses on the spliced model's MLP input (in constrained layers that
    input is normalised with the frozen denominator).
    """
    if isinstance(spec, ValidationSpec):
        vspec = spec
    else:
        data = spec if spec is not None else {"top_k": top_k, "ops": list(ops), "batch_size": batch_size,
                                              "mode": parse_mode(mode, layers=layers, freeze_attention=freeze_attention)}
        vspec = parse(ValidationSpec, data, "validation options", InterventionError)
    sp = Splice(model, clt, graph.meta["tokens"])
    _check_graph(graph, sp)
    targets = select_targets(graph, vspec.top_k, supernodes, nodes)
    nF, nL, N = graph.n_features, graph.n_logits, graph.n_nodes
    layer, pos = graph.column("layer").long(), graph.column("position").long()
    feat = graph.column("feature").long()
    acts = graph.column("activation").double()

    rows, meta = [], []
    for t in targets:
        for k, tmpl in enumerate(vspec.ops):
            ivs = member_interventions(graph, t.nodes, tmpl, what=t.name)
            rows.append(ivs)
            meta.append((t, k, tmpl, ivs))
    watch = torch.stack([layer[:nF], pos[:nF], feat[:nF]], 1)
    # faithfulness is checked one layer after a single-layer target: only that layer's MLP records are needed
    layer_sets = [set(layer[t.nodes].tolist()) for t, *_ in meta]
    at = [min(x) + 1 if len(x) == 1 and min(x) + 1 < sp.L else None for x in layer_sets]
    res = sp.run(rows, vspec.mode, watch=watch, record_mlp_at=at, batch_size=vspec.batch_size)
    _, clean_pre = sp.clean_watch(watch)

    logit_tokens = graph.meta["logit_tokens"]
    meas_logit = res.logit_delta(logit_tokens).cpu()
    meas_feat = (res.watched_pre.double().cpu() - clean_pre.double().cpu()).float()
    kl = res.kl().cpu()

    predictor = Predictor(graph)
    n = len(rows)
    pred_logit, pred_direct_logit = torch.zeros(n, nL), torch.zeros(n, nL)
    pred_feat = torch.zeros(n, nF)
    feat_mask = torch.zeros(n, nF, dtype=torch.bool)
    for i, (t, _k, tmpl, _) in enumerate(meta):
        a = acts[t.nodes]
        direct, total = predictor.predict(t.nodes, tmpl.apply(a) - a)
        pred = direct if vspec.mode.mode == "constrained" else total
        pred_logit[i], pred_direct_logit[i] = pred[N - nL :], direct[N - nL :]
        pred_feat[i] = pred[:nF]
        m = (layer[:nF] > int(layer[t.nodes].min())) & (pos[:nF] >= int(pos[t.nodes].min()))
        m[t.nodes] = False
        feat_mask[i] = m

    # faithfulness one layer after the intervened layer
    cos, nmse = [], []
    mlp_clean = sp.mlp_out.cpu()
    for i, (t, *_rest) in enumerate(meta):
        if (l1 := at[i]) is None:  # a multi-layer target, or one at the last layer
            continue
        p0 = int(pos[t.nodes].min())
        resp = res.mlp_response_at[i, p0:].double().cpu()
        real = res.mlp_real_at[i, p0:].double().cpu() - mlp_clean[l1, p0:].double()
        rn = float(real.norm())
        if rn == 0 or not torch.isfinite(real).all():
            continue
        den = rn * float(resp.norm())
        cos.append(float((resp * real).sum()) / den if den > 0 else 0.0)
        nmse.append(float(((resp - real) ** 2).sum()) / rn**2)

    ablate_rows = [i for i, (_, _k, tm, _) in enumerate(meta) if (tm.op, tm.value) in (("set", 0.0), ("scale", 0.0))]
    seen_t, kl_a, infl_a = set(), [], []
    for i in ablate_rows:
        t = meta[i][0]
        if t.name not in seen_t:
            seen_t.add(t.name)
            kl_a.append(float(kl[i]))
            infl_a.append(t.influence)

    nan = float("nan")
    lo, hi = (vspec.mode.layers or (0, sp.L - 1)) if vspec.mode.mode == "constrained" else (-1, -1)
    gid = graph_id or _graph_id(graph)
    metrics = {
        "graph_id": gid,
        "mode": vspec.mode.mode,
        "layer_start": lo,
        "layer_end": hi,
        "freeze_attention": vspec.mode.freeze_attention,
        "n_targets": len(targets),
        "n_interventions": n,
        "logit_spearman": spearman(pred_logit, meas_logit),
        "logit_sign_agreement": sign_agreement(pred_logit, meas_logit),
        "n_logit_pairs": int(pred_logit.numel()),
        "feature_spearman": spearman(pred_feat[feat_mask], meas_feat[feat_mask]),
        "feature_sign_agreement": sign_agreement(pred_feat[feat_mask], meas_feat[feat_mask]),
        "n_feature_pairs": int(feat_mask.sum()),
        "kl_influence_spearman": spearman(torch.tensor(kl_a), torch.tensor(infl_a)) if kl_a else nan,
        "n_ablations": len(kl_a),
        "faithfulness_cosine": sum(cos) / len(cos) if cos else nan,
        "faithfulness_nmse": sum(nmse) / len(nmse) if nmse else nan,
        "n_faithfulness": len(cos),
    }

    # table rows
    probs_before, probs_after = res.clean_probs.cpu(), res.probs.cpu()
    logits_before, logits_after = res.clean_logits.float().cpu(), res.logits.float().cpu()
    strs = model.decode(logit_tokens)
    node_col = graph.nodes.column("node").to_pylist()
    ids = graph.nodes.column("node_id").to_pylist()
    baseline = graph.target_values[N - nL :].tolist()
    common = {"plan": vspec.plan_hash(), "mode": vspec.mode.mode, "layer_start": lo, "layer_end": hi,
              "freeze_attention": vspec.mode.freeze_attention, "target_kind": "logit", "status": "ok"}
    table_rows = []
    for i, (t, k, tmpl, ivs) in enumerate(meta):
        one = t.kind == "node"
        n0 = t.nodes[0]
        where = ({"node": node_col[n0], "node_id": t.name, "layer": int(layer[n0]), "position": int(pos[n0]),
                  "feature": int(feat[n0])} if one else {"supernode": t.name})
        spec_json = json.dumps([iv.model_dump(mode="json") for iv in ivs])
        for j, tok in enumerate(logit_tokens):
            table_rows.append({
                **common, **where, "key": gid, "intervention": k, "influence": t.influence,
                "interventions": spec_json, "op": tmpl.op, "value": tmpl.value, "target_node": node_col[N - nL + j],
                "target_id": ids[N - nL + j], "target_token": tok, "target_str": strs[j], "baseline": baseline[j],
                "logit_before": float(logits_before[tok]), "logit_after": float(logits_after[i, tok]),
                "prob_before": float(probs_before[tok]), "prob_after": float(probs_after[i, tok]),
                "predicted_delta": float(pred_logit[i, j]), "predicted_direct": float(pred_direct_logit[i, j]),
                "measured_delta": float(meas_logit[i, j]), "kl": float(kl[i]),
            })
    return Validation(perturbation_table(table_rows), metrics, targets, list(vspec.ops), pred_logit,
                      meas_logit, pred_feat, meas_feat, kl)
