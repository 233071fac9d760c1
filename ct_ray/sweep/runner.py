"""The sweep driver: plan the keys, skip committed ones, fan prompts and perturbation jobs out to an actor pool.

The driver only moves small things (prompts, keys, summaries); workers load the model and the CLT once and write
their rows straight to storage. Worker deaths are absorbed by Ray (actor restarts + method retries); a prompt
whose worker keeps dying becomes an error row. A storage failure stops the sweep with one clear error; since every
file is committed atomically, a re-run then finishes only what is missing.
"""

from __future__ import annotations

import collections
import datetime as _dt
import logging
import os
import time
from dataclasses import asdict, dataclass, field

from ..errors import CTRayError, StorageError
from ..store.tables import SWEEPS_DIR, Store
from .perturbation import resolve
from .prompts import PromptItem, read_prompts
from .spec import SweepSpec
from .worker import SweepWorker, worker_config

log = logging.getLogger(__name__)

# permanent failures: re-running cannot change them (bad prompt, bad input); others are retried by a re-run
PERMANENT_ERRORS = ("prompt", "input")
_FORWARD_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
                "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")
_OTHER_ENV = ("HF_HUB_OFFLINE", "CT_RAY_CACHE", "HF_HOME", "TOKENIZERS_PARALLELISM", "CT_RAY_FAULT_CRASH_PROMPT")


@dataclass
class SweepResult:
    sweep_id: str
    store: str
    n_prompts: int  # distinct prompts (keys) in the input
    duplicates: int  # input prompts dropped as duplicates of an earlier one
    skipped: int  # keys already committed before this run
    ok: int = 0  # prompts attributed in this run
    failed: int = 0  # error rows written in this run
    perturbed: int = 0  # perturbation jobs written in this run
    perturbation_skipped: str = ""  # why perturbations were not run
    seconds: float = 0.0
    worker_restarts: int = 0
    errors: list = field(default_factory=list)  # (prompt_index, kind, message) of this run's error rows

    def as_dict(self) -> dict:
        return asdict(self)


def _item_dict(it: PromptItem) -> dict:
    return {"index": it.index, "prompt": it.prompt, "target": it.target, "invalid": it.invalid, "key": it.key}


def _cause(e: BaseException) -> BaseException:
    return getattr(e, "cause", None) or e


def _one_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:500] if s else type(e).__name__


def _ensure_ray(address: str | None, init_kwargs: dict | None):
    import ray

    if ray.is_initialized():
        return ray
    kw = dict(init_kwargs or {})
    kw.setdefault("log_to_driver", False)
    if address in (None, "local"):  # a fresh local Ray: never attach to someone else's by accident
        address = "local"
        kw.setdefault("include_dashboard", False)
    try:
        ray.init(address=address, **kw)
    except Exception as e:
        raise CTRayError(f"cannot start or reach Ray at {address}: {_one_line(e)}") from e
    return ray


