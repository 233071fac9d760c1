"""Driver of a training run: harvest (streamed or persisted), Ray Train fit, CLT export, metrics table."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid

import torch
from safetensors.torch import load_file

from ..clt.io import save_clt
from ..clt.transcoder import CrossLayerTranscoder
from ..errors import CTRayError, StorageError, one_line
from ..specs import TrainSpec
from ..store.fs import absolute_url, check_replaceable, filesystem, is_local
from .loop import CKPT_STATE, shard_file, train_loop_per_worker
from .shard import feature_bounds


def _check_writable(url: str) -> None:
    """Fail early, with one line, if a location cannot be written (nothing half-written later)."""
    try:
        fs, path = filesystem(url)
        fs.makedirs(path, exist_ok=True)
        probe = f"{path}/.ct_ray_probe_{uuid.uuid4().hex[:8]}"
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except (OSError, PermissionError) as e:
        raise StorageError(f"cannot write to {url}: {e.strerror or e}") from e
    except CTRayError:
        raise
    except Exception as e:
        raise StorageError(f"cannot write to {url}: {one_line(e)}") from e


def _storage_path(url: str) -> str:
    fs, path = filesystem(url)
    return os.path.abspath(path) if is_local(fs) else url


def check_resumable(spec: TrainSpec, n_layers: int, d_model: int) -> None:
    """Ray Train resumes a run from the checkpoints under `checkpoint/name`; refuse (one line) when they belong to a
    differently shaped CLT or sharding, instead of failing inside the workers with a shape-mismatch traceback."""
    fs, root = filesystem(spec.checkpoint)
    run_dir = f"{root.rstrip('/')}/{spec.name}"
    try:
        states = sorted(fs.glob(f"{run_dir}/checkpoint_*/{CKPT_STATE}"))
    except OSError:
        return
    if not states:
        return
    try:
        layout = json.loads(fs.cat_file(states[-1]))["layout"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CTRayError(f"unreadable checkpoint {states[-1]}: delete {run_dir} or use another name") from None
    want = {"n_layers": n_layers, "d_model": d_model, "n_features": spec.clt.n_features, "span": spec.clt.span,
            "activation": spec.clt.activation, "feature_input_hook": spec.harvest.read_point, "fp": spec.workers,
            "dp": spec.data_parallel, "k": spec.clt.k}
    diff = [f"{k} {layout.get(k)!r} -> {v!r}" for k, v in want.items() if layout.get(k) != v]
    if diff:
        raise CTRayError(f"{run_dir} holds checkpoints of another run ({', '.join(diff)}): change `name` or "
                         f"`checkpoint`, or delete that folder")


def assemble(ckpt_dir: str, spec: TrainSpec, n_layers: int, d_model: int, model_name: str):
    """The full CLT from the shard files of a checkpoint, normalisation folded into the weights."""
    state = json.load(open(os.path.join(ckpt_dir, CKPT_STATE)))
    sx, sy = torch.tensor(state["sx"]), torch.tensor(state["sy"])
    F_ = spec.clt.n_features
    clt = CrossLayerTranscoder(n_layers, d_model, F_, spec.clt.span, spec.clt.file_activation,
                               spec.harvest.read_point, model_name)
    with torch.no_grad():
        for f in range(spec.workers):
            lo, hi = feature_bounds(F_, spec.workers, f)
            t = load_file(os.path.join(ckpt_dir, shard_file(f, 0)))
            for l in range(n_layers):
                clt.W_enc[l][lo:hi] = t[f"p.W_enc.{l}"] * sx[l]  # h = W_enc (sx x) + b
                clt.b_enc[l][lo:hi] = t[f"p.b_enc.{l}"]
                clt.threshold[l][lo:hi] = t[f"p.threshold.{l}"]
                span = clt.spans[l]
                clt.W_dec[l][lo:hi] = t[f"p.W_dec.{l}"] / sy[l : l + span][None, :, None]  # y = ŷ_scaled / sy
                if f == 0:
                    clt.b_dec[l].copy_(t[f"p.b_dec.{l}"] / sy[l])
    clt.requires_grad_(False)
    return clt, state


def write_metrics_table(url: str, run: str, history: list[dict]) -> None:
    """Commit a run's metrics history as the `run` partition of the store's train_metrics table (replaced whole:
    a re-run or resumed run rewrites it idempotently)."""
    if not history:
        return
    from ..store.commit import replace_partition
    from ..store.schemas import SCHEMAS, TABLES_SCHEMA_VERSION
    from ..store.tables import Store

    cols = set(SCHEMAS["train_metrics"].names)
    rows = [{**{k: v for k, v in h.items() if k in cols}, "schema_version": TABLES_SCHEMA_VERSION} for h in history]
    replace_partition(Store(url), "train_metrics", run, rows, {"ct-ray.run": run})


def resolve_paths(spec: TrainSpec) -> TrainSpec:
    """Local paths made absolute: Ray Train workers run in their own directories."""
    return spec.model_copy(update={
        "checkpoint": absolute_url(spec.checkpoint), "out": absolute_url(spec.out),
        "activations": absolute_url(spec.activations), "metrics": absolute_url(spec.metrics),
        "init_from": absolute_url(spec.init_from),
        "harvest": spec.harvest.model_copy(update={"out": absolute_url(spec.harvest.out)})})


def already_trained(spec: TrainSpec) -> bool:
    """A committed CLT at spec.out trained from the same spec (its sidecar records the spec): reused, not retrained."""
    from ..store.fs import COMMIT_MARKER

    fs, path = filesystem(absolute_url(spec.out))
    try:
        if not fs.exists(f"{path}/{COMMIT_MARKER}"):
            return False
        with fs.open(f"{path}/ct_ray.json") as f:
            side = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    return side.get("spec") == resolve_paths(spec).model_dump()


def train(spec: TrainSpec, *, progress: bool = True) -> dict:
    """Harvest (unless `spec.activations`), train on Ray Train, export the CLT to `spec.out`. Returns a summary."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..executor import ensure_ray
    from ..harvest.pipeline import build_contexts, harvest_dataset, harvest_to_store
    from ..models import load_model

    spec = resolve_paths(spec)
    check_replaceable(spec.out)  # before hours of training, not at the export
    for url in (spec.checkpoint, spec.out):
        _check_writable(url)
    # Ray Train's print patch logs every worker print() a second time: each step line would show twice
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ensure_ray(None, training=True, log_to_driver=True)  # local unless the caller already joined a cluster
    t0 = time.time()
    model = load_model(spec.harvest.model)
    if spec.init_from:  # fail before any work when the warm-start CLT does not fit this spec
        _check_init(spec, model)
    check_resumable(spec, model.n_layers, model.d_model)  # before harvesting: fail fast
    activations = spec.activations
    datasets, data_cfg = None, None
    if activations is None and spec.harvest.out is not None:
        harvest_to_store(spec.harvest, spec.harvest.out, progress=progress)
        activations = spec.harvest.out
    elif activations is None:
        from ..harvest.pipeline import quiet_ray_data

        if progress:
            quiet_ray_data()  # the dataset carries this process's Ray Data settings to the training worker
        if spec.data_parallel > 1:
            raise CTRayError("data_parallel > 1 needs a persisted harvest (set harvest.out or activations)")
        _warn_if_streaming_starves(spec)
        datasets = {"train": harvest_dataset(spec.harvest, build_contexts(spec.harvest, model.tokenizer))}
        data_cfg = DataConfig(datasets_to_split=[])
    t_harvest = time.time() - t0

    config = {"spec": spec.model_dump(), "activations": activations, "n_layers": model.n_layers,
              "d_model": model.d_model, "model_name": model.name,
              "pid_dir": os.environ.get("CT_RAY_TEST_PID_DIR")}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=spec.workers * spec.data_parallel, use_gpu=spec.use_gpu,
                                     resources_per_worker={"CPU": spec.num_cpus_per_worker}),
        run_config=RunConfig(name=spec.name, storage_path=_storage_path(spec.checkpoint),
                             failure_config=FailureConfig(max_failures=spec.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             # Ray Train's INFO lines (each report, each checkpoint) would bury the step lines
                             logging_config=LoggingConfig(log_level="WARNING")),
        datasets=datasets,
        dataset_config=data_cfg,
    )
    result = trainer.fit()
    if result.error is not None:
        raise CTRayError(f"training failed: {one_line(result.error)}")
    t_train = time.time() - t0 - t_harvest
    with result.checkpoint.as_directory() as d:
        clt, state = assemble(d, spec, model.n_layers, model.d_model, model.name)
    summary = {"name": spec.name, "steps": spec.optim.steps, "final": state["history"][-1] if state["history"] else {},
               "harvest_s": t_harvest, "train_s": t_train}
    if spec.eval_tokens > 0:
        from ..clt.evaluate import reconstruction_metrics, replacement_metrics

        held_out = held_out_tokens(spec, model, spec.eval_tokens)
        summary["replacement"] = replacement_metrics(model, clt, held_out)
        # the training metrics are of single batches (noisy): the reconstruction on all held-out tokens too
        summary["held_out"] = reconstruction_metrics(model, clt, held_out)
    if spec.canary:  # what users judge a CLT by: how much of each canary graph's influence its features carry
        from ..attribution.canary import canary_scores

        summary["canary"] = canary_scores(model, clt, list(spec.canary), {})
    save_clt(clt, spec.out, extra={"spec": spec.model_dump(), "metrics": summary,
                                   "data": {"activations": activations, "corpus": spec.harvest.corpus}})
    if spec.metrics:
        write_metrics_table(spec.metrics, spec.name, state["history"])
    summary["out"] = spec.out
    return summary


