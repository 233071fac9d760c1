"""The sweep driver's loop: a pool of SweepWorker actors fed prompts and perturbation jobs, commit rounds, and what
happens when an actor dies (its in-flight work is re-queued; a prompt that kills workers is retried alone).

`run_sweep` (runner.py) plans the work and builds the Driver; the Driver only runs it.
"""

from __future__ import annotations

import collections
import datetime as _dt
import logging
import time

from ..errors import one_line
from ..executor.pool import ActorPool
from ..store.schemas import TABLES_SCHEMA_VERSION
from .prompts import PromptItem

log = logging.getLogger(__name__)


def _item_dict(it: PromptItem) -> dict:
    return {"index": it.index, "prompt": it.prompt, "target": it.target, "invalid": it.invalid, "key": it.key}


class Driver(ActorPool):
    """The driver loop of one sweep run on the common actor pool (executor/pool.py): prompts and perturbation jobs
    fed from queues, rows committed in rounds (each worker's buffered rows flushed to data files, then one commit per
    table; see store/commit.py), work a dead worker completed but never reported re-queued."""

    work_kinds = ("prompt", "perturbation")

    def __init__(self, ray, spec, actor_cls, cfg, committer, result, bar, on_event, perturbing: bool):
        res = spec.resources
        super().__init__(ray, actor_cls, cfg, workers=res.workers, queue_depth=res.queue_depth, retries=spec.retries,
                         what="sweep", label=f"sweep {spec.sweep_id}",
                         num_cpus=res.num_cpus, num_gpus=res.num_gpus, write=bar.write)
        self.spec, self.cfg, self.perturbing = spec, cfg, perturbing
        self.committer, self.result, self.bar, self.on_event = committer, result, bar, on_event
        self.attr_q: collections.deque = collections.deque()
        self.pert_q: collections.deque = collections.deque()  # (item, nodes, holder actor or None)
        self.flushing: set = set()  # flush refs of the current round
        self.last_commit = time.monotonic()
        self.status: dict = {}  # key -> 'ok' | 'error' of prompts done in this run (for the counts)

    # --- the work ----------------------------------------------------------------------------------------
    def call(self, a, kind, payload):
        if kind == "prompt":
            return a["h"].run_prompt.remote(_item_dict(payload))
        it, nodes, _ = payload
        return a["h"].run_perturbation.remote(_item_dict(it), nodes)

    def next_item(self, a):
        mine = next((j for j in self.pert_q if j[2] is a), None)  # a graph this actor holds
        # another worker may take a perturbation job only once its graph is committed: the job's rows must never
        # outlive a lost graphs row (see Committer.add)
        free = next((j for j in self.pert_q if j[2] is None or j[0].key in self.committer.keys), None)
        if mine is not None:
            self.pert_q.remove(mine)
            return "perturbation", mine
        if self.attr_q:
            return "prompt", self.attr_q.popleft()
        if free is not None:
            self.pert_q.remove(free)
            return "perturbation", free  # steal: the worker recomputes the graph
        return None

    def has_work(self) -> bool:
        return bool(self.attr_q or self.pert_q)

    def busy(self) -> bool:
        return bool(self.flushing or self.committer.pending or any(a["pending"] for a in self.actors))

    def tick(self) -> None:
        self.maybe_commit(final=not (self.n_work or self.attr_q or self.pert_q or self.suspects))

    def item_id(self, kind, payload):
        return kind, (payload if kind == "prompt" else payload[0]).key

    def retry_payload(self, kind, payload):
        return payload if kind == "prompt" else (payload[0], payload[1], None)

    def on_answer(self, a, out) -> None:
        self._lose(a, out.get("instance"))  # a silent restart since the last answer lost the buffer

    def on_actor_lost(self, a, kind, ref) -> None:
        self._lose(a)  # its buffer died with it

    def on_other(self, kind, payload, a, ref, out, error) -> None:
        if kind == "flush":
            self.flushing.discard(ref)
            if out is not None:
                self._flushed(a, payload, out)
            if not self.flushing:
                self._commit()

    def on_failed(self, kind, payload, e) -> None:
        it = payload if kind == "prompt" else payload[0]
        if kind == "prompt":
            self.record_error(it, "worker", f"the worker died {self.attempts[(kind, it.key)]} time(s) running this "
                                            f"prompt: {one_line(e)}")
        else:
            self.bar.write(f"sweep {self.spec.sweep_id}: perturbation job of prompt {it.index} lost: {one_line(e)}")

    def replace(self, a) -> None:
        if a in self.actors:
            self.result.worker_restarts += 1
        super().replace(a)

    def run(self, todo, pert_todo):
        self.attr_q.extend(todo)
        self.pert_q.extend((it, None, None) for it in pert_todo)
        try:
            super().run(len(todo) + len(pert_todo))
        finally:
            self.bar.close()

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
        c = self.spec.commit
        waiting = sum(len(a["pending"]) for a in self.actors) + self.committer.driver_rows.pending
        held = sum(a.get("buffered", 0) for a in self.actors if a["pending"])
        due = (held >= c.every_mb * 2**20 or (c.every_prompts is not None and waiting >= c.every_prompts)
               or time.monotonic() - self.last_commit >= c.every_seconds or final)
        if not waiting or not due:
            return
        for a in self.actors:
            a["buffered"] = 0
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

    def on_done(self, kind, payload, a, out):
        result, bar = self.result, self.bar
        a["buffered"] = out.get("buffered_bytes", a.get("buffered", 0))
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
