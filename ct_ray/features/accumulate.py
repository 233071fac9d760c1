"""Per-feature statistics over many contexts as a mergeable state (plain numpy dicts, cheap to ship from actors).

A state holds, for every feature: token/activation counts, the `top_k` contexts with the highest max activation
(with a window of per-token activations around the max) and a reservoir of active contexts chosen by a hash
priority (a deterministic random sample, from which quantile samples are drawn at the end). `merge` keeps the top
entries by a total order ((-value, context) and (priority, context)), so the result does not depend on how the
contexts were split into chunks or in which order chunks arrive; sums are merged by the driver in chunk order.
"""

from __future__ import annotations

import numpy as np

_TOP = ("top_val", "top_ctx", "top_pos", "top_start", "top_acts")
_SMP = ("smp_pri", "smp_val", "smp_ctx", "smp_pos", "smp_start", "smp_acts")
_NO_CTX = np.iinfo(np.int64).max


def empty_state(n_features: int, top_k: int, samples: int, window: int) -> dict:
    F = n_features
    return {
        "n_tokens": np.zeros((), np.int64), "n_active": np.zeros(F, np.int64), "sum_act": np.zeros(F, np.float64),
        "max_act": np.zeros(F, np.float32),
        "top_val": np.full((F, top_k), -np.inf, np.float32), "top_ctx": np.full((F, top_k), _NO_CTX, np.int64),
        "top_pos": np.zeros((F, top_k), np.int32), "top_start": np.zeros((F, top_k), np.int32),
        "top_acts": np.zeros((F, top_k, window), np.float32),
        "smp_pri": np.full((F, samples), _NO_CTX, np.int64), "smp_val": np.zeros((F, samples), np.float32),
        "smp_ctx": np.full((F, samples), _NO_CTX, np.int64), "smp_pos": np.zeros((F, samples), np.int32),
        "smp_start": np.zeros((F, samples), np.int32), "smp_acts": np.zeros((F, samples, window), np.float32),
    }


def _priority(ctx: np.ndarray, gid: np.ndarray) -> np.ndarray:
    """A fixed pseudo-random 31-bit priority per (context, feature): the reservoir keeps the smallest."""
    h = (ctx.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B1)
    h ^= (gid.astype(np.uint64) + np.uint64(1)) * np.uint64(0x85EBCA77)
    h ^= h >> np.uint64(15)
    h *= np.uint64(0x2C1B3C6D)
    h ^= h >> np.uint64(12)
    return (h & np.uint64(0x7FFFFFFF)).astype(np.int64)


def batch_state(acts: np.ndarray, ctx: np.ndarray, top_k: int, samples: int, window: int) -> dict:
    """State of one batch: `acts` [B, T, F] feature activations of B contexts (position 0, the BOS attention sink,
    is ignored), `ctx` [B] their global context indices."""
    acts = np.asarray(acts, np.float32).copy()
    B, T, F = acts.shape
    acts[:, 0] = 0.0
    w = min(window, T)
    s = empty_state(F, 0, 0, window)
    s["n_tokens"] = np.asarray(B * (T - 1), np.int64)
    s["n_active"] = (acts > 0).sum((0, 1)).astype(np.int64)
    s["sum_act"] = acts.sum((0, 1), dtype=np.float64)
    s["max_act"] = np.maximum(acts.max((0, 1)), 0).astype(np.float32)
    cmax = acts.max(1).T  # [F, B]
    pos = acts.argmax(1).T.astype(np.int32)  # [F, B]
    # window: up to window-4 tokens before the max, a few after (what led to the activation matters most)
    start = np.clip(pos - (w - 4), 0, T - w).astype(np.int32)
    idx = start[..., None] + np.arange(w)  # [F, B, w]
    win = np.zeros((F, B, window), np.float32)
    win[..., :w] = acts[np.arange(B)[None, :, None], idx, np.arange(F)[:, None, None]]
    ctx_fb = np.broadcast_to(np.asarray(ctx, np.int64)[None, :], (F, B))
    active = cmax > 0
    s.update(top_val=np.where(active, cmax, -np.inf).astype(np.float32), top_ctx=np.where(active, ctx_fb, _NO_CTX),
             top_pos=pos, top_start=start, top_acts=win)
    pri = _priority(ctx_fb, np.broadcast_to(np.arange(F)[:, None], (F, B)))
    s.update(smp_pri=np.where(active, pri, _NO_CTX), smp_val=cmax.astype(np.float32),
             smp_ctx=np.where(active, ctx_fb, _NO_CTX), smp_pos=pos, smp_start=start, smp_acts=win)
    return merge(empty_state(F, top_k, samples, window), s)  # pads to top_k / samples when B is smaller


def _select(s: dict, top_k: int, samples: int) -> dict:
    """Keep the first `top_k` / `samples` entries per feature by the total orders."""
    order = np.lexsort((s["top_ctx"], -s["top_val"]), axis=-1)[:, :top_k]
    for k in _TOP:
        s[k] = np.take_along_axis(s[k], order if s[k].ndim == 2 else order[..., None], 1)
    order = np.lexsort((s["smp_ctx"], s["smp_pri"]), axis=-1)[:, :samples]
    for k in _SMP:
        s[k] = np.take_along_axis(s[k], order if s[k].ndim == 2 else order[..., None], 1)
    return s


def merge(a: dict, b: dict) -> dict:
    """`a` sets the sizes kept (top_k, samples)."""
    top_k, samples = a["top_val"].shape[1], a["smp_pri"].shape[1]
    out = {"n_tokens": a["n_tokens"] + b["n_tokens"], "n_active": a["n_active"] + b["n_active"],
           "sum_act": a["sum_act"] + b["sum_act"], "max_act": np.maximum(a["max_act"], b["max_act"])}
    for k in _TOP + _SMP:
        out[k] = np.concatenate([a[k], b[k]], 1)
    return _select(out, top_k, samples)


def quantile_picks(vals: np.ndarray, valid: np.ndarray, quantiles: list[float]) -> list[tuple[float, int]]:
    """(quantile, index into the sample) for each requested quantile of the sampled max activations."""
    idx = np.flatnonzero(valid)
    if not len(idx):
        return []
    idx = idx[np.argsort(vals[idx], kind="stable")]
    out, seen = [], set()
    for q in quantiles:
        i = int(round(q * (len(idx) - 1)))
        if i not in seen:
            seen.add(i)
            out.append((float(q), int(idx[i])))
    return out
