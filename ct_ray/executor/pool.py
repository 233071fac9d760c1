"""The actor pool every ct_ray driver runs its workers in (sweeps: sweep/driver.py; feature dashboards: features/).

Each actor is probed (`ready()`) before it gets work, then holds up to `queue_depth` items. Ray restarts a crashed
actor (max_restarts); the pool re-probes it and uses it once it answers, and replaces an actor that is gone for
good. Retries are the pool's, not Ray's (max_task_retries=0): an item in flight when its worker died is re-run
*alone* on an idle worker (a suspect), so an input that kills workers uses up only its own `retries`, never the
others'; past them it is reported to `on_failed`. A pool whose first worker finds no room on the cluster fails after
CT_RAY_RESOURCE_WAIT_S instead of waiting forever.

Subclasses say what the work is: `next_item` (what actor `a` should run next), `call` (submit it), `on_done`,
`on_failed`, `busy` (work outside the queues: buffered rows, a commit), and optionally `tick` (once a loop),
`on_other` (answers of calls of their own kinds), `on_answer` / `on_actor_lost` (every answer / a lost actor).
"""

from __future__ import annotations

import collections
import time

from ..errors import CTRayError, StorageError, one_line
from .capacity import no_room, resource_wait_s

WORK = ("work",)  # kinds the pool counts as work items (subclasses may add theirs)


def _cause(e: BaseException) -> BaseException:
    return getattr(e, "cause", None) or e


