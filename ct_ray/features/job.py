"""`ct-ray features`: feature dashboards of a CLT (density, mean activation, top contexts, quantile samples).

    corpus -> contexts (driver: token ids only) -> chunks -> actor pool (model + CLT loaded once per actor)
           -> small per-chunk states (top-k windows, reservoir) merged on the driver in chunk order
           -> one Parquet file per layer under features/clt_id={cid}/, then _features/{cid}/job.json (commit)

The job key hashes everything that changes the rows; a re-run of a committed job returns without starting Ray.
"""

from __future__ import annotations

import collections
import datetime as _dt
import hashlib
import logging
import os
import re

import numpy as np
import pyarrow as pa

from ..errors import CTRayError, one_line
from ..executor.pool import ActorPool
from ..specs import FeaturesSpec, load_yaml, parse
from ..store.commit import replace_partition
from ..store.fs import worker_locations
from ..store.schemas import TABLES_SCHEMA_VERSION, conform
from . import accumulate as acc

log = logging.getLogger(__name__)
FEATURES_DIR = "_features"


def features_id(clt: str) -> str:
    """The `clt_id` partition of a CLT id (URL or random(...)): a readable slug plus a hash of the full id."""
    base = clt.rstrip("/").rsplit("/", 1)[-1] if "(" not in clt else clt.split("(", 1)[0]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-.")[:48] or "clt"
    return f"{slug}-{hashlib.sha256(clt.encode()).hexdigest()[:8]}"


class FeatureWorker:
    """Holds the model and the CLT; turns a chunk of contexts into a state (see accumulate.py)."""

    def __init__(self, cfg: dict):
        self.init_error = None
        try:
            self._load(cfg)
        except Exception as e:  # reported by ready(): the pool fails with this line instead of restarting forever
            self.init_error = f"{type(e).__name__}: {one_line(e)}" if not isinstance(e, CTRayError) else one_line(e)

    def ready(self) -> dict:
        return {"error": self.init_error, "pid": os.getpid()}

    def _load(self, cfg: dict) -> None:
        import torch

        from ..clt.io import load_model_and_clt

        torch.set_num_threads(max(1, int(cfg["num_cpus"])))
        self.cfg = cfg
        # only forward passes here: the fast attention kernel, except that random_clt calibrates through capture(),
        # which needs eager attention's patterns
        self.model, self.clt = load_model_and_clt(cfg["model"], cfg["clt"], cfg["random_clt"],
                                                  attn="sdpa" if cfg["clt"] else "eager")

    def run(self, tokens: np.ndarray, ctx: np.ndarray) -> dict:
        import torch

        from ..harvest.activations import harvest_batch

        crash = os.environ.get("CT_RAY_FAULT_CRASH_PROMPT", "")  # fault injection (tests): 'context:I' kills it
        if crash.startswith("context:") and int(crash[8:]) in set(np.asarray(ctx).tolist()):
            os._exit(3)
        c = self.cfg
        state = None
        for i in range(0, len(tokens), c["batch_contexts"]):
            t = torch.from_numpy(np.asarray(tokens[i : i + c["batch_contexts"]], np.int64))
            with torch.no_grad():
                x, _ = harvest_batch(self.model, t, self.clt.feature_input_hook)
                acts = torch.cat([self.clt.encode(l, x[:, :, l]) for l in range(self.clt.n_layers)], -1)
            s = acc.batch_state(acts.float().numpy(), ctx[i : i + c["batch_contexts"]], c["top_k"], c["samples"], c["window"])
            state = s if state is None else acc.merge(state, s)
        return state


def _contexts(spec: FeaturesSpec):
    from ..harvest.corpus import iter_documents, tokenize_contexts
    from ..models import load_model

    tok = load_model(spec.model).tokenizer
    ctxs = tokenize_contexts(tok, iter_documents(spec.corpus, spec.text_column), spec.context_len, spec.n_contexts)
    return ctxs, tok


class _ChunkPool(ActorPool):
    """Chunks of contexts on FeatureWorkers; states merged in chunk order (float sums come out the same every run)."""

    def __init__(self, ray, actor_cls, cfg, spec: FeaturesSpec, ctxs, F: int, bar):
        super().__init__(ray, actor_cls, cfg, workers=spec.workers, queue_depth=2, retries=2, what="features",
                         num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, write=bar.write)
        n = len(ctxs)
        self.ctxs, self.bar = ctxs, bar
        self.queue = collections.deque(enumerate((i, min(n, i + spec.chunk_contexts))
                                                 for i in range(0, n, spec.chunk_contexts)))
        self.done: dict = {}
        self.next_merge = 0
        self.state = acc.empty_state(F, spec.top_k, spec.samples, spec.window)

    def next_item(self, a):
        return ("work", self.queue.popleft()) if self.queue else None

    def has_work(self) -> bool:
        return bool(self.queue)

    def call(self, a, kind, payload):
        _, (lo, hi) = payload
        return a["h"].run.remote(self.ctxs.tokens[lo:hi], np.arange(lo, hi))

    def on_done(self, kind, payload, a, out):
        ci, (lo, hi) = payload
        self.done[ci] = out
        self.bar.update(hi - lo)
        while self.next_merge in self.done:
            self.state = acc.merge(self.state, self.done.pop(self.next_merge))
            self.next_merge += 1

    def on_failed(self, kind, payload, e):
        _, (lo, hi) = payload
        raise CTRayError(f"features: contexts {lo}-{hi} kill their worker ({self.attempts[self.item_id(kind, payload)]} "
                         f"time(s)): {one_line(e)}")


