"""`attribute(model, clt, prompt) -> Graph`: the attribution graph of one prompt.

Edges are computed one adjacency row per target, in batches of targets, by the exact transpose of the frozen
replacement model (see replacement.py): a target's row holds the direct effect of every source on it. Rows exist
only for kept targets (logits and kept features); memory is O((kept features + logits) x sources), estimated and
checked against a budget before anything large is allocated (budget.py).

Rows come from a *row source* (`rows=`): by default this process's RowEngine; ct_ray.executor.split_rows spreads
each batch over Ray actors that rebuild the same engine from the tokens (`row_engine`), while selection, assembly
and everything else stay here.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..models.capture import capture
from ..specs.attribution import AttributionSpec
from . import budget as _budget
from .budget import DEFAULT_MAX_FEATURE_NODES
from .graph import Graph
from .node_selection import RowFn, assemble, select
from .replacement import Replacement
from .rows import RowEngine


@dataclass(frozen=True)
class RowPlan:
    """What a row source needs to rebuild this prompt's RowEngine elsewhere (see `row_engine`)."""

    tokens: torch.Tensor  # the prompt's token ids, BOS included
    decoder_cache: int  # bytes of padded decoder rows the engine keeps between batches (0: gathered per batch)
    bsz: int  # targets per backward pass
    streams: int = 1  # parts of each batch computed at once, one thread each (budget.streams_for)


# given the driver's engine and the plan: a context in which `rows(t_layer, t_pos, vecs) -> [B, S]` is valid
RowSource = Callable[[RowEngine, RowPlan], AbstractContextManager[RowFn]]


@contextlib.contextmanager
def local_rows(engine: RowEngine, plan: RowPlan) -> Iterator[RowFn]:
    """The default row source: this process's engine. With `plan.streams` > 1, each batch is cut into that many
    interleaved parts (each with targets of every depth, so the parts take about as long), computed at once by
    single-threaded streams: no fork/join per op, so a core lost to another process slows the batch by about that
    core's share, where threads that wait for a descheduled sibling at every op lose much more (benchmarks/RESULTS.md,
    "contention")."""
    n = plan.streams
    if n <= 1:
        engine.fill_cache(plan.decoder_cache)
        yield engine.rows
        return

    def one_thread(fn, args):
        torch.set_num_threads(1)  # per thread: OpenMP's thread count is a per-thread setting
        with torch.no_grad():
            return fn(*args)

    def rows(t_layer, t_pos, vecs):
        if len(t_layer) < 2 * n:
            return engine.rows(t_layer, t_pos, vecs)
        parts = [(t_layer[i::n], t_pos[i::n], vecs[i::n]) for i in range(n)]
        res = list(pool.map(functools.partial(one_thread, engine.rows), parts))
        out = torch.empty(len(t_layer), res[0].shape[1])
        for i, r in enumerate(res):
            out[i::n] = r
        return out

    with ThreadPoolExecutor(n, thread_name_prefix="ct-ray-rows") as pool:
        engine.fill_cache(plan.decoder_cache, lambda fn, xs: pool.map(functools.partial(one_thread, fn), xs))
        yield rows


