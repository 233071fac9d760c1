"""Nightly CLT retraining (`ct-ray retrain SPEC.yaml [--date D]`), idempotent per date.

    harvested ─► trained ─► registered ─► evaluated ─► decided ─► promoted ─► canary ─► done
    fresh corpus  Ray Train   new immutable  candidate and   margins   production   sweep with the
    (Ray Data)    (warm start  version        production on             pointer      new CLT
                  optional)                   the same fixed set

Each stage, once finished, is recorded in `<registry>/runs/<date>.json` (written whole), and a re-run skips the
recorded stages: a second run of the same night does nothing, and a run that died anywhere picks up at the first
unrecorded stage. The decision is recorded *before* the pointer moves, so a crash between the two never turns into
comparing the candidate with itself; promoting an already-promoted version is a no-op. Until `promoted` is
recorded the production pointer is untouched, so the registry is consistent at every point.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import subprocess

from ..errors import CTRayError
from ..specs import CanarySpec, RetrainSpec, TrainSpec, load_yaml
from ..specs.retrain import stable_hash as _hash
from .promotion import decide, eval_id, evaluate_clt
from .registry import Registry

STAGES = ("harvested", "trained", "registered", "evaluated", "decided", "promoted", "canary")
FAULT_ENV = "CT_RAY_FAULT_RETRAIN"  # tests: raise right after this stage is recorded
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def check_date(date: str | None) -> str:
    if date is None:
        return _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    try:
        if not _DATE_RE.match(date):
            raise ValueError
        _dt.date.fromisoformat(date)
    except ValueError:
        raise CTRayError(f"--date must be YYYY-MM-DD, not {date!r}") from None
    return date


def git_commit() -> str | None:
    """The code's commit: CT_RAY_GIT_COMMIT (set by `ct-ray submit`, as a job's working dir has no .git), else
    the checkout's HEAD with `-dirty` when tracked files differ from it (the commit alone would overstate what is
    known), else None."""
    if os.environ.get("CT_RAY_GIT_COMMIT"):
        return os.environ["CT_RAY_GIT_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, timeout=5)
        head = git("rev-parse", "HEAD")
        if head.returncode != 0 or not head.stdout.strip():
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def same_shape(meta_clt: dict, shape) -> bool:
    """Whether a registered CLT (its meta's `clt`) can warm-start training of `shape` (a CLTShapeSpec). A changed
    shape in the spec is a deliberate change of recipe: that night trains from scratch instead of failing."""
    n = meta_clt["n_layers"]
    spans = [min(shape.span or n, n - l) for l in range(n)]
    return (meta_clt["features_per_layer"], meta_clt["spans"], meta_clt["activation"]) == \
        (shape.n_features, spans, shape.file_activation)


def _prompts(canary: CanarySpec) -> list[str]:
    return [p if isinstance(p, str) else p.prompt for p in canary.prompts]


class Retrain:
    """One night's run. `log` receives one line per event."""

    def __init__(self, spec: RetrainSpec, date: str | None = None, *, address: str | None = None, log=print):
        self.spec, self.date, self.address, self.log = spec, check_date(date), address, log
        self.reg = Registry(spec.registry)  # S3-compatible endpoints: AWS_ENDPOINT_URL, as for training
        self.day_url = f"{spec.work.rstrip('/')}/{self.date}"
        self.marker = f"runs/{self.date}.json"
        self.state: dict = {}
        self._model = None

    # --- state ----------------------------------------------------------------------------------------------
    def _save(self, stage: str, info: dict) -> None:
        self.state["stages"][stage] = {**info, "at": _now()}
        self.reg.store.write_json(self.marker, self.state)
        self.log(f"[{self.date}] {stage}: " + ", ".join(f"{k}={v}" for k, v in info.items() if not isinstance(v, dict)))
        if os.environ.get(FAULT_ENV) == stage:
            raise RuntimeError(f"injected fault after stage {stage!r} ({FAULT_ENV})")

    def _done(self, stage: str) -> dict | None:
        return self.state["stages"].get(stage)

    def _ray(self):
        from ..executor import ensure_ray

        return ensure_ray(self.address, training=True, log_to_driver=True)

    # --- stages ---------------------------------------------------------------------------------------------
    def train_spec(self, init_from: str | None) -> TrainSpec:
        s, base = self.spec, self.spec.train
        corpus = [c.replace("{date}", self.date) for c in s.corpus] if s.corpus else base.harvest.corpus
        return base.model_copy(update={
            "name": f"{s.name}-{self.date}", "harvest": base.harvest.model_copy(update={"corpus": corpus, "out": None}),
            "activations": f"{self.day_url}/activations", "checkpoint": f"{self.day_url}/checkpoints",
            "out": f"{self.day_url}/candidate", "init_from": init_from})

    def harvest(self) -> None:
        from ..harvest.pipeline import harvest_to_store

        self._ray()
        # the warm-start parent is fixed here, once per night: a re-run trains from the same parent even if
        # production has moved meanwhile (e.g. a manual rollback)
        prod = self.reg.production() if self.spec.warm_start else None
        parent = prod["version"] if prod else None
        if parent and not same_shape(self.reg.meta(parent)["clt"], self.spec.train.clt):
            self.log(f"[{self.date}] production {parent} has another CLT shape than train.clt: training from scratch")
            parent = None
        ts = self.train_spec(self.reg.version_url(parent) if parent else None)
        m = harvest_to_store(ts.harvest, ts.activations, progress=False)
        self._save("harvested", {"activations": ts.activations, "n_tokens": m.get("n_tokens"),
                                 "manifest_sha256": _hash(m), "corpus": ts.harvest.corpus, "parent": parent})

    def train(self) -> None:
        from ..train.run import already_trained, train

        h = self._done("harvested")
        ts = self.train_spec(self.reg.version_url(h["parent"]) if h["parent"] else None)
        if already_trained(ts):  # the candidate was exported before a crash: do not train it again
            self.log(f"[{self.date}] reusing the trained candidate at {ts.out}")
            from ..store.fs import absolute_url, filesystem

            fs, path = filesystem(absolute_url(ts.out))
            with fs.open(f"{path}/ct_ray.json") as f:
                summary = json.load(f).get("metrics", {})
        else:
            self._ray()
            summary = train(ts, progress=False)
        final = {k: v for k, v in (summary.get("final") or {}).items() if not isinstance(v, list)}
        self._save("trained", {"clt": ts.out, "train_spec_hash": _hash(ts.model_dump(mode="json")),
                               "final": final, "replacement": summary.get("replacement", {})})

    def register(self) -> None:
        h, t = self._done("harvested"), self._done("trained")
        prov = {"retrain": self.spec.name, "date": self.date, "spec_hash": self.spec.spec_hash(),
                "train_spec_hash": t["train_spec_hash"], "parent": h["parent"], "git_commit": git_commit(),
                "data": {k: h[k] for k in ("activations", "corpus", "n_tokens", "manifest_sha256")}}
        vid = self.reg.register(t["clt"], metrics={"train": t["final"], "replacement": t["replacement"]},
                                provenance=prov, date=self.date)
        self._save("registered", {"version": vid})

    def _model_and_inputs(self):
        if self._model is None:
            import torch

            from ..harvest.corpus import iter_documents, tokenize_contexts
            from ..models import load_model

            e = self.spec.eval
            model = load_model(self.spec.train.harvest.model)
            ctx = tokenize_contexts(model.tokenizer, iter_documents(e.corpus, e.text_column), e.context_len,
                                    e.n_contexts)
            self._model = (model, torch.from_numpy(ctx.tokens).long())
        return self._model

    def evaluate_version(self, version: str) -> dict:
        """A version's metrics on the fixed evaluation set (cached in the registry: computed once per version)."""
        c = self.spec.canary
        canary = {"prompts": _prompts(c), "attribution": c.attribution.attribute_kwargs()}
        eid = eval_id(self.spec.train.harvest.model, self.spec.eval.model_dump(), canary)
        cached = self.reg.read_eval(version, eid)
        if cached is not None:
            return cached
        from ..clt.io import load_clt

        model, tokens = self._model_and_inputs()
        clt = load_clt(self.reg.version_url(version))
        clt.check_model(model.n_layers, model.d_model)
        result = {"version": version, "eval_id": eid, "at": _now(),
                  **evaluate_clt(model, clt, tokens, canary["prompts"], canary["attribution"])}
        self.reg.write_eval(version, eid, result)
        return result

    def evaluate(self) -> None:
        vid = self._done("registered")["version"]
        prod = self.reg.production()
        cand = self.evaluate_version(vid)
        base = self.evaluate_version(prod["version"]) if prod and prod["version"] != vid else None
        keys = ("fvu", "l0", "kl", "top1_agreement", "replacement_score", "completeness_score")
        self._save("evaluated", {"candidate": {k: cand.get(k) for k in keys}, "production_version":
                                 prod["version"] if prod else None,
                                 "production": {k: base.get(k) for k in keys} if base else None})

    def decide(self) -> None:
        ev, vid = self._done("evaluated"), self._done("registered")["version"]
        if ev["production_version"] == vid:
            ok, reasons = True, ["the candidate already is production"]
        else:
            ok, reasons = decide(ev["candidate"], ev["production"], self.spec.promote.model_dump())
        for r in reasons:
            self.log(f"[{self.date}]   {r}")
        self._save("decided", {"promote": ok, "version": vid, "against": ev["production_version"], "reasons": reasons})

    def promote(self) -> None:
        d = self._done("decided")
        rec = self.reg.promote(d["version"], reason=f"{self.spec.name} {self.date}: better than "
                                                    f"{d['against'] or 'nothing'} by the configured margins")
        self._save("promoted", {"version": d["version"], "seq": rec["seq"], "previous": rec["previous"]})

    def canary(self) -> None:
        from ..specs import parse_sweep_spec
        from ..sweep.runner import run_sweep

        c, vid = self.spec.canary, self._done("promoted")["version"]
        sweep = parse_sweep_spec({
            "sweep_id": f"{c.sweep_prefix}-{self.date}", "model": self.spec.train.harvest.model,
            "clt": self.reg.version_url(vid), "prompts": [p if isinstance(p, str) else p.model_dump() for p in c.prompts],
            "attribution": c.attribution.attribute_kwargs(), "pruning": c.pruning.model_dump(),
            "perturbation": c.perturbation.model_dump(), "resources": c.resources.model_dump(),
            "storage": c.storage.model_dump()}, where="canary sweep")
        self._ray()
        r = run_sweep(sweep)
        rec = {"sweep_id": r.sweep_id, "store": r.store, "ok": r.ok + r.skipped, "failed": r.failed}
        prev = self._previous_canary(r.store)
        if prev is not None and prev != r.sweep_id:  # how the circuits of the canary prompts moved since then
            from ..analysis.diff import diff_sweeps

            try:
                d = diff_sweeps(sweep.storage.store(), prev, r.sweep_id)
                agg = d["aggregate"]  # the sweep-level row
                rec["diff"] = {"against": prev, "diff_id": d["diff_id"], **{k: agg.get(k) for k in (
                    "n_prompts", "match", "replacement_delta", "completeness_delta", "top_prob_delta",
                    "n_matched", "n_features_a", "matched_influence_a", "influence_a")}}
                self.log(f"[{self.date}]   canary diff {d['diff_id']}: {agg.get('n_matched')} of "
                         f"{agg.get('n_features_a')} feature nodes matched, replacement "
                         f"{agg.get('replacement_delta')}, completeness {agg.get('completeness_delta')}")
            except CTRayError as e:  # the diff is a record, not a gate: the sweep is done either way
                rec["diff"] = {"against": prev, "error": str(e)}
        self._save("canary", rec)

    def _previous_canary(self, store_url: str) -> str | None:
        """The sweep id of the latest earlier night's canary in the same store (None: the first canary)."""
        earlier = []
        for run in self.reg.runs():
            c = (run.get("stages") or {}).get("canary") or {}
            if str(run.get("date", "")) < self.date and c.get("sweep_id") and c.get("store") == store_url:
                earlier.append((str(run["date"]), c["sweep_id"]))
        return max(earlier)[1] if earlier else None

    # --- driver ---------------------------------------------------------------------------------------------
    def run(self) -> dict:
        self.state = self.reg.store.read_json(self.marker) or {
            "date": self.date, "name": self.spec.name, "spec_hash": self.spec.spec_hash(), "started_at": _now(),
            "status": "running", "stages": {}}
        if self.state.get("status") == "done":
            self.log(f"[{self.date}] already done ({outcome(self.state)}): nothing to do")
            return {**self.state, "noop": True}
        if self.state["spec_hash"] != self.spec.spec_hash():
            self.log(f"[{self.date}] note: the spec changed since this night started; recorded stages are kept")
        for stage in STAGES:
            if self._done(stage):
                continue
            if stage == "promoted" and not self._done("decided")["promote"]:
                break
            getattr(self, {"harvested": "harvest", "trained": "train", "registered": "register",
                           "evaluated": "evaluate", "decided": "decide", "promoted": "promote",
                           "canary": "canary"}[stage])()
        self.state.update(status="done", finished_at=_now())
        self.reg.store.write_json(self.marker, self.state)
        self.log(f"[{self.date}] done: {outcome(self.state)}")
        return {**self.state, "noop": False}


def outcome(state: dict) -> str:
    st = state["stages"]
    vid = (st.get("registered") or {}).get("version")
    if st.get("promoted"):
        return f"promoted {vid}"
    if st.get("decided"):
        return f"{vid} not promoted (production stays {st['decided']['against']})"
    return "no candidate"


def run_retrain(spec: RetrainSpec | str, date: str | None = None, *, address: str | None = None, log=print) -> dict:
    if isinstance(spec, str):
        spec = load_yaml(spec, RetrainSpec)
    return Retrain(spec, date, address=address, log=log).run()