def _warn_if_streaming_starves(spec: TrainSpec) -> None:
    """A warning, not an error: an autoscaling cluster may still grow to fit the request."""
    import ray

    have = ray.cluster_resources().get("CPU", 0.0)
    train_cpus = spec.workers * spec.data_parallel * spec.num_cpus_per_worker
    need = train_cpus + spec.harvest.workers * spec.harvest.num_cpus
    if need > have:
        print(f"ct-ray train: warning: the streamed harvest needs {spec.harvest.workers * spec.harvest.num_cpus:g} "
              f"CPUs beside training's {train_cpus:g}, and the cluster has {have:g}: it waits until more are free "
              f"(lower num_cpus_per_worker or harvest.num_cpus, or persist the harvest with harvest.out)",
              file=sys.stderr, flush=True)


def _check_init(spec: TrainSpec, model) -> None:
    from ..clt.io import load_clt

    clt = load_clt(spec.init_from)
    clt.check_model(model.n_layers, model.d_model)
    spans = [min(spec.clt.span or model.n_layers, model.n_layers - l) for l in range(model.n_layers)]
    if clt.d_tc != [spec.clt.n_features] * model.n_layers or clt.spans != spans or clt.activation != spec.clt.file_activation:
        raise CTRayError(f"init_from {spec.init_from}: its shape ({clt.d_tc[0]} features/layer, spans {clt.spans}, "
                         f"{clt.activation}) differs from clt: in the spec ({spec.clt.n_features}, spans {spans}, "
                         f"{spec.clt.file_activation})")


def held_out_tokens(spec: TrainSpec, model, n_tokens: int) -> torch.Tensor:
    """About n_tokens of held-out text [n, context_len]: the documents after the ones the spec harvests (the
    corpus order is fixed)."""
    from ..harvest.corpus import iter_documents, tokenize_contexts

    docs = _skip(iter_documents(spec.harvest.corpus, spec.harvest.text_column), _n_docs(spec, model))
    ctx = tokenize_contexts(model.tokenizer, docs, spec.harvest.context_len,
                            max(1, n_tokens // (spec.harvest.context_len - 1)))
    return torch.from_numpy(ctx.tokens).long()


def _n_docs(spec: TrainSpec, model) -> int:
    from ..harvest.pipeline import build_contexts

    return int(build_contexts(spec.harvest, model.tokenizer).doc.max()) + 1


def _skip(it, n: int):
    for i, x in enumerate(it):
        if i >= n:
            yield x
