"""Stateless fan-out: `map_unordered(fn, items, workers)` runs `fn(item, **kwargs)` for each item, in this process
(workers <= 1) or as Ray tasks (at most `workers` in flight, so memory holds that many results), yielding results as
they finish. For per-file work with no heavy state (analysis); stages with a model use the actor pool (pool.py)."""

from __future__ import annotations

from ..errors import CTRayError, one_line


def map_unordered(fn, items, *, workers: int = 1, kwargs: dict | None = None, num_cpus: float = 1,
                  address: str | None = None, max_retries: int = 2):
    kwargs = kwargs or {}
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        for it in items:
            yield fn(it, **kwargs)
        return
    from . import ensure_ray
    from .worker_env import worker_env

    ray = ensure_ray(address)
    env = worker_env(ray)
    task = ray.remote(num_cpus=num_cpus, max_retries=max_retries, runtime_env={"env_vars": env} if env else None)(fn)
    queue, running = list(reversed(items)), {}
    try:
        while queue or running:
            while queue and len(running) < workers:
                ref = task.remote(queue.pop(), **kwargs)
                running[ref] = True
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                del running[ref]
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # the task's own error, re-raised as it was
                    raise e.as_instanceof_cause() from None
                except ray.exceptions.RayError as e:
                    raise CTRayError(f"a worker task failed after {max_retries} retries: {one_line(e)}") from e
    finally:
        for ref in running:
            ray.cancel(ref, force=True)
