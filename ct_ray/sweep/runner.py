"""The sweep driver: plan the keys, skip committed ones, fan prompts and perturbation jobs out to an actor pool.

The driver only moves small things (prompts, keys, summaries, data-file records); workers load the model and the CLT
once, buffer their rows and write them as data files straight to storage; the driver commits those files in rounds
(store/commit.py). Worker deaths are absorbed (actor restarts; what a dead worker had not reported is re-run); a
prompt whose worker keeps dying becomes an error row. A storage failure stops the sweep with one clear error; since
only commits make rows visible, a re-run then finishes only what is missing.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from dataclasses import asdict, dataclass, field

from ..errors import StorageError
from ..executor import ensure_ray, worker_env
from ..specs import SweepSpec
from ..store.commit import Committer, recover
from ..store.lease import SweepLease
from ..store.tables import SWEEPS_DIR, Store
from .driver import Driver
from .perturbation import resolve
from .prompts import read_prompts
from .worker import SweepWorker, worker_config

log = logging.getLogger(__name__)

# permanent failures: re-running cannot change them (bad prompt, bad input); others are retried by a re-run
PERMANENT_ERRORS = ("prompt", "input")


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


def check_plan(store: Store, spec: SweepSpec, new_plan: bool = False) -> None:
    """Refuse a spec whose model, CLT or parameters differ from the plan that committed the sweep's rows: its keys
    would differ, and the sweep would silently hold graphs of two setups. `new_plan`: remove the sweep's committed rows
    (every table, analysis tables included) so the new plan starts from nothing."""
    import json

    from ..errors import CTRayError
    from ..store.commit import commit_files, live_files
    from ..store.schemas import ANALYSIS_TABLES, PARTITIONS, SWEEP_TABLES

    sid = spec.sweep_id
    old = store.read_json(f"{SWEEPS_DIR}/{sid}/plan.json")
    if not old:
        return
    mine = {"model": spec.model, "clt": spec.clt_id(), "params": spec.params()}
    norm = lambda v: json.dumps(v, sort_keys=True, default=str)  # noqa: E731
    changed = [k for k in mine if norm(old.get(k)) != norm(mine[k])]
    if not changed or not store.committed(sid).num_rows:
        return  # the same plan, or nothing committed under the old one
    if not new_plan:
        what = "; ".join(f"{k} {old.get(k)!s:.60} -> {mine[k]!s:.60}" for k in changed if k != "params")
        raise CTRayError(f"sweep {sid!r} already holds graphs of another plan ({what or 'attribution/pruning params'}"
                         f"{' and params' if what and 'params' in changed else ''} differ): give a new sweep_id, or "
                         f"--new-plan to remove its committed rows and start over")
    # graphs first: rows of keys without a graphs row are invisible to every reader, and recover() removes them
    for name in ("graphs", *[t for t in SWEEP_TABLES if t != "graphs"],
                 *[t for t in ANALYSIS_TABLES if PARTITIONS[t] == "sweep_id"]):
        files = live_files(store, name, sid)
        if files:
            commit_files(store, name, [], {"ct-ray.sweep": sid, "ct-ray.new-plan": "1"}, delete=files)
    log.warning("sweep %s: committed rows of the previous plan removed (--new-plan)", sid)


def run_sweep(spec: SweepSpec, *, address: str | None = None, progress: bool = False, retry_errors: bool = False,
              on_event=None, ray_init_kwargs: dict | None = None, new_plan: bool = False,
              lease_wait_s: float = 0.0) -> SweepResult:
    """Run (or finish) a sweep. Keys already committed in storage are skipped; error rows of transient kinds
    ('internal', 'worker') are retried, permanent ones ('prompt', 'input') only with `retry_errors`.

    `on_event(kind, summary)` is called on the driver for each finished task (kind 'prompt' or 'perturbation')
    and each commit round (kind 'commit'), e.g. for tests that inject faults. A spec whose model, CLT or parameters
    differ from the plan of the sweep's committed rows is refused (`check_plan`) unless `new_plan`. One driver runs a
    sweep at a time (store/lease.py): another one's live lease is waited for up to `lease_wait_s`, then refused."""
    t0 = time.perf_counter()
    store = spec.storage.store()
    store.check_writable()
    lease = SweepLease(store, spec.sweep_id).acquire(lease_wait_s)
    try:
        return _run_sweep(spec, store, lease, t0, address=address, progress=progress, retry_errors=retry_errors,
                          on_event=on_event, ray_init_kwargs=ray_init_kwargs, new_plan=new_plan)
    finally:
        lease.release()


