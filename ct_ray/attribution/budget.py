"""Memory estimate of one attribution graph, checked before the large allocations, and its row streams."""

from __future__ import annotations

import contextlib
import os

import torch

from ..errors import PromptError
from ..specs.attribution import AttributionSpec

DEFAULT_MAX_FEATURE_NODES = AttributionSpec.field_default("max_feature_nodes")  # 7500, circuit-tracer's (docs/attribution.md)
BATCH_BYTES = 512 * 2**20  # per-batch gradient buffers ([B, P, L, d] floats): at least this much, and up to
MAX_BATCH_BYTES = 2 * 2**30  # a quarter of the budget, at most this: larger batches share each decoder gather
CHUNK_BYTES = 128 * 2**20  # decoder rows gathered at once when they are not cached
CACHE_FRACTION = 0.25  # share of the budget the padded decoders may keep between batches
MIN_PART = 8  # targets per row stream, at least (budget.streams_for)


class GraphTooLargeError(PromptError):
    """The prompt's attribution graph does not fit the memory budget (a sweep records an error row)."""


def available_bytes() -> int:
    """Memory this process may still use: MemAvailable, or less under a cgroup (container) limit."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_f) as f:
                lim = f.read().strip()
            with open(usage_f) as f:
                use = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if lim.isdigit() and int(lim) < 2**60:
            room = int(lim) - use
            avail = room if avail is None else min(avail, room)
        break
    return avail if avail is not None else 8 * 2**30


def default_budget(device: torch.device | str | None = None) -> int:
    """`CT_RAY_ATTRIBUTION_MEMORY` (bytes, or with a G/M suffix) if set, else 80% of the available memory (of the
    GPU when `device` is a CUDA device)."""
    env = os.environ.get("CT_RAY_ATTRIBUTION_MEMORY", "").strip()
    if env:
        mult = {"G": 2**30, "M": 2**20, "K": 2**10}.get(env[-1].upper(), 1)
        try:
            return int(float(env[:-1] if mult > 1 else env) * mult)
        except ValueError as e:
            raise PromptError(f"CT_RAY_ATTRIBUTION_MEMORY must be a number of bytes (e.g. 8G), got {env!r}") from e
    if device is not None and torch.device(device).type == "cuda":
        return int(0.8 * torch.cuda.mem_get_info(device)[0])
    return int(0.8 * available_bytes())


def batch_size_for(batch_size: int, P: int, L: int, d: int, S: int, budget: int) -> int:
    """Targets per backward pass: `batch_size`, fewer where the gradient buffers would exceed their share."""
    per_target = 4 * (2 * P * L * d + 2 * S)
    share = max(BATCH_BYTES, min(MAX_BATCH_BYTES, budget // 4))
    return max(1, min(batch_size, share // per_target))


def estimate(*, n_active: int, n_keep: int, n_logits: int, L: int, P: int, d: int, bsz: int,
             decoder_cache: int, n_heads: int = 0, n_tc: int = 0) -> dict:
    """Bytes attribution allocates beyond the model and the CLT, by part ("forward": the captured forward pass and
    the replacement model, [L, P, n_tc] activations and pre-activations, [L, H, P, P] patterns, residuals)."""
    S = n_active + L * P + P
    N = n_keep + L * P + P + n_logits
    parts = {"forward": 4 * (2 * P * n_tc + L * n_heads * P * P + 10 * L * P * d)}
    parts["graph"] = 4 * N * N  # the kept nodes' square adjacency
    if n_keep < n_active:
        R = n_keep + n_logits
        parts["rows"] = 4 * R * S  # [kept targets, all sources] during selection
        parts["influence"] = 3 * 4 * R * R  # the rows x rows system of the triangular solve
    parts["batch"] = 4 * bsz * (2 * P * L * d + 2 * S)  # gradients, the rows of a batch and their copy
    parts["decoders"] = decoder_cache + 2 * CHUNK_BYTES
    parts["total"] = sum(parts.values())
    return parts


def check(estimate_for, budget: int, *, n_tokens: int, n_active: int, n_keep: int) -> dict:
    """`estimate_for(k)` -> parts for k kept features; raise GraphTooLargeError if `n_keep` does not fit."""
    parts = estimate_for(n_keep)
    if parts["total"] <= budget:
        return parts
    lo, hi = 0, n_keep  # the largest k that fits, for the message
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if estimate_for(mid)["total"] <= budget else (lo, mid - 1)
    hint = f"; max_feature_nodes <= {lo} would fit" if lo > 0 else ""
    raise GraphTooLargeError(
        f"attribution graph too large for the memory budget: {n_tokens} tokens, {n_active} active features, "
        f"{n_keep} feature nodes need ~{parts['total'] / 2**30:.1f} GiB, budget {budget / 2**30:.1f} GiB"
        f" (lower max_feature_nodes or shorten the prompt{hint})"
    )


def streams_for(bsz: int, threads: int, device: torch.device | str = "cpu") -> int:
    """Row streams on a CPU: one per torch thread, each part of a batch at least MIN_PART targets; 1 on a GPU."""
    if torch.device(device).type != "cpu":
        return 1
    return max(1, min(threads, bsz // MIN_PART))


@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    if n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != old:
            torch.set_num_threads(old)
