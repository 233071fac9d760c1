"""One prompt's adjacency rows split over several Ray actors (docs/attribution.md, "One prompt on several workers").

`attribute(model, clt, prompt, rows=SplitRows(...))`: the driver keeps everything but the rows (capture, selection,
assembly, scores); each batch of targets is cut into contiguous parts, one per actor, and the parts' rows are
concatenated in order. Every actor holds the model and the CLT (loaded once, from the same name / URL the driver
used) and, per prompt, the replacement state it rebuilds from the tokens (`attribution.attribute.row_engine`):
capture and replacement are deterministic, and a row depends only on its own target, so the rows equal the
single-process ones. Tensors travel as numpy arrays through Ray's object store.

A worker that dies is replaced and its part re-run (`retries` times per part); past that, or when a worker raises,
the prompt fails with one CTRayError line. Workers that find no room on the cluster fail after CT_RAY_RESOURCE_WAIT_S.
"""

from __future__ import annotations

import contextlib
import logging
import os
import traceback
from collections.abc import Iterator

import numpy as np
import torch

from ..errors import CTRayError, one_line
from .capacity import no_room, resource_wait_s
from .pool import _cause
from .ray_start import ensure_ray
from .worker_env import worker_env

log = logging.getLogger(__name__)


class RowWorker:
    """The actor: model + CLT once; one prompt's RowEngine at a time (`prepare`), its rows on demand."""

    def __init__(self, cfg: dict):
        self.cfg, self.engine, self.plan, self._ctx, self._rows, self.init_error = cfg, None, None, None, None, None
        try:
            self._load()
        except Exception as e:  # reported by ready(): a worker that cannot load must not crash-loop
            self.init_error = f"{type(e).__name__}: {one_line(e)}"
            log.error("attribution row worker failed to start:\n%s", traceback.format_exc())

    def _load(self) -> None:
        from ..clt.io import load_model_and_clt

        cfg = self.cfg
        torch.set_num_threads(cfg["torch_threads"])
        self.model, self.clt = load_model_and_clt(cfg["model"], cfg["clt"], cfg["random_clt"],
                                                  clt_options=cfg["clt_options"], device=cfg["device"])

    def ready(self) -> dict:
        return {"error": self.init_error, "pid": os.getpid()}

    def prepare(self, tokens: np.ndarray, decoder_cache: int, bsz: int) -> dict:
        """Build the prompt's engine; `bsz`: the targets this actor gets per batch (its streams are cut from them)."""
        from ..attribution import budget
        from ..attribution.attribute import RowPlan, local_rows, row_engine

        self.release()  # the previous prompt's state goes before the next one is built
        plan = RowPlan(_tensor(tokens), decoder_cache, bsz,
                       budget.streams_for(bsz, self.cfg["torch_threads"], self.cfg["device"]))
        with self._placement(plan):
            self.engine = row_engine(self.model, self.clt, plan)
            self._ctx = local_rows(self.engine, plan)  # the driver's row source, here: streams and decoder cache
            self._rows = self._ctx.__enter__()
        self.plan = plan
        return _fingerprint(self.engine)

    def _placement(self, plan) -> contextlib.ExitStack:
        # as in `attribute`: on a CPU, ops in one thread when streams bring the parallelism; on a GPU, on the GPU
        from ..attribution import budget

        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        dev = torch.device(self.cfg["device"])
        if dev.type != "cpu":
            stack.enter_context(torch.device(dev))
        stack.enter_context(budget.torch_threads(1 if plan.streams > 1 else self.cfg["torch_threads"]))
        return stack

    def rows(self, t_layer: np.ndarray, t_pos: np.ndarray, vecs: np.ndarray) -> np.ndarray:
        if self.engine is None:
            raise CTRayError("row worker has no prompt prepared")
        dev = torch.device(self.cfg["device"])
        with self._placement(self.plan):
            out = self._rows(_tensor(t_layer, dev), _tensor(t_pos, dev), _tensor(vecs, dev))
        return out.cpu().numpy()

    def release(self) -> bool:
        if getattr(self, "_ctx", None) is not None:
            self._ctx.__exit__(None, None, None)
        self._ctx = self._rows = self.engine = self.plan = None
        return True


def _tensor(a: np.ndarray, device=None) -> torch.Tensor:
    # arrays from the object store are read-only: copy (they are small) rather than alias them
    return torch.from_numpy(np.array(a)).to(device) if device is not None else torch.from_numpy(np.array(a))


def _fingerprint(engine) -> dict:
    """What the driver compares to catch workers that loaded another model or CLT than it did."""
    acts = engine.rep.acts
    return {"n_active": engine.nF, "n_sources": engine.S, "act_sum": float(sum(a.double().sum() for a in acts))}


