"""The sweep driver's loop: a pool of SweepWorker actors fed prompts and perturbation jobs, commit rounds, and what
happens when an actor dies (its in-flight work is re-queued; a prompt that kills workers is retried alone).

`run_sweep` (runner.py) plans the work and builds the Driver; the Driver only runs it.
"""

from __future__ import annotations

import collections
import datetime as _dt
import logging
import time

from ..errors import CTRayError, StorageError, one_line
from ..executor.capacity import no_room, resource_wait_s
from ..store.schemas import TABLES_SCHEMA_VERSION
from .prompts import PromptItem

log = logging.getLogger(__name__)


def _item_dict(it: PromptItem) -> dict:
    return {"index": it.index, "prompt": it.prompt, "target": it.target, "invalid": it.invalid, "key": it.key}


def _cause(e: BaseException) -> BaseException:
    return getattr(e, "cause", None) or e


class Driver:
    """The driver loop of one sweep run: an actor pool fed from queues, worker deaths absorbed, rows committed in
    rounds (each worker's buffered rows flushed to data files, then one commit per table; see store/commit.py)."""

    def __init__(self, ray, spec, actor_cls, cfg, committer, result, bar, on_event, perturbing: bool):
        self.ray, self.spec, self.actor_cls, self.cfg, self.perturbing = ray, spec, actor_cls, cfg, perturbing
        self.committer, self.result, self.bar, self.on_event = committer, result, bar, on_event
        self.res = spec.resources
        self.actors: list[dict] = []
        self.inflight: dict = {}  # ref -> (kind, payload, actor); kind: prompt | perturbation | probe | flush
        self.attr_q: collections.deque = collections.deque()
        self.pert_q: collections.deque = collections.deque()  # (item, nodes, holder actor or None)
        self.suspects: collections.deque = collections.deque()  # (kind, payload) whose worker died while they ran
        self.attempts: collections.Counter = collections.Counter()
        self.n_work = 0  # work items in flight (probes and flushes excluded)
        self.flushing: set = set()  # flush refs of the current round
        self.last_commit = time.monotonic()
        self.status: dict = {}  # key -> 'ok' | 'error' of prompts done in this run (for the counts)

    # --- actors ------------------------------------------------------------------------------------------
    def probe(self, a):
        self.inflight[a["h"].ready.remote()] = ("probe", None, a)

    def new_actor(self):
        a = {"h": self.actor_cls.remote(self.cfg), "ready": False, "inflight": 0, "solo": False, "pending": {}}
        self.probe(a)
        return a

    def replace(self, a):
        if a in self.actors:
            self.actors.remove(a)
            self._kill(a)
            self.result.worker_restarts += 1
            self.actors.append(self.new_actor())

    def _kill(self, a):
        try:
            self.ray.kill(a["h"])
        except Exception:
            pass

    def submit(self, a, kind, payload, solo=False):
        if kind == "prompt":
            ref = a["h"].run_prompt.remote(_item_dict(payload))
        else:
            it, nodes, _ = payload
            ref = a["h"].run_perturbation.remote(_item_dict(it), nodes)
        a["inflight"] += 1
        a["solo"] = solo
        self.n_work += 1
        self.inflight[ref] = (kind, payload, a)

    def fill(self):
        for a in sorted((a for a in self.actors if a["ready"] and not a["solo"]), key=lambda a: a["inflight"]):
            if self.suspects and a["inflight"] == 0:
                self.submit(a, *self.suspects.popleft(), solo=True)
                continue
            while a["inflight"] < self.res.queue_depth and (self.attr_q or self.pert_q):
                mine = next((j for j in self.pert_q if j[2] is a), None)  # a graph this actor holds
                # another worker may take a perturbation job only once its graph is committed: the job's rows must
                # never outlive a lost graphs row (see Committer.add)
                free = next((j for j in self.pert_q if j[2] is None or j[0].key in self.committer.keys), None)
                if mine is not None:
                    self.pert_q.remove(mine)
                    self.submit(a, "perturbation", mine)
                elif self.attr_q:
                    self.submit(a, "prompt", self.attr_q.popleft())
                elif free is not None and (free[2] is None or free[0].key in self.committer.keys):
                    self.pert_q.remove(free)
                    self.submit(a, "perturbation", free)  # steal: the worker recomputes the graph
                else:
                    break

    # --- completed-but-uncommitted work: lost with its worker, re-queued ----------------------------------
    def _lose(self, a, instance: str | None = None):
        """Re-queue what `a` completed but never reported (all of it, or that of instances other than `instance`)."""
        lost = [k for k, (_, _, inst) in a["pending"].items() if instance is None or inst != instance]
        for k in lost:
            self._requeue(*a["pending"].pop(k)[:2])
        if lost and instance is None:  # jobs waiting for this actor's graphs: recomputed elsewhere, or re-made
            held = [j for j in self.pert_q if j[2] is a]
            for j in held:
                self.pert_q.remove(j)
                if j[0].key in self.committer.keys:
                    self.pert_q.append((j[0], None, None))

    def _requeue(self, kind, payload):
        """Undo the counts of work whose rows were lost or refused, and queue it again unless it is committed."""
        it = payload if kind == "prompt" else payload[0]
        if kind == "prompt":
            if self.status.pop(it.key, None) == "ok":
                self.result.ok -= 1
                self.bar.ok -= 1
            else:
                self.result.failed -= 1
                self.bar.failed -= 1
                self.result.errors = [e for e in self.result.errors if e[0] != it.index]
            self.bar.update(-1)
            if it.key not in self.committer.keys:
                self.attr_q.appendleft(it)
        else:
            self.result.perturbed -= 1
            self.bar.pert -= 1
            if it.key in self.committer.keys and it.key not in self.committer.perturbed:
                self.pert_q.append((it, None, None))
            # else: its prompt was lost too and is re-queued; its job comes back when that prompt is done again

    # --- commit rounds -----------------------------------------------------------------------------------
    def maybe_commit(self, final: bool = False):
        if self.flushing:
            return
        waiting = sum(len(a["pending"]) for a in self.actors) + self.committer.driver_rows.pending
        due = (waiting >= self.spec.commit.every_prompts
               or time.monotonic() - self.last_commit >= self.spec.commit.every_seconds or final)
        if not waiting or not due:
            return
        for a in self.actors:
            if a["pending"]:
                ref = a["h"].flush.remote()
                self.inflight[ref] = ("flush", set(a["pending"]), a)
                self.flushing.add(ref)
        if not self.flushing:
            self._commit()

    def _flushed(self, a, asked: set, out: dict):
        reported = set(out["prompts"]) | {("p", k) for k in out["perturbations"]}
        entries = {k: a["pending"].pop(k) for k in list(a["pending"]) if k in reported}
        if not self.committer.add(out):  # would duplicate a key's rows: never commit it, re-run its keys
            for kind, payload, _ in entries.values():
                self._requeue(kind, payload)
        for k in asked - reported:  # completed before the flush, yet not in it: the buffer was lost
            if k in a["pending"]:
                self._requeue(*a["pending"].pop(k)[:2])

    def _commit(self):
        counts = self.committer.commit()
        self.last_commit = time.monotonic()
        if self.on_event is not None and (counts["prompts"] or counts["perturbations"]):
            self.on_event("commit", counts)

    # --- the loop ----------------------------------------------------------------------------------------
    def run(self, todo, pert_todo):
        ray, res, spec = self.ray, self.res, self.spec
        from ray.exceptions import ActorDiedError, RayActorError

        self.attr_q.extend(todo)
        self.pert_q.extend((it, None, None) for it in pert_todo)
        for _ in range(max(1, min(res.workers, len(todo) + len(pert_todo)))):
            self.actors.append(self.new_actor())
        waiting_since = started = time.monotonic()
        try:
            while (self.n_work or self.attr_q or self.pert_q or self.suspects or self.flushing
                   or self.committer.pending or any(a["pending"] for a in self.actors)):
                self.fill()
                self.maybe_commit(final=not (self.n_work or self.attr_q or self.pert_q or self.suspects))
                if not self.inflight:
                    continue
                ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=5.0)
                if any(a["ready"] for a in self.actors):
                    started = time.monotonic()  # the wait below counts from the last moment no worker was up
                if not ready:
                    if time.monotonic() - started > resource_wait_s():
                        raise no_room(ray, "sweep", res.num_cpus, res.num_gpus)  # never pending forever
                    if not any(a["ready"] for a in self.actors) and time.monotonic() - waiting_since > 60:
                        self.bar.write(f"sweep {spec.sweep_id}: waiting for resources for {len(self.actors)} worker(s) "
                                       f"(num_cpus={res.num_cpus}, num_gpus={res.num_gpus} each)")
                        waiting_since = time.monotonic()
                    continue
                ref = ready[0]
                kind, payload, a = self.inflight.pop(ref)
                if kind in ("prompt", "perturbation"):
                    a["inflight"] -= 1
                    a["solo"] = False
                    self.n_work -= 1
                try:
                    out = ray.get(ref)
                except StorageError as e:
                    raise StorageError(one_line(_cause(e))) from None
                except RayActorError as e:
                    self._lose(a)  # its buffer died with it
                    if kind == "flush":
                        self.flushing.discard(ref)
                        if not self.flushing:
                            self._commit()
                    if isinstance(e, ActorDiedError):  # gone for good (restarts exhausted, node lost): replace it
                        if kind == "probe" and not a["ready"]:
                            self.attempts["__start__"] += 1
                            if self.attempts["__start__"] > spec.retries + res.workers:
                                raise CTRayError(f"sweep workers keep dying at start: {one_line(e)}") from None
                        self.replace(a)
                    elif a in self.actors and (a["ready"] or kind == "probe"):  # restarting: use it once it answers
                        a["ready"] = False
                        if kind == "probe":
                            time.sleep(0.5)
                        self.probe(a)
                    if kind in ("probe", "flush"):
                        continue
                    self._died(kind, payload, e)
                    continue
                self._lose(a, out.get("instance"))  # a silent restart since the last answer lost the buffer
                if kind == "probe":
                    if out.get("error"):
                        raise CTRayError(f"sweep worker cannot start: {out['error']}")
                    a["ready"] = True
                elif kind == "flush":
                    self.flushing.discard(ref)
                    self._flushed(a, payload, out)
                    if not self.flushing:
                        self._commit()
                else:
                    self._done(kind, payload, a, out)
        except BaseException:
            for a in self.actors:
                self._kill(a)
            raise
        finally:
            self.bar.close()
        for a in self.actors:
            self._kill(a)

    def _done(self, kind, payload, a, out):
        result, bar = self.result, self.bar
        if kind == "prompt":
            it = payload
            a["pending"][it.key] = ("prompt", it, out["instance"])
            self.status[it.key] = out["status"]
            if out["status"] == "ok":
                result.ok += 1
                bar.ok += 1
                if self.perturbing:
                    self.pert_q.append((it, out["perturb_nodes"], a))
            else:
                result.failed += 1
                bar.failed += 1
                result.errors.append((it.index, out["error_kind"], out["error"]))
            bar.update()
        else:
            if out["status"] != "skipped":
                a["pending"][("p", payload[0].key)] = ("perturbation", payload, out["instance"])
            result.perturbed += 1
            bar.pert += 1
            bar.update(0)
        if self.on_event is not None:
            self.on_event(kind, out)

    def _died(self, kind, payload, e):
        it = payload if kind == "prompt" else payload[0]
        self.attempts[(kind, it.key)] += 1
        if self.attempts[(kind, it.key)] <= self.spec.retries:
            self.suspects.append((kind, payload if kind == "prompt" else (it, payload[1], None)))
        elif kind == "prompt":
            self.record_error(it, "worker", f"the worker died {self.attempts[(kind, it.key)]} time(s) running this "
                                            f"prompt: {one_line(e)}")
        else:
            self.bar.write(f"sweep {self.spec.sweep_id}: perturbation job of prompt {it.index} lost: {one_line(e)}")

    def record_error(self, it: PromptItem, kind: str, msg: str):
        """A prompt whose worker kept dying: the driver writes its error row (small) into the next round."""
        spec = self.spec
        row = {"key": it.key, "prompt_index": it.index, "prompt": it.prompt, "target": it.target, "status": "error",
               "error_kind": kind, "error": msg, "model": spec.model, "clt": spec.clt_id(), "params": self.cfg["params"],
               "graph_rows": spec.graph_rows, "worker": "driver", "created_at": _dt.datetime.now(_dt.timezone.utc),
               "schema_version": TABLES_SCHEMA_VERSION}
        self.committer.add_driver_row(it.key, row)
        self.status[it.key] = "error"
        self.result.failed += 1
        self.result.errors.append((it.index, kind, msg))
        self.bar.failed += 1
        self.bar.update()