def _run_actors(spec: FeaturesSpec, cfg: dict, ctxs, F: int, address: str | None, progress: bool) -> dict:
    from tqdm.auto import tqdm

    from ..executor import ensure_ray, worker_env

    ray = ensure_ray(address)
    env = worker_env(ray)
    actor = ray.remote(FeatureWorker).options(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, max_restarts=-1,
                                              max_task_retries=0,  # retries are the pool's (executor/pool.py)
                                              runtime_env={"env_vars": env} if env else None)
    bar = tqdm(total=len(ctxs), unit="ctx", desc="features", disable=not progress)
    pool = _ChunkPool(ray, actor, cfg, spec, ctxs, F, bar)
    try:
        pool.run(len(pool.queue))
    finally:
        bar.close()
    return pool.state


def _rows(spec: FeaturesSpec, state: dict, ctxs, tok, d_tc: list[int], job: str) -> list[list[dict]]:
    """Rows per layer. Token strings come from the driver's own contexts (actors return indices only)."""
    vocab: dict[int, str] = {}

    def strs(ids):
        miss = [i for i in set(ids) if i not in vocab]
        if miss:
            vocab.update(zip(miss, (tok.decode([i]) for i in miss)))
        return [vocab[i] for i in ids]

    def ctx_rec(pre: str, f: int, j: int, q=None) -> dict:
        c, st = int(state[f"{pre}_ctx"][f, j]), int(state[f"{pre}_start"][f, j])
        w = min(spec.window, spec.context_len)
        return {"context": c, "doc": int(ctxs.doc[c]), "offset": int(ctxs.offset[c]), "position": int(state[f"{pre}_pos"][f, j]),
                "activation": float(state[f"{pre}_val"][f, j]), "quantile": q, "start": st,
                "tokens": strs([int(t) for t in ctxs.tokens[c, st : st + w]]),
                "acts": [float(x) for x in state[f"{pre}_acts"][f, j, :w]]}

    out, gid, n_tok = [], 0, int(state["n_tokens"])
    for layer, n in enumerate(d_tc):
        rows = []
        for f in range(n):
            na = int(state["n_active"][gid])
            top = [ctx_rec("top", gid, j) for j in range(spec.top_k) if np.isfinite(state["top_val"][gid, j])]
            valid = state["smp_ctx"][gid] != acc._NO_CTX
            qs = [ctx_rec("smp", gid, j, q) for q, j in acc.quantile_picks(state["smp_val"][gid], valid, spec.quantiles)]
            rows.append({"job": job, "clt": spec.clt_id(), "model": spec.model, "layer": layer, "feature": f,
                         "node_prefix": f"{layer}_{f}_", "n_tokens": n_tok, "n_active": na,
                         "density": na / max(1, n_tok), "mean_activation": state["sum_act"][gid] / na if na else float("nan"),
                         "max_activation": float(state["max_act"][gid]), "top_contexts": top, "quantile_samples": qs,
                         "schema_version": TABLES_SCHEMA_VERSION})
            gid += 1
        out.append(rows)
    return out


def run_features(spec: FeaturesSpec, *, address: str | None = None, progress: bool = False) -> dict:
    """Compute and store the dashboards of `spec`'s CLT; a committed identical job is returned as is."""
    store = spec.storage.store()
    cid, job = features_id(spec.clt_id()), spec.job_key()
    record = f"{FEATURES_DIR}/{cid}/job.json"
    prev = store.read_json(record)
    if prev and prev.get("job") == job and _committed_job(store, cid) == job:
        return {**prev, "skipped": True}
    store.check_writable()
    model, clt = worker_locations(spec.model, spec.clt)  # actors run in other directories
    ctxs, tok = _contexts(spec)
    d_tc = _clt_widths(spec, clt)
    cfg = {"model": model, "clt": clt,
           "random_clt": spec.random_clt.model_dump() if spec.random_clt else None, "num_cpus": spec.num_cpus,
           **spec.model_dump(include={"batch_contexts", "top_k", "samples", "window"})}
    state = _run_actors(spec, cfg, ctxs, sum(d_tc), address, progress)
    rows = pa.concat_tables([conform(r, "features", cid) for r in _rows(spec, state, ctxs, tok, d_tc, job)])
    # one commit replaces the CLT's dashboards whole: readers see the old job's rows or the new job's, never a mix
    replace_partition(store, "features", cid, rows, {"ct-ray.job": job})
    rec = {"job": job, "clt_id": cid, "clt": spec.clt_id(), "model": spec.model, "n_layers": len(d_tc),
           "n_features": sum(d_tc), "n_contexts": len(ctxs), "n_tokens": int(state["n_tokens"]),
           "spec": spec.model_dump(mode="json"), "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat()}
    store.write_json(record, rec)  # what the committed job was (the explorer shows it); the commit is the table's
    return {**rec, "skipped": False}


def _committed_job(store, cid: str) -> str | None:
    """The job whose rows the features table holds for a CLT (one column scan of its partition)."""
    jobs = set(store.read("features", cid, columns=["job"]).column("job").to_pylist())
    return jobs.pop() if len(jobs) == 1 else None


def _clt_widths(spec: FeaturesSpec, clt: str | None) -> list[int]:
    if spec.random_clt:
        from ..models import load_model

        return [spec.random_clt.features] * load_model(spec.model).n_layers
    from ..clt.io import load_clt

    return list(load_clt(clt).d_tc)  # on the driver: a bad CLT URL fails here with one clear line


def load_features_spec(path: str) -> FeaturesSpec:
    return load_yaml(path, FeaturesSpec)


def parse_features_spec(data: dict, where: str = "features spec") -> FeaturesSpec:
    return parse(FeaturesSpec, data, where)
