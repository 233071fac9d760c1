"""The Ray Train worker loop: feature-sharded CLT training with periodic checkpoints and resume."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..specs import TrainSpec
from .data import StoreFeed, StreamFeed, norm_scales
from .shard import Layout, Shard

CKPT_STATE = "state.json"


def shard_file(fp_idx: int, dp_idx: int) -> str:
    return f"shard_fp{fp_idx}_dp{dp_idx}.safetensors"


def _groups(fp: int, dp: int):
    """Process groups: ranks sharing a data replica (feature parallel) and ranks sharing a slice (data parallel).
    Every rank creates every group, in the same order, as torch.distributed requires."""
    if not dist.is_initialized():
        return None, None
    rank = dist.get_rank()
    fp_group = dp_group = None
    for d in range(dp):
        g = dist.new_group([d * fp + f for f in range(fp)])
        if rank // fp == d:
            fp_group = g
    for f in range(fp):
        g = dist.new_group([d * fp + f for d in range(dp)])
        if rank % fp == f:
            dp_group = g
    return fp_group, dp_group


def _broadcast_batch(x, y, shape, src: int, group, device):
    if x is None:
        x, y = torch.empty(shape, device=device), torch.empty(shape, device=device)
    else:
        x, y = x.to(device), y.to(device)
    dist.broadcast(x, src, group=group)
    dist.broadcast(y, src, group=group)
    return x, y


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from ..harvest.pipeline import quiet_ray_data

    quiet_ray_data()  # a streamed harvest executes in this worker: its INFO lines would drown the step lines
    # Ray Train logs each report at INFO on a root-level logger, which RunConfig's LoggingConfig does not cover
    logging.getLogger().setLevel(logging.WARNING)
    spec = TrainSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.get("pid_dir"):  # lets fault-injection tests find (and kill) this worker
        open(os.path.join(config["pid_dir"], f"{rank}-{os.getpid()}"), "w").close()
    fp, dp = spec.workers, spec.data_parallel
    assert world == fp * dp, (world, fp, dp)
    torch.manual_seed(spec.optim.seed)
    torch.set_num_threads(max(1, int(spec.num_cpus_per_worker)))
    # the same code on CPU workers (gloo) and GPU workers (nccl: every collective's tensors live on the GPU)
    device = ray.train.torch.get_device() if spec.use_gpu else torch.device("cpu")
    fp_group, dp_group = _groups(fp, dp)
    lay = Layout(config["n_layers"], config["d_model"], spec.clt.n_features, spec.clt.span, spec.clt.activation,
                 spec.harvest.read_point, fp, rank % fp, dp, rank // fp, spec.clt.k)
    shard = Shard(lay, spec.optim, config["model_name"], fp_group, dp_group, device)
    steps = spec.optim.steps
    shape = (spec.optim.batch_tokens, lay.n_layers, lay.d_model)

    # --- data ----------------------------------------------------------------------------------------
    if config.get("activations"):
        feed = StoreFeed(config["activations"], spec.optim.batch_tokens, spec.optim.seed,
                         spec.optim.shuffle_buffer_tokens, dp, lay.dp_idx)
        sx, sy = (s.to(device) for s in feed.scales(lay.d_model))
        first = tuple(t.to(device) for t in feed.first_global_batch())
    else:  # streamed: the group's rank 0 reads the Ray Data stream and broadcasts
        feed = StreamFeed(ray.train.get_dataset_shard("train"), spec.optim.batch_tokens,
                          spec.optim.shuffle_buffer_tokens, spec.optim.seed) if rank == 0 else None
        first = next(feed.batches()) if rank == 0 else (None, None)
        if world > 1:
            first = _broadcast_batch(*first, shape, 0, None, device)
        first = tuple(t.to(device) for t in first)
        sx, sy = (s.to(device) for s in norm_scales(first[0].norm(dim=-1).mean(0).tolist(),
                                                    first[1].norm(dim=-1).mean(0).tolist(), lay.d_model))
        if world > 1:  # identical scales everywhere
            dist.broadcast(sx, 0)
            dist.broadcast(sy, 0)

    # --- resume or initialise ----------------------------------------------------------------------------
    history: list[dict] = []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            shard.load_state_tensors(load_file(os.path.join(d, shard_file(lay.fp_idx, lay.dp_idx))))
            state = json.load(open(os.path.join(d, CKPT_STATE)))
            history = state.get("history", [])
            sx, sy = torch.tensor(state["sx"], device=device), torch.tensor(state["sy"], device=device)
        print(f"[ct_ray train] rank {rank}: resumed at step {shard.step_no}", flush=True)
    elif spec.init_from:
        from ..clt.io import load_clt

        shard.init_from_clt(load_clt(spec.init_from), sx, sy)
    else:
        shard.init_from_data(first[0] * sx[:, None])

    def batches():
        if config.get("activations"):
            yield from feed.batches(skip=shard.step_no)
            return
        it = feed.batches(skip=shard.step_no) if rank == 0 else None
        while True:
            x, y = next(it) if rank == 0 else (None, None)
            if world > 1:
                x, y = _broadcast_batch(x, y, shape, 0, None, device)
            yield x, y

    t0, tok0 = time.time(), shard.step_no
    it = batches()
    while shard.step_no < steps:
        x, y = next(it)
        xs, ys = x.to(device) * sx[:, None], y.to(device) * sy[:, None]
        stats = shard.step(xs, ys, steps)
        done = shard.step_no
        report_metrics = done % spec.metrics_every == 0 or done == steps
        metrics = None
        if report_metrics:
            metrics = shard.metrics(stats, ys)
            rate = (done - tok0) * spec.optim.batch_tokens * dp / max(1e-9, time.time() - t0)
            metrics["tokens_per_s"] = rate
            history.append(metrics)
            if rank == 0:
                print(f"[ct_ray train] step {done}/{steps} fvu={metrics['fvu']:.3f} l0={metrics['l0']:.1f} "
                      f"dead={metrics['dead_frac']:.3f} {rate:.0f} tok/s", flush=True)
        if done % spec.checkpoint_every == 0 or done == steps:
            with tempfile.TemporaryDirectory() as d:
                save_file(shard.state_tensors(), os.path.join(d, shard_file(lay.fp_idx, lay.dp_idx)))
                if rank == 0:
                    with open(os.path.join(d, CKPT_STATE), "w") as f:
                        json.dump({"step": done, "sx": sx.tolist(), "sy": sy.tolist(), "history": history,
                                   "layout": vars(lay) | {"fp_idx": None, "dp_idx": None}}, f)
                ray.train.report({"step": done, **({k: v for k, v in (metrics or {}).items()
                                                    if not isinstance(v, list)})},
                                 checkpoint=ray.train.Checkpoint.from_directory(d))
        elif report_metrics:
            ray.train.report({k: v for k, v in metrics.items() if not isinstance(v, list)})