class _Progress:
    def __init__(self, enabled: bool, total: int, initial: int, sweep_id: str):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=f"sweep {sweep_id}", unit="prompt", dynamic_ncols=True)
        self.ok = self.failed = self.pert = 0

    def update(self, n=1):
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(ok=self.ok, failed=self.failed, perturbed=self.pert, refresh=False)

    def write(self, msg: str):
        if self.bar is not None:
            self.bar.write(msg)
        else:
            log.warning(msg)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run_sweep(spec: SweepSpec, *, address: str | None = None, progress: bool = False, retry_errors: bool = False,
              on_event=None, ray_init_kwargs: dict | None = None) -> SweepResult:
    """Run (or finish) a sweep. Keys already committed in storage are skipped; error rows of transient kinds
    ('internal', 'worker') are retried, permanent ones ('prompt', 'input') only with `retry_errors`.

    `on_event(kind, summary)` is called on the driver for each finished task (kind 'prompt' or 'perturbation'),
    e.g. for tests that inject faults."""
    t0 = time.perf_counter()
    sid = spec.sweep_id
    store = Store(spec.storage.url, **spec.storage.storage_options())
    store.check_writable()
    items, dups = read_prompts(spec)
    by_key = {it.key: it for it in items}
    store.cleanup_tmp(sid)
    perturb_fn, perturb_skip = resolve(spec.perturbation)
    plan_hash = spec.perturbation.plan_hash()
    store.write_json(f"{SWEEPS_DIR}/{sid}/plan.json", {
        "sweep_id": sid, "model": spec.model, "clt": spec.clt_id(), "params": spec.params(),
        "perturbation": spec.perturbation.model_dump(), "perturbation_active": perturb_fn is not None,
        "n_prompts": len(items), "duplicates": dups, "updated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "spec": spec.model_dump(mode="json", exclude={"prompts"}), "keys": [it.key for it in items]})

    # --- what is left ----------------------------------------------------------------------------------
    done = store.read("graphs", sid, columns=["key", "status", "error_kind"])
    state = {k: (s, ek) for k, s, ek in zip(*(done.column(c).to_pylist() for c in ("key", "status", "error_kind")))}
    todo, ok_keys = [], []
    for it in items:
        st = state.get(it.key)
        if st is None or (st[0] != "ok" and (retry_errors or st[1] not in PERMANENT_ERRORS)):
            todo.append(it)
        elif st[0] == "ok":
            ok_keys.append(it.key)
    pert_todo = []
    if perturb_fn is not None:
        have = set(store.list_names("perturbations", sid))
        pert_todo = [by_key[k] for k in ok_keys if f"{k}.{plan_hash}" not in have]
    result = SweepResult(sid, store.url, len(items), dups, len(items) - len(todo),
                         perturbation_skipped="" if perturb_fn is not None else perturb_skip)
    if not spec.perturbation.empty and perturb_fn is None:
        log.warning("sweep %s: perturbations skipped: %s", sid, perturb_skip)
    if not todo and not pert_todo:
        result.seconds = time.perf_counter() - t0
        _write_run(store, sid, result)
        return result

    ray = _ensure_ray(address, ray_init_kwargs)
    from ray.exceptions import ActorDiedError, RayActorError

    res = spec.resources
    device = "cuda" if res.num_gpus > 0 else "cpu"
    cfg = worker_config(spec, store, device)
    env = {k: os.environ[k] for k in _OTHER_ENV if k in os.environ}
    if res.forward_aws_env:
        env.update({k: os.environ[k] for k in _FORWARD_ENV if k in os.environ})
    # Retries are the driver's (max_task_retries=0): a prompt in flight when its worker died is re-queued as a
    # *suspect* and re-run alone on an idle worker, so a prompt that kills its worker uses up only its own retries.
    actor_cls = ray.remote(SweepWorker).options(
        num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_restarts=res.max_restarts, max_task_retries=0,
        runtime_env={"env_vars": env} if env else None, scheduling_strategy="SPREAD" if res.spread else "DEFAULT")

    n_workers = max(1, min(res.workers, len(todo) + len(pert_todo)))
    actors: list[dict] = []
    inflight: dict = {}  # ref -> (kind, payload, actor); kind: 'prompt' | 'perturbation' | 'probe'
    attr_q = collections.deque(todo)
    pert_q: collections.deque = collections.deque((it, None, None) for it in pert_todo)  # (item, nodes, holder)
    suspects: collections.deque = collections.deque()  # (kind, payload) whose worker died while they ran
    attempts: collections.Counter = collections.Counter()
    bar = _Progress(progress, len(items), result.skipped, sid)
    waiting_since = time.monotonic()
    n_work = 0  # work items in flight (probes excluded)

    def probe(a):
        inflight[a["h"].ready.remote()] = ("probe", None, a)

    def new_actor():
        a = {"h": actor_cls.remote(cfg), "ready": False, "inflight": 0, "solo": False}
        probe(a)
        return a

    for _ in range(n_workers):
        actors.append(new_actor())

    def submit(a, kind, payload, solo=False):
        nonlocal n_work
        if kind == "prompt":
            ref = a["h"].run_prompt.remote(_item_dict(payload))
        else:
            it, nodes, _ = payload
            ref = a["h"].run_perturbation.remote(_item_dict(it), nodes)
        a["inflight"] += 1
        a["solo"] = solo
        n_work += 1
        inflight[ref] = (kind, payload, a)

    def fill():
        for a in sorted((a for a in actors if a["ready"] and not a["solo"]), key=lambda a: a["inflight"]):
            if suspects and a["inflight"] == 0:
                submit(a, *suspects.popleft(), solo=True)
                continue
            while a["inflight"] < res.queue_depth and (attr_q or pert_q):
                mine = next((j for j in pert_q if j[2] is a), None)  # a graph this actor holds
                if mine is not None:
                    pert_q.remove(mine)
                    submit(a, "perturbation", mine)
                elif attr_q:
                    submit(a, "prompt", attr_q.popleft())
                else:
                    submit(a, "perturbation", pert_q.popleft())  # steal: the worker recomputes the graph

    def replace(a):
        if a in actors:
            actors.remove(a)
            try:
                ray.kill(a["h"])
            except Exception:
                pass
            result.worker_restarts += 1
            actors.append(new_actor())

    def record_error(it: PromptItem, kind: str, msg: str):
        """A prompt whose worker kept dying: the driver writes its error row (small)."""
        import pyarrow as pa

        from ..store.tables import TABLES_SCHEMA_VERSION

        row = {"key": it.key, "prompt_index": it.index, "prompt": it.prompt, "target": it.target, "status": "error",
               "error_kind": kind, "error": msg, "model": spec.model, "clt": spec.clt_id(), "graph_rows": spec.graph_rows,
               "worker": "driver", "created_at": _dt.datetime.now(_dt.timezone.utc),
               "schema_version": TABLES_SCHEMA_VERSION}
        store.write_table("graphs", sid, it.key, pa.Table.from_pylist([row]))
        result.failed += 1
        result.errors.append((it.index, kind, msg))
        bar.failed += 1
        bar.update()

    try:
        while n_work or attr_q or pert_q or suspects:
            fill()
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=5.0)
            if not ready:
                if not any(a["ready"] for a in actors) and time.monotonic() - waiting_since > 60:
                    bar.write(f"sweep {sid}: waiting for resources for {len(actors)} worker(s) "
                              f"(num_cpus={res.num_cpus}, num_gpus={res.num_gpus} each)")
                    waiting_since = time.monotonic()
                continue
            ref = ready[0]
            kind, payload, a = inflight.pop(ref)
            if kind != "probe":
                a["inflight"] -= 1
                a["solo"] = False
                n_work -= 1
            try:
                out = ray.get(ref)
            except StorageError as e:
                raise StorageError(_one_line(_cause(e))) from None
            except RayActorError as e:
                if isinstance(e, ActorDiedError):  # gone for good (restarts exhausted, node lost): replace it
                    if kind == "probe" and not a["ready"]:
                        attempts["__start__"] += 1
                        if attempts["__start__"] > spec.retries + res.workers:
                            raise CTRayError(f"sweep workers keep dying at start: {_one_line(e)}") from None
                    replace(a)
                elif a in actors and (a["ready"] or kind == "probe"):  # restarting: use it again once it answers
                    a["ready"] = False
                    if kind == "probe":
                        time.sleep(0.5)
                    probe(a)
                if kind == "probe":
                    continue
                it = payload if kind == "prompt" else payload[0]
                attempts[(kind, it.key)] += 1
                if attempts[(kind, it.key)] <= spec.retries:
                    suspects.append((kind, payload if kind == "prompt" else (it, payload[1], None)))
                elif kind == "prompt":
                    record_error(it, "worker", f"the worker died {attempts[(kind, it.key)]} time(s) running this "
                                               f"prompt: {_one_line(e)}")
                else:
                    bar.write(f"sweep {sid}: perturbation job of prompt {it.index} lost: {_one_line(e)}")
                continue
            if kind == "probe":
                if out.get("error"):
                    raise CTRayError(f"sweep worker cannot start: {out['error']}")
                a["ready"] = True
                continue
            if kind == "prompt":
                it = payload
                if out["status"] == "ok":
                    result.ok += 1
                    bar.ok += 1
                    if perturb_fn is not None:
                        pert_q.append((it, out["perturb_nodes"], a))
                else:
                    result.failed += 1
                    bar.failed += 1
                    result.errors.append((it.index, out["error_kind"], out["error"]))
                bar.update()
            else:
                result.perturbed += 1
                bar.pert += 1
                bar.update(0)
            if on_event is not None:
                on_event(kind, out)
    except BaseException:
        for a in actors:
            try:
                ray.kill(a["h"])
            except Exception:
                pass
        raise
    finally:
        bar.close()
    for a in actors:
        try:
            ray.kill(a["h"])
        except Exception:
            pass
    result.seconds = time.perf_counter() - t0
    _write_run(store, sid, result)
    return result


def _write_run(store: Store, sid: str, result: SweepResult) -> None:
    d = result.as_dict()
    d["errors"] = d["errors"][:100]
    d["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
    try:
        store.write_json(f"{SWEEPS_DIR}/{sid}/last_run.json", d)
    except StorageError as e:  # the rows are committed; the run log is a convenience
        log.warning("could not write the run log: %s", e)
