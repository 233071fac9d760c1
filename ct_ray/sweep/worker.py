"""What one sweep worker does: hold the model and the CLT once, run prompts and perturbation jobs, write rows.

`SweepWorker` is a plain class (usable in-process, e.g. by benchmarks); the runner wraps it as a Ray actor.
Every task buffers its rows in the worker and returns a small summary dict; `flush` writes the buffered rows as a
few large data files straight to storage and reports them (and the keys they complete) for the driver to commit.
"""

from __future__ import annotations

import collections
import datetime as _dt
import json
import logging
import os
import socket
import time
import traceback
import uuid

import pyarrow as pa

from ..errors import CTRayError, PromptError, StorageError, one_line
from ..specs import AttributionSpec, PerturbationPlan, PruneSpec
from ..store.schemas import TABLES_SCHEMA_VERSION
from ..store.writer import RowBuffer, sweep_writer_configs
from .perturbation import error_rows, finish_rows, resolve, select_nodes

log = logging.getLogger(__name__)
_GRAPH_CACHE = 4  # graphs kept per worker for their perturbation jobs
CRASH_ENV = "CT_RAY_FAULT_CRASH_PROMPT"  # fault injection (tests): a worker handed exactly this prompt dies


def worker_config(spec, store, device: str = "cpu") -> dict:
    """The small, picklable description a worker is built from (never model objects)."""
    from ..store.fs import worker_locations

    model, clt = worker_locations(spec.model, spec.clt)
    r = spec.resources
    return {
        "sweep_id": spec.sweep_id,
        "model": model,
        "model_id": spec.model,
        "clt": clt,
        "clt_id": spec.clt_id(),
        "clt_options": spec.storage.storage_options() if (clt or "").startswith("s3://") else {},
        "random_clt": spec.random_clt.model_dump() if spec.random_clt else None,
        "attribution": spec.attribution.model_dump(),
        "pruning": spec.pruning.model_dump(),
        "graph_rows": spec.graph_rows,
        "params": json.dumps(spec.params(), sort_keys=True),
        "plan": spec.perturbation.model_dump(),
        "writers": sweep_writer_configs(store),  # table metadata: workers write data files, never the catalog
        "device": device,
        "torch_threads": r.torch_threads or max(1, int(r.num_cpus)),
    }