class ActorPool:
    work_kinds: tuple = WORK

    def __init__(self, ray, actor_cls, init_arg, *, workers: int, queue_depth: int, retries: int, what: str,
                 label: str | None = None, num_cpus: float = 1.0, num_gpus: float = 0.0, write=print):
        # what: names the workers in errors ('sweep worker cannot start'); label: the run in progress lines
        self.ray, self.actor_cls, self.init_arg, self.what, self.label = ray, actor_cls, init_arg, what, label or what
        self.workers, self.queue_depth, self.retries = workers, queue_depth, retries
        self.num_cpus, self.num_gpus, self.write = num_cpus, num_gpus, write
        self.actors: list[dict] = []
        self.inflight: dict = {}  # ref -> (kind, payload, actor)
        self.suspects: collections.deque = collections.deque()  # (kind, payload) whose worker died while they ran
        self.attempts: collections.Counter = collections.Counter()
        self.n_work = 0  # work items in flight (probes and the subclass's own calls excluded)
        self.restarts = 0

    # --- to be defined by the work ---------------------------------------------------------------------------
    def next_item(self, a) -> tuple | None:
        raise NotImplementedError

    def call(self, a, kind, payload):
        raise NotImplementedError

    def on_done(self, kind, payload, a, out) -> None:
        raise NotImplementedError

    def on_failed(self, kind, payload, e: BaseException) -> None:
        """`payload` killed its worker more than `retries` times."""
        raise NotImplementedError

    def item_id(self, kind, payload):
        return (kind, payload)

    def retry_payload(self, kind, payload):
        return payload

    def busy(self) -> bool:
        return False

    def tick(self) -> None:
        pass

    def on_other(self, kind, payload, a, ref, out, error: BaseException | None) -> None:
        pass

    def on_answer(self, a, out) -> None:
        pass

    def on_actor_lost(self, a, kind, ref) -> None:
        pass

    # --- actors ------------------------------------------------------------------------------------------------
    def probe(self, a) -> None:
        self.inflight[a["h"].ready.remote()] = ("probe", None, a)

    def new_actor(self) -> dict:
        a = {"h": self.actor_cls.remote(self.init_arg), "ready": False, "inflight": 0, "solo": False, "pending": {}}
        self.probe(a)
        return a

    def replace(self, a) -> None:
        if a in self.actors:
            self.actors.remove(a)
            self.kill(a)
            self.restarts += 1
            self.actors.append(self.new_actor())

    def kill(self, a) -> None:
        try:
            self.ray.kill(a["h"])
        except Exception:
            pass

    def submit(self, a, kind, payload, solo: bool = False) -> None:
        ref = self.call(a, kind, payload)
        a["inflight"] += 1
        a["solo"] = solo
        self.n_work += 1
        self.inflight[ref] = (kind, payload, a)

    def fill(self) -> None:
        for a in sorted((a for a in self.actors if a["ready"] and not a["solo"]), key=lambda a: a["inflight"]):
            if self.suspects and a["inflight"] == 0:
                self.submit(a, *self.suspects.popleft(), solo=True)
                continue
            while a["inflight"] < self.queue_depth:
                item = self.next_item(a)
                if item is None:
                    break
                self.submit(a, *item)

    def has_work(self) -> bool:
        """Items queued (the subclass's `next_item` may still hand some out)."""
        return False

    # --- the loop ----------------------------------------------------------------------------------------------
    def run(self, n_actors: int) -> None:
        ray = self.ray
        from ray.exceptions import ActorDiedError, RayActorError

        for _ in range(max(1, min(self.workers, n_actors))):
            self.actors.append(self.new_actor())
        waiting_since = started = time.monotonic()
        try:
            while self.n_work or self.has_work() or self.suspects or self.busy():
                self.fill()
                self.tick()
                if not self.inflight:
                    continue
                ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=5.0)
                if any(a["ready"] for a in self.actors):
                    started = time.monotonic()  # the wait below counts from the last moment no worker was up
                if not ready:
                    if time.monotonic() - started > resource_wait_s():
                        raise no_room(ray, self.what, self.num_cpus, self.num_gpus)  # never pending forever
                    if not any(a["ready"] for a in self.actors) and time.monotonic() - waiting_since > 60:
                        self.write(f"{self.label}: waiting for resources for {len(self.actors)} worker(s) "
                                   f"(num_cpus={self.num_cpus:g}, num_gpus={self.num_gpus:g} each)")
                        waiting_since = time.monotonic()
                    continue
                ref = ready[0]
                kind, payload, a = self.inflight.pop(ref)
                if kind in self.work_kinds:
                    a["inflight"] -= 1
                    a["solo"] = False
                    self.n_work -= 1
                try:
                    out = ray.get(ref)
                except StorageError as e:
                    raise StorageError(one_line(_cause(e))) from None
                except RayActorError as e:
                    self.on_actor_lost(a, kind, ref)
                    if kind not in self.work_kinds and kind != "probe":
                        self.on_other(kind, payload, a, ref, None, e)
                    if isinstance(e, ActorDiedError):  # gone for good (restarts exhausted, node lost): replace it
                        if kind == "probe" and not a["ready"]:
                            self.attempts["__start__"] += 1
                            if self.attempts["__start__"] > self.retries + self.workers:
                                raise CTRayError(f"{self.what} workers keep dying at start: {one_line(e)}") from None
                        self.replace(a)
                    elif a in self.actors and (a["ready"] or kind == "probe"):  # restarting: use it once it answers
                        a["ready"] = False
                        if kind == "probe":
                            time.sleep(0.5)
                        self.probe(a)
                    if kind in self.work_kinds:
                        self._died(kind, payload, e)
                    continue
                self.on_answer(a, out)
                if kind == "probe":
                    if isinstance(out, dict) and out.get("error"):
                        raise CTRayError(f"{self.what} worker cannot start: {out['error']}")
                    a["ready"] = True
                elif kind in self.work_kinds:
                    self.on_done(kind, payload, a, out)
                else:
                    self.on_other(kind, payload, a, ref, out, None)
        finally:
            for a in self.actors:
                self.kill(a)

    def _died(self, kind, payload, e) -> None:
        key = self.item_id(kind, payload)
        self.attempts[key] += 1
        if self.attempts[key] <= self.retries:
            self.suspects.append((kind, self.retry_payload(kind, payload)))
        else:
            self.on_failed(kind, payload, e)
