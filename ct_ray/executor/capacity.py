"""How long a driver waits for its first worker to find room on the cluster, and what it says when none does.

An actor asking for more CPUs or GPUs than any node has stays pending forever in Ray; an autoscaler may still add
a node, so drivers wait a bounded time (CT_RAY_RESOURCE_WAIT_S, default 600 s) and then fail with one line.
"""

from __future__ import annotations

import os

from ..errors import CTRayError


def resource_wait_s() -> float:
    return float(os.environ.get("CT_RAY_RESOURCE_WAIT_S") or 600)


def no_room(ray, what: str, num_cpus: float, num_gpus: float) -> CTRayError:
    """The error for workers of `what` that found no room in resource_wait_s(), naming the largest node."""
    try:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        big = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)))
        largest = f"largest node: {big.get('CPU', 0):g} CPUs, {big.get('GPU', 0):g} GPUs"
    except Exception:  # only for the message
        largest = "node sizes unknown"
    return CTRayError(f"no {what} worker could start in {resource_wait_s():.0f} s: no node has room for "
                      f"num_cpus={num_cpus:g}, num_gpus={num_gpus:g} ({largest}); lower the spec's resources")