def _run_sweep(spec: SweepSpec, store: Store, lease: SweepLease, t0: float, *, address, progress, retry_errors,
               on_event, ray_init_kwargs, new_plan) -> SweepResult:
    sid = spec.sweep_id
    check_plan(store, spec, new_plan)
    items, dups = read_prompts(spec)
    perturb_fn, perturb_skip = resolve(spec.perturbation)
    plan_hash = spec.perturbation.plan_hash()
    store.write_json(f"{SWEEPS_DIR}/{sid}/plan.json", {
        "sweep_id": sid, "model": spec.model, "clt": spec.clt_id(), "params": spec.params(),
        "perturbation": spec.perturbation.model_dump(), "perturbation_active": perturb_fn is not None,
        "n_prompts": len(items), "duplicates": dups, "updated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "spec": spec.model_dump(mode="json", exclude={"prompts"}), "keys": [it.key for it in items]})

    # --- what is left: one scan of the committed keys (after removing rows of a round that never committed) ------
    g = store.existing_table("graphs")
    seen = g.metadata.current_snapshot_id if g is not None else None  # what the scan below sees, at least
    done = store.committed(sid)
    committed_keys = set(done.column("key").to_pylist())
    recover(store, sid, {sid: {k for k, s in zip(done.column("key").to_pylist(), done.column("status").to_pylist())
                               if s == "ok"}})
    state = {k: (s, ek) for k, s, ek in zip(*(done.column(c).to_pylist() for c in ("key", "status", "error_kind")))}
    todo, ok_keys = [], []
    for it in items:
        st = state.get(it.key)
        if st is None or (st[0] != "ok" and (retry_errors or st[1] not in PERMANENT_ERRORS)):
            todo.append(it)
        elif st[0] == "ok":
            ok_keys.append(it.key)
    perturbed = set()
    if perturb_fn is not None:
        p = store.read("perturbations", sid, columns=["key", "plan"])
        perturbed = {k for k, h in zip(p.column("key").to_pylist(), p.column("plan").to_pylist()) if h == plan_hash}
    by_key = {it.key: it for it in items}
    pert_todo = [by_key[k] for k in ok_keys if k not in perturbed] if perturb_fn is not None else []
    result = SweepResult(sid, store.url, len(items), dups, len(items) - len(todo),
                         perturbation_skipped="" if perturb_fn is not None else perturb_skip)
    if not spec.perturbation.empty and perturb_fn is None:
        log.warning("sweep %s: perturbations skipped: %s", sid, perturb_skip)
    if not todo and not pert_todo:
        result.seconds = time.perf_counter() - t0
        _write_run(store, sid, result)
        return result

    ray = ensure_ray(address, **(ray_init_kwargs or {}))
    res = spec.resources
    device = "cuda" if res.num_gpus > 0 else "cpu"
    env = worker_env(ray, res.forward_aws_env)
    # Retries are the driver's (max_task_retries=0): a prompt in flight when its worker died is re-queued as a
    # *suspect* and re-run alone on an idle worker, so a prompt that kills its worker uses up only its own retries.
    actor_cls = ray.remote(SweepWorker).options(
        num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_restarts=res.max_restarts, max_task_retries=0,
        runtime_env={"env_vars": env} if env else None, scheduling_strategy="SPREAD" if res.spread else "DEFAULT")
    retried = {it.key for it in todo if it.key in state}
    committer = Committer(store, sid, committed_keys - retried, perturbed, retried, lease=lease, graphs_snapshot=seen,
                          keep_snapshots=spec.commit.keep_snapshots)
    # prompts run in key order: a round's keys are then a narrow slice of the key space, so each data file's key
    # statistics let a point read (explorer, export) skip every other file (keys are hashes: the order is random)
    todo.sort(key=lambda it: it.key)
    driver = Driver(ray, spec, actor_cls, worker_config(spec, store, device), committer, result,
                     _Progress(progress, len(items), result.skipped, sid), on_event, perturb_fn is not None)
    driver.run(todo, pert_todo)
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
