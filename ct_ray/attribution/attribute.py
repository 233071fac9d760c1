"""`attribute(model, clt, prompt) -> Graph`: the attribution graph of one prompt.

Edges are computed one adjacency row per target, in batches of targets, by the exact transpose of the frozen
replacement model (see replacement.py): a target's row holds the direct effect of every source on it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .capture import capture
from .graph import Graph
from .replacement import Replacement

# bytes of per-batch gradient buffers ([B, P, L, d] floats) we allow before shrinking the target batch
_BATCH_BYTES = 256 * 2**20


def select_logits(probs: torch.Tensor, max_n_logits: int, desired_logit_prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top tokens until their cumulative probability reaches `desired_logit_prob`, at most `max_n_logits`."""
    p, idx = probs.topk(min(max_n_logits, probs.numel()))
    cum = torch.cumsum(p, 0)
    k = int(torch.searchsorted(cum, torch.tensor([desired_logit_prob])).item()) + 1
    k = max(1, min(k, len(p)))
    return idx[:k], p[:k]


@torch.no_grad()
def attribute(
    model,
    clt,
    prompt: str | Sequence[int] | torch.Tensor,
    *,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    batch_size: int = 128,
    max_feature_nodes: int | None = None,
    verbose: bool = False,
) -> Graph:
    """Attribution graph of `prompt` under `model` (a LoadedModel) with `clt` in place of its MLPs.

    Node order: active features (sorted by layer, position, index), error nodes (layer-major), token embeddings,
    logit nodes. `Graph.adjacency[t, s]` is the direct effect of source s on target t.
    With `max_feature_nodes`, only the most influential features (found iteratively from the logits) become nodes.
    """
    t0 = time.perf_counter()
    tokens = model.encode(prompt)
    cache = capture(model, tokens)
    rep = Replacement(model, clt, cache)
    L, P, d = rep.L, rep.P, rep.d
    t_fwd = time.perf_counter()

    # --- nodes ---------------------------------------------------------------------------------------
    feats = [torch.nonzero(a) for a in rep.acts]  # per layer: [n, 2] (pos, idx), sorted
    f_layer = torch.cat([torch.full((len(f),), l, dtype=torch.long) for l, f in enumerate(feats)])
    f_pos = torch.cat([f[:, 0] for f in feats])
    f_idx = torch.cat([f[:, 1] for f in feats])
    f_act = torch.cat([rep.acts[l][f[:, 0], f[:, 1]] for l, f in enumerate(feats)])
    logit_tok, logit_p = select_logits(cache.probs, max_n_logits, desired_logit_prob)
    nL = len(logit_tok)
    n_active = len(f_layer)

    selected = torch.arange(n_active)
    if max_feature_nodes is not None and max_feature_nodes < n_active:
        selected = _select_features(rep, f_layer, f_pos, f_idx, f_act, logit_tok, logit_p, max_feature_nodes,
                                    batch_size)
    f_layer, f_pos, f_idx, f_act = f_layer[selected], f_pos[selected], f_idx[selected], f_act[selected]
    nF = len(f_layer)
    N = nF + L * P + P + nL
    emb0, log0 = nF + L * P, nF + L * P + P

    A = torch.zeros(N, N)
    targets = torch.full((N,), float("nan"))
    consts = torch.full((N,), float("nan"))

    # --- source blocks: features grouped by (layer, position), decoders scaled by activations ----------
    blocks = _feature_blocks(rep, f_layer, f_pos, f_idx, f_act)

    # --- target read-outs ------------------------------------------------------------------------------
    enc = torch.zeros(nF, d)
    for l in range(L):
        m = f_layer == l
        if m.any():
            enc[m] = rep.encoder_readout(l, f_pos[m], f_idx[m])
    lvec, _ = rep.logit_readout(logit_tok)

    # targets: (node row, layer or L for logits, position, read-out vector); batched by layer so a batch's
    # backward pass starts at its highest layer and stops at its last position
    rows = torch.cat([torch.arange(log0, N), torch.arange(nF)])
    t_layer = torch.cat([torch.full((nL,), L), f_layer])
    t_pos = torch.cat([torch.full((nL,), P - 1), f_pos])
    vecs = torch.cat([lvec, enc])
    order = torch.argsort(t_layer * P + t_pos, descending=True, stable=True)
    bsz = max(1, min(batch_size, _BATCH_BYTES // max(1, P * L * d * 4)))
    t_rows = time.perf_counter()
    for i in tqdm(range(0, len(order), bsz), desc="attribution", unit="batch", disable=not verbose):
        sel = order[i : i + bsz]
        A[rows[sel]] = _rows(rep, blocks, t_layer[sel], t_pos[sel], vecs[sel], N, nF, emb0)
    t_done = time.perf_counter()

    # --- target values and constant terms (for the exactness invariant) ---------------------------------
    mids, fin = rep.forward(rep.real_sources())
    cmids, cfin = rep.forward(rep.constant_sources())
    for l in range(L):
        m = f_layer == l
        if m.any():
            x, cx = rep.read(l, mids[l])[f_pos[m]], rep.read(l, cmids[l])[f_pos[m]]
            W = clt.W_enc[l][f_idx[m]]
            targets[:nF][m] = (x * W).sum(-1) + clt.b_enc[l][f_idx[m]]
            consts[:nF][m] = (cx * W).sum(-1) + clt.b_enc[l][f_idx[m]]
    logits = rep.logits(fin)[-1]
    targets[log0:] = logits[logit_tok] - logits.mean()
    consts[log0:] = _const_logits(rep, cfin, logit_tok)

    errors = rep.error
    meta = {
        "prompt": prompt if isinstance(prompt, str) else None,
        "model": model.name,
        "clt": getattr(clt, "source", "") or "",
        "n_layers": L,
        "n_pos": P,
        "n_active_features": n_active,
        "feature_input_hook": clt.feature_input_hook,
        "max_n_logits": max_n_logits,
        "desired_logit_prob": desired_logit_prob,
        "max_feature_nodes": max_feature_nodes,
        "timings_s": {
            "forward": t_fwd - t0,
            "setup": t_rows - t_fwd,
            "rows": t_done - t_rows,
            "total": time.perf_counter() - t0,
        },
    }
    return Graph.build(
        adjacency=A, tokens=tokens, token_strs=model.decode(tokens), f_layer=f_layer, f_pos=f_pos, f_idx=f_idx,
        f_act=f_act, error_norms=errors.norm(dim=-1), emb_norms=cache.resid_pre0.norm(dim=-1), logit_tokens=logit_tok,
        logit_strs=model.decode(logit_tok), logit_probs=logit_p, target_values=targets, constants=consts, meta=meta,
    )


def _const_logits(rep: Replacement, cfin: torch.Tensor, logit_tok: torch.Tensor) -> torch.Tensor:
    lg = rep.logits(cfin)[-1]
    return lg[logit_tok] - lg.mean()


def _feature_blocks(rep: Replacement, f_layer, f_pos, f_idx, f_act):
    """[(layer, pos, start, end, D)] with D [n, span*d] the activation-scaled decoder rows of a contiguous run
    of feature nodes that share layer and position."""
    blocks = []
    if len(f_layer) == 0:
        return blocks
    key = f_layer * rep.P + f_pos
    bounds = torch.nonzero(torch.diff(key)).squeeze(1) + 1
    starts = torch.cat([torch.tensor([0]), bounds]).tolist()
    ends = torch.cat([bounds, torch.tensor([len(key)])]).tolist()
    for s, e in zip(starts, ends):
        l, p = int(f_layer[s]), int(f_pos[s])
        D = rep.clt.W_dec[l][f_idx[s:e]].detach() * f_act[s:e, None, None]
        blocks.append((l, p, s, e, D.reshape(e - s, -1)))
    return blocks


def _rows(rep: Replacement, blocks, t_layer, t_pos, vecs, N: int, nF: int, emb0: int) -> torch.Tensor:
    """Adjacency rows of one batch of targets."""
    B, L = len(t_layer), rep.L
    P = int(t_pos.max()) + 1
    top = int(t_layer.max())
    b = torch.arange(B)
    logit = t_layer == L
    inject = {}
    for l in torch.unique(t_layer[~logit]).tolist():
        m = t_layer == l
        inject[l] = (b[m], t_pos[m], vecs[m])
    final = (b[logit], vecs[logit]) if logit.any() else None
    G_post, G_emb = rep.backward(min(top, L - 1), inject, B, P, final)

    out = torch.zeros(B, N)
    # feature sources: only layers below the batch's top layer can reach it
    for l, p, s, e, D in blocks:
        if p >= P or l >= top:
            continue
        span = rep.clt.spans[l]
        out[:, s:e] = G_post[:, p, l : l + span].reshape(B, -1) @ D.T
    # error sources: [B, L, P]
    err = torch.einsum("bpld,lpd->blp", G_post, rep.error[:, :P])
    out[:, nF : nF + L * rep.P].view(B, L, rep.P)[:, :, :P] = err
    out[:, emb0 : emb0 + P] = (G_emb * rep.cache.resid_pre0[:P]).sum(-1)
    return out


def _select_features(rep, f_layer, f_pos, f_idx, f_act, logit_tok, logit_p, max_feature_nodes, batch_size):
    """Choose the `max_feature_nodes` most influential features: compute logit rows, then repeatedly the rows of
    the most influential not-yet-visited features, re-ranking by influence (as circuit-tracer does)."""
    from .prune import influence

    L, P = rep.L, rep.P
    n = len(f_layer)
    nL = len(logit_tok)
    blocks = _feature_blocks(rep, f_layer, f_pos, f_idx, f_act)
    N = n + L * P + P + nL
    A = torch.zeros(N, N)
    lvec, _ = rep.logit_readout(logit_tok)
    A[N - nL :] = _rows(rep, blocks, torch.full((nL,), L), torch.full((nL,), P - 1), lvec, N, n, n + L * P)
    w = torch.zeros(N)
    w[N - nL :] = logit_p
    visited = torch.zeros(n, dtype=torch.bool)
    while int(visited.sum()) < max_feature_nodes:
        inf = influence(A, w)[:n].clone()
        inf[visited] = -1
        k = min(batch_size, max_feature_nodes - int(visited.sum()))
        pick = torch.topk(inf, k).indices
        vecs = torch.stack([rep.encoder_readout(int(f_layer[i]), f_pos[i : i + 1], f_idx[i : i + 1])[0] for i in pick])
        A[pick] = _rows(rep, blocks, f_layer[pick], f_pos[pick], vecs, N, n, n + L * P)
        visited[pick] = True
    return torch.nonzero(visited).squeeze(1)