class SweepWorker:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.init_error = None
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.instance = uuid.uuid4().hex  # a restarted actor is a new instance: its predecessor's buffer is gone
        self.cache: collections.OrderedDict = collections.OrderedDict()
        try:
            self._load()
        except CTRayError as e:
            self.init_error = one_line(e)
        except Exception as e:  # report, do not crash-loop the actor
            self.init_error = f"{type(e).__name__}: {one_line(e)}"
            log.error("sweep worker failed to start:\n%s", traceback.format_exc())

    def _load(self):
        import torch

        from ..clt.io import load_model_and_clt

        torch.set_num_threads(self.cfg["torch_threads"])
        cfg = self.cfg
        self.rows = RowBuffer(cfg["writers"], cfg["sweep_id"])
        self.model, self.clt = load_model_and_clt(cfg["model"], cfg["clt"], cfg["random_clt"],
                                                  clt_options=cfg["clt_options"], device=cfg["device"])
        self.aspec = AttributionSpec.model_validate(cfg["attribution"])  # typed from the spec to the worker
        self.pspec = PruneSpec.model_validate(cfg["pruning"])
        self.plan = PerturbationPlan.model_validate(cfg["plan"])
        self.plan_hash = self.plan.plan_hash()
        self.perturb_fn, self.perturb_skip = resolve(self.plan)

    # --- small calls ------------------------------------------------------------------------------------
    def ready(self) -> dict:
        return {"error": self.init_error, "worker": self.worker, "pid": os.getpid(), "instance": self.instance}

    def flush(self) -> dict:
        """Write the buffered rows as data files; report them with the keys they complete (see store/writer.py)."""
        return {**self.rows.flush(), "instance": self.instance, "pid": os.getpid()}

    def pid(self) -> int:
        return os.getpid()

    # --- one prompt -------------------------------------------------------------------------------------
    def _base_row(self, item: dict) -> dict:
        return {"key": item["key"], "prompt_index": item["index"], "prompt": item["prompt"], "target": item.get("target"),
                "model": self.cfg["model_id"], "clt": self.cfg["clt_id"], "params": self.cfg["params"],
                "graph_rows": self.cfg["graph_rows"], "worker": self.worker,
                "created_at": _dt.datetime.now(_dt.timezone.utc), "schema_version": TABLES_SCHEMA_VERSION}

    def _target_info(self, tokens, target: str, logit_tokens: list[int]) -> dict:
        import torch

        ids = self.model.tokenizer(target, add_special_tokens=False)["input_ids"] if self.model.tokenizer else []
        if not ids:
            return {}
        tid = int(ids[0])
        with torch.no_grad():
            logits = self.model.model(tokens[None].to(self.cfg["device"])).logits[0, -1].float()
        probs = logits.softmax(-1)
        return {"target_token": tid, "target_prob": float(probs[tid]), "target_rank": int((probs > probs[tid]).sum()),
                "target_in_graph": tid in logit_tokens}

    def _compute(self, prompt: str):
        from ..attribution.attribute import attribute

        t0 = time.perf_counter()
        g = attribute(self.model, self.clt, prompt, **self.aspec.attribute_kwargs())
        t1 = time.perf_counter()
        p = g.prune(**self.pspec.model_dump())
        return g.with_influence(), p, t1 - t0, time.perf_counter() - t1

    def _attention(self, p):
        """Head loadings (and QK attribution) of the pruned graph, when the spec asks for them."""
        opts = self.aspec.attention()
        if opts is None:
            return None
        from ..attribution.attention import attention_attribution

        opts.pop("heads")
        return attention_attribution(self.model, self.clt, p, **opts)

    def run_prompt(self, item: dict) -> dict:
        """Attribute + prune one prompt; buffer its nodes, edges and graphs row (committed by the driver later)."""
        t_start = time.perf_counter()
        if os.environ.get(CRASH_ENV) and item["prompt"] == os.environ[CRASH_ENV]:
            os._exit(3)
        key = item["key"]
        row = self._base_row(item)
        err = None
        if self.init_error:
            err = ("input", self.init_error)
        elif item.get("invalid"):
            err = ("prompt", item["invalid"])
        if err is None:
            try:
                g, p, t_attr, t_prune = self._compute(item["prompt"])
                att = self._attention(p)
            except PromptError as e:
                err = ("prompt", one_line(e))
            except CTRayError as e:
                err = ("input", one_line(e))
            except Exception as e:
                err = ("internal", f"{type(e).__name__}: {one_line(e)}")
                log.error("prompt %s failed:\n%s", key, traceback.format_exc())
        perturb_nodes, t_compute = [], None
        if err is not None:
            row.update(status="error", error_kind=err[0], error=err[1])
        else:
            m, fs, ps = g.meta, g.scores(), p.scores()
            t_w = time.perf_counter()
            t_compute = t_w - t_start  # attribute + prune + scores
            from ..attribution.graph import graph_rows

            nodes, edges = graph_rows(g, p, self.cfg["graph_rows"], key)
            self.rows.add("nodes", nodes)
            self.rows.add("edges", edges)
            if att is not None:
                from ..attribution.attention import with_key

                self.rows.add("edge_heads", with_key(att.edge_heads, key))
                self.rows.add("qk_attributions", with_key(att.qk_rows, key))
            toks = m["logit_tokens"]
            logit_strs = self.model.decode(toks)
            row.update(
                status="ok", n_tokens=len(m["tokens"]), tokens=m["tokens"], token_strs=m["token_strs"],
                logit_tokens=toks, logit_strs=logit_strs, logit_probs=m["logit_probs"],
                top_token=toks[0] if toks else None, top_token_str=logit_strs[0] if toks else None,
                top_prob=m["logit_probs"][0] if toks else None, n_active_features=m.get("n_active_features"),
                n_nodes=g.n_nodes, n_edges=g.n_edges, n_features=g.n_features, n_nodes_pruned=p.n_nodes,
                n_edges_pruned=p.n_edges, n_features_pruned=p.n_features,
                replacement_score=fs["replacement_score"], completeness_score=fs["completeness_score"],
                replacement_score_pruned=ps["replacement_score"], completeness_score_pruned=ps["completeness_score"],
                attribute_s=t_attr, prune_s=t_prune,
            )
            if item.get("target"):
                import torch

                row.update(self._target_info(torch.tensor(m["tokens"]), item["target"], toks))
            if self.perturb_fn is not None:
                perturb_nodes = select_nodes(p, self.plan)
                self._remember(key, g)
            row["write_s"] = time.perf_counter() - t_w
        self.rows.add("graphs", pa.Table.from_pylist([row]))
        self.rows.finish("prompts", key, ok=row["status"] == "ok")
        return {"instance": self.instance,
                "key": key, "status": row["status"], "error_kind": row.get("error_kind"), "error": row.get("error"),
                "n_nodes": row.get("n_nodes"), "n_features_pruned": row.get("n_features_pruned"),
                "perturb_nodes": perturb_nodes, "worker": self.worker, "pid": os.getpid(),
                "compute_seconds": t_compute, "seconds": time.perf_counter() - t_start,
                "buffered_bytes": self.rows.round_bytes}

    def _remember(self, key, graph):
        self.cache[key] = graph
        self.cache.move_to_end(key)
        while len(self.cache) > _GRAPH_CACHE:
            self.cache.popitem(last=False)

    # --- one perturbation job --------------------------------------------------------------------------
    def run_perturbation(self, item: dict, nodes: list[int] | None) -> dict:
        """Run the plan on one graph (from this worker's cache, else recomputed: attribution is deterministic)
        and buffer its perturbation rows. `nodes=None`: select them again from the recomputed graph."""
        t0 = time.perf_counter()
        key = item["key"]
        if self.perturb_fn is None:
            return {"key": key, "status": "skipped", "error": self.perturb_skip, "rows": 0, "seconds": 0.0,
                    "instance": self.instance}
        g = self.cache.pop(key, None)
        hit = g is not None
        try:
            if g is None:
                g, p, _, _ = self._compute(item["prompt"])
                if nodes is None:
                    nodes = select_nodes(p, self.plan)
            rows = self.perturb_fn(self.model, self.clt, g, self.plan.model_copy(update={"nodes": list(nodes or [])}))
            table = finish_rows(rows, g, key, self.plan_hash)
        except StorageError:
            raise
        except Exception as e:
            log.error("perturbation of %s failed:\n%s", key, traceback.format_exc())
            table = finish_rows(error_rows(f"{type(e).__name__}: {one_line(e)}"), g if g is not None else _NoGraph,
                                key, self.plan_hash)
        self.rows.add("perturbations", table)
        self.rows.finish("perturbations", key)
        bad = table.column("status").to_pylist().count("error")
        return {"instance": self.instance, "key": key, "status": "error" if bad else "ok", "rows": table.num_rows,
                "cache_hit": hit, "worker": self.worker, "pid": os.getpid(), "seconds": time.perf_counter() - t0,
                "buffered_bytes": self.rows.round_bytes}


class _NoGraph:
    nodes = pa.table({"node": pa.array([], pa.int32()), "node_id": pa.array([], pa.string()),
                      "layer": pa.array([], pa.int32()), "position": pa.array([], pa.int32()),
                      "feature": pa.array([], pa.int32()), "influence": pa.array([], pa.float32())})