def select_logits(probs: torch.Tensor, max_n_logits: int, desired_logit_prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top tokens until their cumulative probability reaches `desired_logit_prob`, at most `max_n_logits`."""
    p, idx = probs.topk(min(max_n_logits, probs.numel()))
    cum = torch.cumsum(p, 0)
    k = int(torch.searchsorted(cum, torch.tensor([desired_logit_prob])).item()) + 1
    k = max(1, min(k, len(p)))
    return idx[:k], p[:k]


def _on_model_device(fn):
    # tensors the attribution code creates go where the model lives (a GPU when it is on one; the CPU path runs
    # without the device mode's per-op overhead); Graph.build moves the result to the CPU
    @functools.wraps(fn)
    def run(model, *args, **kwargs):
        dev = next(model.model.parameters()).device
        if dev.type == "cpu":
            return fn(model, *args, **kwargs)
        with torch.device(dev):
            return fn(model, *args, **kwargs)
    return run


@_on_model_device
@torch.no_grad()
def attribute(
    model,
    clt,
    prompt: str | Sequence[int] | torch.Tensor,
    *,
    max_n_logits: int = AttributionSpec.field_default("max_n_logits"),
    desired_logit_prob: float = AttributionSpec.field_default("desired_logit_prob"),
    batch_size: int = AttributionSpec.field_default("batch_size"),
    max_feature_nodes: int | None = DEFAULT_MAX_FEATURE_NODES,
    memory_budget: int | None = None,
    verbose: bool = False,
    rows: RowSource | None = None,
) -> Graph:
    """Attribution graph of `prompt` under `model` (a LoadedModel) with `clt` in place of its MLPs.

    Node order: feature nodes (sorted by layer, position, index), error nodes (layer-major), token embeddings,
    logit nodes. `Graph.adjacency[t, s]` is the direct effect of source s on target t.
    At most `max_feature_nodes` features (default 7500, as circuit-tracer) become nodes: the most influential
    ones, found iteratively from the logits; None keeps every active feature. `memory_budget` (bytes; default:
    $CT_RAY_ATTRIBUTION_MEMORY or 80% of the available memory) bounds what the graph may allocate: a larger
    graph raises GraphTooLargeError (a PromptError) before allocating it. `rows`: where adjacency rows are
    computed (default `local_rows`; `ct_ray.executor.split_rows.SplitRows` spreads them over Ray actors).
    On a CPU, every op runs in one thread and the parallelism comes from computing parts of each batch of rows
    at once, one stream per torch thread of the caller (`local_rows`): robust when another process shares the
    cores (benchmarks/RESULTS.md, "contention").
    """
    threads = torch.get_num_threads()
    on_cpu = next(model.model.parameters()).device.type == "cpu"
    with _budget.torch_threads(1 if on_cpu else threads):
        return _attribute(model, clt, prompt, threads, max_n_logits=max_n_logits, desired_logit_prob=desired_logit_prob,
                          batch_size=batch_size, max_feature_nodes=max_feature_nodes, memory_budget=memory_budget,
                          verbose=verbose, rows=rows)


def _attribute(model, clt, prompt, threads: int, *, max_n_logits: int, desired_logit_prob: float, batch_size: int,
               max_feature_nodes: int | None, memory_budget: int | None, verbose: bool,
               rows: RowSource | None) -> Graph:
    t0 = time.perf_counter()
    tokens = model.encode(prompt)
    cache = capture(model, tokens)
    rep = Replacement(model, clt, cache)
    L, P, d = rep.L, rep.P, rep.d
    t_fwd = time.perf_counter()

    # --- nodes ---------------------------------------------------------------------------------------
    f_layer, f_pos, f_idx, f_act = _features(rep)
    logit_tok, logit_p = select_logits(cache.probs, max_n_logits, desired_logit_prob)
    nL = len(logit_tok)
    n_active = len(f_layer)
    n_keep = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)

    # --- memory: estimate, then allocate ---------------------------------------------------------------
    S = n_active + L * P + P
    budget = _budget.default_budget(cache.resid_mid.device) if memory_budget is None else int(memory_budget)
    bsz = _budget.batch_size_for(batch_size, P, L, d, S, budget)
    streams = _budget.streams_for(bsz, threads, cache.resid_mid.device)
    engine = RowEngine(rep, f_layer, f_pos, f_idx, f_act, chunk_bytes=_budget.CHUNK_BYTES)  # index structures
    dec_cache = engine.decoder_bytes()
    if dec_cache > int(budget * _budget.CACHE_FRACTION):
        dec_cache = 0  # gathered per batch instead

    def estimate_for(k):
        return _budget.estimate(n_active=n_active, n_keep=k, n_logits=nL, L=L, P=P, d=d, bsz=bsz,
                                decoder_cache=dec_cache, n_heads=rep.H, n_tc=sum(clt.d_tc))

    parts = _budget.check(estimate_for, budget, n_tokens=P, n_active=n_active, n_keep=n_keep)
    lvec, _ = rep.logit_readout(logit_tok)

    def readout(sel):
        v = torch.empty(len(sel), d)
        for l in torch.unique(f_layer[sel]).tolist():
            m = f_layer[sel] == l
            v[m] = rep.encoder_readout(l, f_pos[sel][m], f_idx[sel][m])
        return v

    t_rows = time.perf_counter()
    source = local_rows if rows is None else rows
    # batches too small to split (streams_for): one stream, with the caller's threads (on a GPU they are in place)
    with _budget.torch_threads(threads if streams == 1 else 1), \
            source(engine, RowPlan(tokens, dec_cache, bsz, streams)) as row_fn:
        if n_keep < n_active:
            selected, st = select(engine, readout, f_layer, f_pos, lvec, logit_p, n_keep, batch_size, bsz, verbose,
                                  rows=row_fn)
        else:
            A = _all_rows(engine, readout, f_layer, f_pos, lvec, bsz, verbose, row_fn)
    del engine, row_fn
    if n_keep < n_active:
        A = assemble(st, selected, n_active, L * P + P)
        f_layer, f_pos, f_idx, f_act = f_layer[selected], f_pos[selected], f_idx[selected], f_act[selected]
    t_done = time.perf_counter()
    nF = len(f_layer)
    N = nF + L * P + P + nL
    log0 = N - nL
    targets = torch.full((N,), float("nan"))
    consts = torch.full((N,), float("nan"))

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
        "memory_estimate_bytes": parts["total"],
        "memory_budget_bytes": budget,
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


def _features(rep: Replacement):
    """Active features (layer, position, index, activation), sorted by layer, position, index."""
    feats = [torch.nonzero(a) for a in rep.acts]  # per layer: [n, 2] (pos, idx), sorted
    f_layer = torch.cat([torch.full((len(f),), l, dtype=torch.long) for l, f in enumerate(feats)])
    f_pos = torch.cat([f[:, 0] for f in feats])
    f_idx = torch.cat([f[:, 1] for f in feats])
    f_act = torch.cat([rep.acts[l][f[:, 0], f[:, 1]] for l, f in enumerate(feats)])
    return f_layer, f_pos, f_idx, f_act


@_on_model_device
@torch.no_grad()
def row_engine(model, clt, plan: RowPlan) -> RowEngine:
    """The RowEngine `attribute` builds for `plan.tokens`, rebuilt from the model and the CLT alone (what a remote
    row worker holds). Capture and replacement are deterministic, so its rows are the driver's."""
    rep = Replacement(model, clt, capture(model, plan.tokens.to(next(model.model.parameters()).device)))
    return RowEngine(rep, *_features(rep), chunk_bytes=_budget.CHUNK_BYTES)  # rows through local_rows(engine, plan)


def _const_logits(rep: Replacement, cfin: torch.Tensor, logit_tok: torch.Tensor) -> torch.Tensor:
    lg = rep.logits(cfin)[-1]
    return lg[logit_tok] - lg.mean()


def _all_rows(engine: RowEngine, readout, f_layer, f_pos, lvec, bsz: int, verbose: bool, rows: RowFn) -> torch.Tensor:
    """Every feature is a node: rows go straight into the square adjacency. Targets are batched by layer and
    position, deepest first, so a batch's backward pass starts at its highest layer and stops at its last
    position."""
    rep = engine.rep
    L, P, nF, nL = rep.L, rep.P, engine.nF, len(lvec)
    N = engine.S + nL
    A = torch.zeros(N, N)
    dest = torch.cat([torch.arange(N - nL, N), torch.arange(nF)])
    t_layer = torch.cat([torch.full((nL,), L), f_layer])
    t_pos = torch.cat([torch.full((nL,), P - 1), f_pos])
    order = torch.argsort(t_layer * P + t_pos, descending=True, stable=True)
    for i in tqdm(range(0, len(order), bsz), desc="attribution", unit="batch", disable=not verbose):
        sel = order[i : i + bsz]
        is_logit = sel < nL
        vecs = torch.empty(len(sel), rep.d)
        if is_logit.any():
            vecs[is_logit] = lvec[sel[is_logit]]
        if (~is_logit).any():
            vecs[~is_logit] = readout(sel[~is_logit] - nL)
        A[dest[sel], : engine.S] = rows(t_layer[sel], t_pos[sel], vecs)
    return A