class SplitRows:
    """A row source for `attribute(..., rows=)` over `workers` Ray actors; reusable across prompts. `close()` (or
    `with SplitRows(...) as split:`) kills the actors.

    `model` / `clt` are what the driver loaded them from (a built-in name, a directory or hub id; a CLT URL), or
    `random_clt={"features": N, "seed": S, ...}` for a seeded random CLT rebuilt in each worker. On a cluster the
    paths must be readable from every node. `num_cpus` / `num_gpus` per actor (a GPU actor runs on "cuda");
    torch threads per actor default to its `num_cpus`."""

    what = "attribution row"

    def __init__(self, model: str, clt: str | None = None, *, random_clt: dict | None = None,
                 clt_options: dict | None = None, workers: int = 2, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 torch_threads: int | None = None, retries: int = 1, address: str | None = None):
        if workers < 1:
            raise CTRayError(f"workers must be at least 1, got {workers}")
        if bool(clt) == bool(random_clt):
            raise CTRayError("give the row workers exactly one of clt (a CLT URL) and random_clt")
        from ..store.fs import worker_locations

        model, clt = worker_locations(model, clt)
        self.cfg = {"model": str(model), "clt": clt, "clt_options": clt_options or {}, "random_clt": random_clt,
                    "device": "cuda" if num_gpus > 0 else "cpu", "torch_threads": torch_threads or max(1, int(num_cpus))}
        self.num_cpus, self.num_gpus, self.retries = num_cpus, num_gpus, retries
        self.ray = ray = ensure_ray(address)
        env = worker_env(ray)
        # retries are ours (a replaced actor must be prepared again first), so Ray restarts nothing
        self.cls = ray.remote(RowWorker).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0,
                                                 max_task_retries=0, runtime_env={"env_vars": env} if env else None)
        self.actors: list = []
        self.plan: tuple | None = None  # (tokens, decoder_cache, bsz, fingerprint) of the prompt in progress
        try:
            self.actors = [self.cls.remote(self.cfg) for _ in range(workers)]
            self._wait_ready(list(self.actors))
        except BaseException:
            self.close()
            raise

    # --- actors -----------------------------------------------------------------------------------------------
    def _wait_ready(self, actors: list) -> None:
        ray = self.ray
        refs = [a.ready.remote() for a in actors]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=resource_wait_s())
        if pending:  # an actor asking for more than any node has stays pending forever in Ray
            raise no_room(ray, self.what, self.num_cpus, self.num_gpus)
        for out in self._get(refs, "start"):
            if out.get("error"):
                raise CTRayError(f"{self.what} worker cannot start: {out['error']}")

    def _get(self, refs: list, doing: str) -> list:
        from ray.exceptions import RayActorError

        try:
            return self.ray.get(refs)
        except RayActorError as e:
            raise CTRayError(f"{self.what} worker died ({doing}): {one_line(e)}") from None
        except Exception as e:
            raise CTRayError(f"{self.what} worker failed ({doing}): {one_line(_cause(e))}") from None

    def _replace(self, k: int, prepare: bool) -> None:
        """A fresh actor in slot k (`prepare`: prepared for the prompt in progress)."""
        with contextlib.suppress(Exception):
            self.ray.kill(self.actors[k])
        self.actors[k] = self.cls.remote(self.cfg)
        self._wait_ready([self.actors[k]])
        if prepare and self.plan is not None:
            tokens, cache, bsz, fp = self.plan
            self._check(self._get([self.actors[k].prepare.remote(tokens, cache, bsz)], "prepare")[0], fp)

    def _run(self, method: str, args: list[tuple]) -> list:
        """`method(*args[k])` on actor k for every k, the answers in order; a part whose actor died is re-run on
        a replacement, `retries` times."""
        from ray.exceptions import RayActorError

        ray = self.ray
        refs = {getattr(self.actors[k], method).remote(*a): (k, 0) for k, a in enumerate(args)}
        out: list = [None] * len(args)
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            k, tries = refs.pop(ready[0])
            try:
                out[k] = ray.get(ready[0])
            except RayActorError as e:
                if tries >= self.retries:
                    raise CTRayError(f"{self.what} worker died ({method}) and was retried {tries} time(s): "
                                     f"{one_line(e)}") from None
                log.warning("%s worker %d died (%s); replacing it: %s", self.what, k, method, one_line(e))
                self._replace(k, prepare=method != "prepare")
                refs[getattr(self.actors[k], method).remote(*args[k])] = (k, tries + 1)
            except Exception as e:
                raise CTRayError(f"{self.what} worker failed ({method}): {one_line(_cause(e))}") from None
        return out

    def close(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(a)
        self.actors = []

    def __enter__(self) -> SplitRows:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the row source ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def __call__(self, engine, plan) -> Iterator:
        if not self.actors:
            raise CTRayError(f"{self.what} workers are closed")
        fp = _fingerprint(engine)
        tokens = plan.tokens.detach().cpu().numpy()
        part = -(-int(plan.bsz) // len(self.actors))  # each actor's share of a batch
        self.plan = (tokens, int(plan.decoder_cache), part, fp)
        try:
            for got in self._run("prepare", [self.plan[:3]] * len(self.actors)):
                self._check(got, fp)
            yield lambda t_layer, t_pos, vecs: self._rows(engine.S, t_layer, t_pos, vecs)
        finally:
            self.plan = None
            with contextlib.suppress(Exception):  # frees the workers' prompt state; a dead one has none
                self.ray.get([a.release.remote() for a in self.actors])

    def _check(self, got: dict, fp: dict) -> None:
        same = got["n_active"] == fp["n_active"] and got["n_sources"] == fp["n_sources"]
        if not same or abs(got["act_sum"] - fp["act_sum"]) > 1e-4 * max(1.0, abs(fp["act_sum"])):
            raise CTRayError(f"{self.what} workers' replacement state differs from this process's ({got} vs {fp}): "
                             f"give them the model and CLT this process attributes with")

    def _rows(self, S: int, t_layer: torch.Tensor, t_pos: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
        B = len(t_layer)
        n = min(len(self.actors), B)  # interleaved parts: each has targets of every depth, so they take about as long
        tl, tp, v = (x.detach().cpu().numpy() for x in (t_layer, t_pos, vecs))
        parts = self._run("rows", [(tl[i::n], tp[i::n], v[i::n]) for i in range(n)])
        out = torch.empty(B, S)
        for i, p in enumerate(parts):
            np.copyto(out[i::n].numpy(), p)  # one copy out of the (read-only) object store buffer
        return out.to(vecs.device)

