"""ct_ray's CLT trainer against EleutherAI sparsify's transcoder trainer: same tokens, same budget, one evaluation.

    .venv/bin/python benchmarks/train_vs_sparsify.py run --budget 480 --k 32,64 --threads 2 \
        --json benchmarks/_work/train_vs_sparsify/results_480.json      # the 8-minute comparison (~40 min in all)
    .venv/bin/python benchmarks/train_vs_sparsify.py run --budget 900 --k 32,64 --threads 2 \
        --json benchmarks/_work/train_vs_sparsify/results_900.json      # the 15-minute one (the cache is reused)
    ... --ct-read-point mlp_in --ct-opt auxk_alpha=0.03125 --ct-opt dead_tokens=16384
                                       # ct_ray's recipe of RESULTS.md: BatchTopK on the MLP input, AuxK on
    ... --lambdas 0.04,0.028           # plus ct_ray's JumpReLU recipe at these λ (the issue's first table)
    ... --sparsify-data live           # sparsify re-running SmolLM2 every step instead of reading the cache
    ... --ct-read-point mlp_in         # ct_ray reading the same point as sparsify
    smoke test (about 2 minutes): run --work /tmp/tvs_smoke --tokens 3000 --eval-tokens 512 --budget 15 --k 16 \
        --threads 1
    .venv/bin/python benchmarks/train_vs_sparsify.py install      # only the sparsify venv
    .venv/bin/python benchmarks/train_vs_sparsify.py harvest      # only the cached activations
    .venv/bin/python benchmarks/train_vs_sparsify.py table        # re-print the table of the last results JSON

What is held equal (issue 26, item 1):
- Model and layers: SmolLM2-135M (`smollm2-135m`, the offline built-in, never a hub download), layers 4, 6, 15, 25
  (`--layers`); per-layer transcoders (ct_ray `span: 1`), `--latents` (2048) per layer.
- Tokens: ONE harvest, cached once under `--work` and read by both tools: the contexts ct_ray's `build_contexts` makes
  for `--corpus` (wiki-summaries, bbc-news), `--context-len` 64, `--tokens` (48,000); BOS and outlier positions
  dropped exactly as ct_ray's harvest does (`training_mask` on the resid_mid norms of all 30 layers), so both tools
  train on the same token positions. Held-out: `--eval-tokens` from the documents after the harvested ones
  (`ct_ray.train.run.held_out_tokens`), same mask.
- Hook points: y is `mlp_out` for both. ct_ray reads `resid_mid` (the residual before the MLP's RMSNorm; its own
  scaling, no model norm), sparsify reads `mlp_in` (the MLP module's input, after the RMSNorm and its weight), what
  sparsify's hook `layers.{l}.mlp` sees with `transcode=True` on the live model. `--ct-read-point mlp_in` trains
  ct_ray on the MLP input too (the point-for-point comparison); the affine baseline is fitted for both read points.
- Threads (`--threads`, torch and OpenMP, for each tool's subprocess) and the wall-clock budget of the training loop
  (`--budget` seconds; runs one after another, ct_ray and sparsify alternating per sparsity level).
- Tokens per optimiser step (`--batch-tokens`, default 512 for both; `--sparsify-batch-tokens` overrides sparsify's).

How each tool trains:
- ct_ray: its trainer's own step (`ct_ray.train.shard.Shard.step`: loss, backward, clipping, fused Adam, sparse
  decoder) and data feed (`StoreFeed` over a ct_ray activation store written from the cache), in one process (the
  one-process path of `ct_ray.train.local`; Ray Train adds nothing with one worker). TopK / BatchTopK
  (`--ct-activation`, k = the level) or JumpReLU with `--lambdas`; `--ct-opt KEY=VALUE` sets any `OptimSpec` field
  (AuxK: `auxk_alpha`, `dead_tokens`). ct_ray's schedules are in steps; here the total
  is re-estimated every step from the elapsed fraction of the budget, so the λ ramp and the final learning-rate
  decay follow wall time.
  Evaluated as exported: a JumpReLU with the thresholds ct_ray's export writes (`fvu_topk_codes_per_layer` in the
  JSON, and a line under the table: the training-time TopK codes on the same tokens).
- sparsify: `eai-sparsify==1.3.3` in its own venv (`--sparsify-venv`, default benchmarks/.venv-sparsify, git-ignored;
  `install` creates it: CPU torch, sparsify with `--no-deps`, then the packages its modules import, with theirs),
  called as a library from a subprocess (no sparsify code in ct_ray). Its own `Trainer.fit` (defaults: TopK
  transcoder, zero decoder init, data-mean biases, Signum + schedule-free, AuxK off) on the SAME cached activations:
  sparsify's API has no cached-activation input, so the subprocess hands `Trainer` a stand-in "model" whose module
  `layers.{l}.mlp` returns the cached `mlp_out` for the cached `mlp_in` of the batch's token rows (`input_ids` are
  row indices into the cache; a batch is `--batch-tokens` / 64 rows of 64 token indices, reshuffled over the whole
  cache every epoch); the Trainer hooks it exactly as it hooks a real MLP. The budget ends the data loader (the
  dataset raises StopIteration once it is spent), after which `fit` saves its checkpoint (schedule-free's averaged
  weights), which is what gets evaluated (sparsify's own `SparseCoder.forward`). So the comparison is about the
  recipe, not about sparsify 1.3.3 re-running the model every step (which the issue's first measurement included).
  `--sparsify-data live` is that other setting: sparsify's Trainer runs the real SmolLM2 (the same converted
  safetensors directory ct_ray loads) on the same harvested contexts in a shuffled order, BOS excluded through
  `exclude_tokens`; it cannot drop the outlier-norm tokens ct_ray drops (a handful per thousand).
- Affine baseline: `y ≈ W x + b` per layer, closed-form least squares (float64 normal equations) on all cached
  training tokens, for each read point.

Evaluation (one function for every row, in this process, on the cached held-out tokens): FVU per layer of
`mlp_out` (Σ‖ŷ − y‖² / Σ‖y − ȳ‖²), mean over layers, L0 (active latents per token and layer), dead fraction
(latents active on none of the training and held-out tokens; `dead_heldout_only_frac`: none of the held-out ones),
training tokens/s (token visits per second of the training loop) and
wall (the training loop's seconds; `total_s` in the JSON is the whole subprocess).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SPARSIFY = "eai-sparsify==1.3.3"
# what sparsify's modules import (its METADATA's Requires-Dist), pinned where the main venv has the same package
SPARSIFY_IMPORTS = ["accelerate==1.15.0", "datasets", "einops", "natsort", "safetensors==0.8.0", "schedulefree",
                    "simple-parsing", "transformers==5.24.0", "huggingface_hub==2.4.0", "numpy==2.4.6"]


# ------------------------------------------------------------------------------------------------ set-up
def ensure_sparsify_venv(venv: Path, torch_spec: str) -> Path:
    """The sparsify venv (created once): CPU torch, eai-sparsify --no-deps, the packages its modules import."""
    py = venv / "bin" / "python"
    check = "import sparsify; assert sparsify.__version__ == '1.3.3', sparsify.__version__"
    if py.exists() and subprocess.run([str(py), "-I", "-c", check], capture_output=True).returncode == 0:
        return py
    print(f"installing {SPARSIFY} into {venv}", flush=True)
    subprocess.check_call([sys.executable, "-m", "venv", str(venv)])
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.check_call([*pip, *torch_spec.split()])  # first: the others then find torch satisfied
    subprocess.check_call([*pip, "--no-deps", SPARSIFY])
    subprocess.check_call([*pip, *SPARSIFY_IMPORTS])
    subprocess.check_call([str(py), "-I", "-c", check])
    return py


def data_dir(work: Path) -> Path:
    return work / "data"


def harvest(args) -> dict:
    """Cache x at resid_mid and mlp_in and y = mlp_out of the chosen layers for the training and held-out tokens."""
    from ct_ray import load_model
    from ct_ray.harvest.activations import harvest_batch, training_mask
    from ct_ray.harvest.pipeline import build_contexts
    from ct_ray.models.hooks import Hooks
    from ct_ray.specs import HarvestSpec, TrainSpec
    from ct_ray.train.run import held_out_tokens

    d = data_dir(args.work)
    layers = [int(x) for x in args.layers.split(",")]
    meta = {"version": 2, "model": args.model, "corpus": args.corpus.split(","), "context_len": args.context_len,
            "n_tokens_requested": args.tokens, "eval_tokens_requested": args.eval_tokens, "layers": layers,
            "mask": "ct_ray training_mask on resid_mid (BOS position and >10x-median-norm tokens dropped)"}
    try:
        done = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError):
        done = None
    if done is not None:
        diff = [f"{k} {done.get(k)!r} -> {v!r}" for k, v in meta.items() if done.get(k) != v]
        if not diff:
            return done
        if args.what != "harvest":  # a run never silently replaces a cache that took minutes (or more) to build
            sys.exit(f"train_vs_sparsify: {d} caches another harvest ({', '.join(diff)}): run `harvest` with "
                     f"these options to replace it, or pass another --work")
    d.mkdir(parents=True, exist_ok=True)
    import shutil

    for old in args.work.glob("ct_store_*"):  # ct_ray stores written from an earlier cache
        shutil.rmtree(old)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = load_model(args.model)
    spec = HarvestSpec(model=args.model, corpus=meta["corpus"], context_len=args.context_len, n_tokens=args.tokens)
    ctx = build_contexts(spec, model.tokenizer)
    sources = {"train": (torch.from_numpy(ctx.tokens).long(), ctx.doc, ctx.offset),
               "eval": (held_out_tokens(TrainSpec(harvest=spec), model, args.eval_tokens), None, None)}
    for split, (tokens, doc, off) in sources.items():
        out = {"x_resid_mid": [], "x_mlp_in": [], "y": [], "doc": [], "pos": []}
        for i in range(0, len(tokens), 8):
            t = tokens[i : i + 8]
            mid: dict[int, torch.Tensor] = {}
            with Hooks(model) as h:  # the MLP input (after the pre-norm) beside harvest_batch's resid_mid/mlp_out
                for l in layers:
                    h.on("mlp_in", lambda x, l=l, mid=mid: mid.__setitem__(l, x), layer=l)
                x, y = harvest_batch(model, t, "resid_mid")
            m = training_mask(x)  # ct_ray's harvest: BOS and outlier tokens out, from all layers' resid_mid norms
            b, p = torch.nonzero(m, as_tuple=True)
            out["x_resid_mid"].append(x[b, p][:, layers].float())
            out["x_mlp_in"].append(torch.stack([mid[l] for l in layers], 2)[b, p].float())
            out["y"].append(y[b, p][:, layers].float())
            if doc is not None:
                out["doc"].append(doc[i : i + 8][b.numpy()])
                out["pos"].append(off[i : i + 8][b.numpy()] + p.numpy())
        for k, v in out.items():
            if v:
                arr = torch.cat(v).numpy() if isinstance(v[0], torch.Tensor) else np.concatenate(v).astype(np.int32)
                np.save(d / f"{split}_{k}.npy", arr)
        meta[f"{split}_contexts"] = len(tokens)
        meta[f"{split}_positions"] = int(sum(len(v) for v in out["y"]))
        print(f"harvest {split}: {len(tokens)} contexts -> {meta[f'{split}_positions']} positions "
              f"({time.time() - t0:.0f} s)", flush=True)
    np.save(d / "train_tokens.npy", sources["train"][0].numpy().astype(np.int32))  # for sparsify's live mode
    meta["bos_id"] = int(sources["train"][0][0, 0])
    from ct_ray.models.loading import BUILTIN_MODELS, builtin_dir

    meta["model_dir"] = str(builtin_dir(args.model) if args.model in BUILTIN_MODELS else Path(args.model).resolve())
    meta["d_model"] = model.d_model
    meta["harvest_s"] = time.time() - t0
    (d / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def load_split(work: Path, split: str, what: str, mmap: bool = False) -> np.ndarray:
    return np.load(data_dir(work) / f"{split}_{what}.npy", mmap_mode="r" if mmap else None)


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate(y: np.ndarray, y_hat: np.ndarray, l0: np.ndarray | None, fired: np.ndarray | None,
             fired_train: np.ndarray | None = None) -> dict:
    """The one evaluation of every row. y, y_hat [n, L, d]; l0 [n, L] active latents per token; fired, fired_train
    [L, F]: latents active on some held-out / training token. Dead: active on none of either."""
    y64, e = torch.from_numpy(np.asarray(y)).double(), torch.from_numpy(np.asarray(y_hat)).double()
    err = (e - y64).pow(2).sum(-1).sum(0)
    var = (y64 - y64.mean(0)).pow(2).sum(-1).sum(0).clamp_min(1e-12)
    f = (err / var).tolist()
    out = {"fvu_per_layer": f, "fvu": float(np.mean(f)), "eval_positions": int(y.shape[0])}
    if l0 is not None:
        per = np.asarray(l0, np.float64).mean(0)
        out |= {"l0_per_layer": per.tolist(), "l0": float(per.mean())}
    if fired is not None:
        held = 1.0 - np.asarray(fired, np.float64).mean(-1)
        both = np.asarray(fired, bool) | (np.asarray(fired_train, bool) if fired_train is not None else False)
        dead = 1.0 - both.astype(np.float64).mean(-1)
        out |= {"dead_per_layer": dead.tolist(), "dead_frac": float(dead.mean()),
                "dead_heldout_only_frac": float(held.mean())}
    return out


def affine_baseline(work: Path, read_point: str) -> dict:
    """Closed-form least squares y ≈ W x + b per layer on all training tokens (float64 normal equations)."""
    t0 = time.time()
    x, y = load_split(work, "train", f"x_{read_point}", True), load_split(work, "train", "y", True)
    xe, ye = load_split(work, "eval", f"x_{read_point}"), load_split(work, "eval", "y")
    n, L, d = x.shape
    y_hat = np.empty_like(ye)
    nt = min(4096, n)
    y_hat_train = np.empty((nt, L, d), np.float32)
    for l in range(L):
        A = torch.zeros(d + 1, d + 1, dtype=torch.float64)
        B = torch.zeros(d + 1, d, dtype=torch.float64)
        for i in range(0, n, 8192):
            xa = torch.from_numpy(np.ascontiguousarray(x[i : i + 8192, l])).double()
            xa = torch.cat([xa, torch.ones(len(xa), 1, dtype=torch.float64)], 1)
            A += xa.T @ xa
            B += xa.T @ torch.from_numpy(np.ascontiguousarray(y[i : i + 8192, l])).double()
        A += 1e-8 * A.diagonal().mean() * torch.eye(d + 1, dtype=torch.float64)  # numerically safe, not a prior
        w = torch.linalg.solve(A, B)
        xe1 = torch.cat([torch.from_numpy(xe[:, l]).double(), torch.ones(len(xe), 1, dtype=torch.float64)], 1)
        y_hat[:, l] = (xe1 @ w).float().numpy()
        xt1 = torch.cat([torch.from_numpy(np.array(x[:nt, l])).double(), torch.ones(nt, 1, dtype=torch.float64)], 1)
        y_hat_train[:, l] = (xt1 @ w).float().numpy()
    tr = evaluate(y[:nt], y_hat_train, None, None)
    return {"tool": "affine", "read_point": read_point, "level": "-", "train_tokens": n,
            "fit_s": time.time() - t0, **evaluate(ye, y_hat, None, None), "train_fvu": tr["fvu"],
            "train_fvu_per_layer": tr["fvu_per_layer"]}


# ------------------------------------------------------------------------------------------------ ct_ray worker
def ensure_ct_store(work: Path, read_point: str) -> str:
    """A ct_ray activation store (shards + manifest) of the cached training tokens at `read_point`."""
    from ct_ray.harvest.shards import MANIFEST, write_manifest, write_shard

    url = str(work / f"ct_store_{read_point}")
    if (Path(url) / MANIFEST).exists():
        return url
    x, y = load_split(work, "train", f"x_{read_point}", True), load_split(work, "train", "y", True)
    doc, pos = load_split(work, "train", "doc"), load_split(work, "train", "pos")
    entries = []
    for i in range(0, len(x), 4096):
        entries.append(write_shard(url, f"{i:09d}", torch.from_numpy(np.array(x[i : i + 4096])),
                                   torch.from_numpy(np.array(y[i : i + 4096])), doc[i : i + 4096], pos[i : i + 4096]))
    write_manifest(url, entries, {"read_point": read_point, "dtype": "float32", "source": "train_vs_sparsify cache"})
    return url


def ct_worker(cfg: dict) -> dict:
    from ct_ray.clt.training import fvu as batch_fvu
    from ct_ray.clt.training import topk_mask
    from ct_ray.specs import OptimSpec
    from ct_ray.train.data import StoreFeed
    from ct_ray.train.shard import Layout, Shard

    t_start = time.time()
    torch.set_num_threads(cfg["threads"])
    work, rp = Path(cfg["work"]), cfg["read_point"]
    url = ensure_ct_store(work, rp)
    meta = json.loads((data_dir(work) / "meta.json").read_text())
    L, d = len(meta["layers"]), meta["d_model"]
    topk = cfg["activation"] in ("topk", "batchtopk")
    optim = OptimSpec(steps=10**9, batch_tokens=cfg["batch_tokens"], lr=cfg["lr"],
                      lambda_final=0.0 if topk else cfg["lambda"], lambda_ramp_frac=cfg["lambda_ramp_frac"],
                      shuffle_buffer_tokens=cfg["shuffle_buffer_tokens"], seed=cfg["seed"],
                      **cfg.get("optim_opts", {}))
    shard = Shard(Layout(L, d, cfg["latents"], 1, cfg["activation"], rp, k=cfg["k"] if topk else None), optim)
    feed = StoreFeed(url, optim.batch_tokens, optim.seed, optim.shuffle_buffer_tokens)
    sx, sy = feed.scales(d)
    shard.init_from_data(feed.first_global_batch()[0] * sx[:, None])
    budget, total, last = cfg["budget"], 10**9, {}
    t0 = time.perf_counter()
    for x, y in feed.batches():
        el = time.perf_counter() - t0
        if el >= budget:
            break
        if shard.step_no:  # schedules in steps, total re-estimated from the elapsed share of the budget
            total = max(shard.step_no + 1, round(shard.step_no * budget / el))
        ys = y * sy[:, None]
        stats = shard.step(x * sx[:, None], ys, total)
        if shard.step_no % cfg["log_every"] == 0:
            last = shard.metrics(stats, ys)
            print(f"[ct_ray] step {shard.step_no} ({el:.0f}/{budget:.0f} s) batch fvu {last['fvu']:.3f} "
                  f"l0 {last['l0'] / L:.1f}/layer dead(EMA) {last['dead_frac']:.3f}", flush=True)
    train_s = time.perf_counter() - t0
    clt = shard.clt
    xe = torch.from_numpy(load_split(work, "eval", f"x_{rp}"))
    y_hat, l0, fired, y_hat_topk = [], [], [], []
    with torch.no_grad():
        for l in range(L):
            xs = xe[:, l] * sx[l]
            a = clt.encode(l, xs)  # as exported: JumpReLU with the thresholds ct_ray writes (TopK: its estimate)
            y_hat.append((a @ clt.W_dec[l][:, 0] + clt.b_dec[l]) / sy[l])
            l0.append((a > 0).sum(-1))
            fired.append((a > 0).any(0))
            if topk:  # the training-time codes, for reference
                h = clt.pre_activation(l, xs)
                keep, _ = topk_mask(h, cfg["activation"], cfg["k"])
                y_hat_topk.append(((h * keep) @ clt.W_dec[l][:, 0] + clt.b_dec[l]) / sy[l])
        xt = load_split(work, "train", f"x_{rp}", True)
        fired_train = torch.zeros(L, cfg["latents"], dtype=torch.bool)
        y_hat_train = []
        for i in range(0, len(xt), 4096):
            xc = torch.from_numpy(np.array(xt[i : i + 4096]))
            for l in range(L):
                a = clt.encode(l, xc[:, l] * sx[l])
                fired_train[l] |= (a > 0).any(0)
                if i == 0:  # the first training tokens: train-set FVU (overfitting)
                    y_hat_train.append((a @ clt.W_dec[l][:, 0] + clt.b_dec[l]) / sy[l])
    extra = {}
    if topk:
        ye = torch.from_numpy(load_split(work, "eval", "y"))
        extra["fvu_topk_codes_per_layer"] = batch_fvu(torch.stack(y_hat_topk, 1), ye).tolist()
    return {"steps": shard.step_no, "train_tokens_seen": shard.step_no * optim.batch_tokens, "train_s": train_s,
            "tokens_per_s": shard.step_no * optim.batch_tokens / max(train_s, 1e-9),
            "last_batch": {k: last.get(k) for k in ("fvu", "fvu_per_layer", "l0_per_layer", "dead_frac")},
            "total_s": time.time() - t_start, **extra,
            "_pred": (torch.stack(y_hat, 1).numpy(), torch.stack(l0, 1).numpy(), torch.stack(fired).numpy(),
                      fired_train.numpy(), torch.stack(y_hat_train, 1).numpy())}


# ------------------------------------------------------------------------------------------------ sparsify worker
def sparsify_worker(cfg: dict) -> dict:
    """Runs in the sparsify venv (imports nothing of ct_ray)."""
    import sparsify
    from sparsify import SparseCoder, TrainConfig, Trainer, TranscoderConfig
    from torch import nn
    from torch.utils.data import Dataset

    t_start = time.time()
    torch.set_num_threads(cfg["threads"])
    work = Path(cfg["work"])
    layers = json.loads((data_dir(work) / "meta.json").read_text())["layers"]
    x = torch.from_numpy(load_split(work, "train", "x_mlp_in"))  # [N, L, d]
    y = torch.from_numpy(load_split(work, "train", "y"))
    seq = cfg["seq"]
    rows_per_batch = max(1, cfg["batch_tokens"] // seq)

    class Lookup(nn.Module):  # stands for layers.{l}.mlp: input the cached mlp_in, output the cached mlp_out
        def __init__(self, j):
            super().__init__()
            self.j = j

        def forward(self, x_in):
            return y[self.idx, self.j]

    class Block(nn.Module):
        def __init__(self, j):
            super().__init__()
            self.mlp = Lookup(j)

    class Replay(nn.Module):
        """What sparsify's Trainer needs of a model: named modules to hook, `device`, `dummy_inputs`, a forward."""

        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleDict({str(l): Block(j) for j, l in enumerate(layers)})

        base_model = property(lambda self: self)
        device = property(lambda self: torch.device("cpu"))
        dummy_inputs = property(lambda self: {"input_ids": torch.zeros(1, 1, dtype=torch.long)})

        def forward(self, input_ids):  # input_ids [B, T]: row indices into the cache
            for j, block in enumerate(self.layers.values()):
                block.mlp.idx = input_ids
                block.mlp(x[input_ids, j])

    class Contexts(Dataset):
        """Live mode: the harvested contexts (BOS first) in a shuffled order per epoch; stops at the deadline."""

        def __init__(self):
            self.tokens = torch.from_numpy(load_split(work, "train", "tokens")).long()
            self.deadline, self._perm = float("inf"), {}

        def __len__(self):
            return len(self.tokens) * 10_000

        def __getitem__(self, i):
            e, r = divmod(i, len(self.tokens))
            if e not in self._perm:
                self._perm = {e: np.random.default_rng([cfg["seed"], e]).permutation(len(self.tokens))}
            return {"input_ids": self.tokens[int(self._perm[e][r])]}

        def __getitems__(self, idx):
            if time.perf_counter() >= self.deadline:
                raise StopIteration
            return [self[i] for i in idx]

    class Rows(Dataset):
        """Epochs of the cached tokens, shuffled per epoch, as rows of `seq` token indices; stops at the deadline."""

        def __init__(self):
            self.rows, self.deadline, self._perm = len(x) // seq, float("inf"), {}

        def __len__(self):
            return self.rows * 10_000

        def perm(self, epoch):
            if epoch not in self._perm:
                p = np.random.default_rng([cfg["seed"], epoch]).permutation(len(x))[: self.rows * seq]
                self._perm = {epoch: torch.from_numpy(p.reshape(self.rows, seq)).long()}
            return self._perm[epoch]

        def __getitem__(self, i):
            return {"input_ids": self.perm(i // self.rows)[i % self.rows]}

        def __getitems__(self, idx):  # the DataLoader's batched fetch: StopIteration ends Trainer.fit's loop
            if time.perf_counter() >= self.deadline:
                raise StopIteration
            return [self[i] for i in idx]

    live = cfg["data"] == "live"
    if live:  # the real model, run by sparsify's Trainer every step; its hooks see every non-BOS token of a context
        from transformers import AutoModelForCausalLM

        meta = json.loads((data_dir(work) / "meta.json").read_text())
        seq = meta["context_len"]
        rows_per_batch = max(1, cfg["batch_tokens"] // seq)
        cfg["sparsify_opts"].setdefault("exclude_tokens", [meta["bos_id"]])
    opts = {"optimizer": "signum", **cfg["sparsify_opts"]}
    tc = TrainConfig(TranscoderConfig(num_latents=cfg["latents"], k=cfg["k"]), batch_size=rows_per_batch,
                     hookpoints=[f"layers.{l}.mlp" for l in layers], log_to_wandb=False, save_every=10**9,
                     save_dir=str(Path(cfg["out"]) / "sparsify"), run_name="run", **opts)
    if live:
        data = Contexts()
        model = AutoModelForCausalLM.from_pretrained(meta["model_dir"], dtype=torch.float32, use_safetensors=True)
    else:
        data, model = Rows(), Replay()
    trainer = Trainer(tc, data, model)
    data.deadline = time.perf_counter() + cfg["budget"]
    t0 = time.perf_counter()
    trainer.fit()  # ends with its own save (schedule-free: the averaged weights)
    train_s = time.perf_counter() - t0
    xe = torch.from_numpy(load_split(work, "eval", "x_mlp_in"))
    y_hat, l0, fired, fired_train, y_hat_train = [], [], [], [], []
    with torch.no_grad():
        for j, l in enumerate(layers):
            sae = SparseCoder.load_from_disk(Path(tc.save_dir) / "run" / f"layers.{l}.mlp")
            out = sae(xe[:, j])
            y_hat.append(out.sae_out.float())
            on = out.latent_acts > 0
            l0.append(on.sum(-1))
            f = torch.zeros(sae.num_latents, dtype=torch.bool)
            f[out.latent_indices[on]] = True
            fired.append(f)
            ft = torch.zeros(sae.num_latents, dtype=torch.bool)
            for i in range(0, len(x), 4096):
                enc = sae.encode(x[i : i + 4096, j])
                ft[enc.top_indices[enc.top_acts > 0]] = True
            fired_train.append(ft)
            y_hat_train.append(sae(x[:4096, j]).sae_out.float())  # the first training tokens: train-set FVU
    toks = trainer.global_step * rows_per_batch * (seq - 1 if live else seq)  # live: BOS excluded
    return {"steps": trainer.global_step, "train_tokens_seen": toks, "train_s": train_s,
            "tokens_per_s": toks / max(train_s, 1e-9), "config": {**opts, "batch_rows": rows_per_batch, "seq": seq},
            "versions": {"sparsify": sparsify.__version__, "torch": torch.__version__},
            "total_s": time.time() - t_start,
            "_pred": (torch.stack(y_hat, 1).numpy(), torch.stack(l0, 1).numpy(), torch.stack(fired).numpy(),
                      torch.stack(fired_train).numpy(), torch.stack(y_hat_train, 1).numpy())}


def worker_main(which: str, cfg_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text())
    res = (ct_worker if which == "_ct-worker" else sparsify_worker)(cfg)
    y_hat, l0, fired, fired_train, y_hat_train = res.pop("_pred")
    np.savez(Path(cfg["out"]) / "pred.npz", y_hat=y_hat, l0=l0, fired=fired, fired_train=fired_train,
             y_hat_train=y_hat_train)
    (Path(cfg["out"]) / "result.json").write_text(json.dumps(res, indent=1))


# ------------------------------------------------------------------------------------------------ driver
def run_one(args, tool: str, level, py: Path) -> dict:
    if tool == "ct_ray":
        name = f"ct_ray-{args.ct_activation}{level}" if isinstance(level, int) else f"ct_ray-jumprelu-l{level}"
        name += f"-{args.ct_read_point}" + "".join(f"-{k}{v}" for k, v in args.ct_opt)
    else:
        name = f"sparsify-k{level}-{args.sparsify_data}"
    out = args.work / "runs" / name
    out.mkdir(parents=True, exist_ok=True)
    for f in ("pred.npz", "result.json"):
        (out / f).unlink(missing_ok=True)
    cfg = {"work": str(args.work), "out": str(out), "threads": args.threads, "budget": args.budget,
           "latents": args.latents, "seed": args.seed}
    if tool == "ct_ray":
        act = args.ct_activation if isinstance(level, int) else "jumprelu"
        cfg |= {"read_point": args.ct_read_point, "activation": act, "k": level if isinstance(level, int) else None,
                "lambda": level if not isinstance(level, int) else 0.0, "lr": args.ct_lr,
                "lambda_ramp_frac": args.ct_lambda_ramp_frac, "batch_tokens": args.batch_tokens,
                "shuffle_buffer_tokens": args.ct_shuffle_buffer, "log_every": args.log_every,
                "optim_opts": dict(args.ct_opt)}
        exe, which, rp = sys.executable, "_ct-worker", args.ct_read_point
    else:
        cfg |= {"k": level, "seq": 64, "data": args.sparsify_data, "sparsify_opts": dict(args.sparsify_opt),
                "batch_tokens": args.sparsify_batch_tokens or args.batch_tokens}
        exe, which, rp = str(py), "_sparsify-worker", "mlp_in"
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TQDM_MININTERVAL": "60",
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "SPARSIFY_DISABLE_TRITON": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    print(f"--- {name}: {args.budget:.0f} s budget, {args.threads} thread(s)", flush=True)
    t0 = time.time()
    subprocess.run([exe, "-I", str(Path(__file__).resolve()), which, str(out / "config.json")], env=env, cwd=ROOT,
                   check=True, timeout=args.budget + args.grace)
    res = json.loads((out / "result.json").read_text())
    p = np.load(out / "pred.npz")
    ev = evaluate(load_split(args.work, "eval", "y"), p["y_hat"], p["l0"], p["fired"], p["fired_train"])
    yt = load_split(args.work, "train", "y", True)[: len(p["y_hat_train"])]
    tr = evaluate(yt, p["y_hat_train"], None, None)
    ev |= {"train_fvu": tr["fvu"], "train_fvu_per_layer": tr["fvu_per_layer"]}
    row = {"tool": tool if tool == "ct_ray" else f"sparsify {args.sparsify_data}", "read_point": rp,
           "options": dict(args.ct_opt) if tool == "ct_ray" else dict(args.sparsify_opt),
           "level": (f"k {level}" if isinstance(level, int) else f"λ {level}"),
           "activation": cfg.get("activation", "topk"), "wall_s": res["train_s"], "process_s": time.time() - t0,
           **res, **ev}
    print(fmt_row(row, len(ev["fvu_per_layer"])), flush=True)
    return row


def fmt_row(r: dict, L: int) -> str:
    f = " / ".join(f"{v:.3f}" for v in r["fvu_per_layer"])
    l0 = f"{r['l0']:.1f}" if "l0" in r else "-"
    dead = f"{100 * r['dead_frac']:.1f}%" if "dead_frac" in r else "-"
    tps = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-"
    wall = f"{r['wall_s']:.0f} s" if "wall_s" in r else "-"
    tool = f"{r['tool']} ({r.get('activation', '')}{', ' if r.get('activation') else ''}{r['read_point']})" \
        if r["tool"] != "affine" else f"affine ({r['read_point']})"
    return f"| {tool} | {r['level']} | {f} | {r['fvu']:.3f} | {l0} | {dead} | {tps} | {wall} |"


def print_table(res: dict) -> None:
    layers = res["meta"]["layers"]
    print(f"\nheld-out: {res['meta']['eval_positions']} positions; training: {res['meta']['train_positions']} "
          f"positions; {res['args']['latents']} latents/layer; {res['args']['threads']} thread(s); budget "
          f"{res['args']['budget']:.0f} s per run")
    print(f"| tool | k or λ | FVU {' / '.join(f'L{l}' for l in layers)} | mean | L0 | dead | tokens/s | wall |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in res["rows"]:
        print(fmt_row(r, len(layers)))
    for r in res["rows"]:
        if "fvu_topk_codes_per_layer" in r:
            f = r["fvu_topk_codes_per_layer"]
            print(f"{r['tool']} {r['level']}: FVU with the training-time {r['activation']} codes instead of the "
                  f"exported JumpReLU: {' / '.join(f'{v:.3f}' for v in f)} (mean {np.mean(f):.3f})")
    print("train-set FVU (first 4,096 training positions), against held-out: " + "; ".join(
        f"{r['tool']} ({r['read_point']}) {r['level']} {r['train_fvu']:.3f} vs {r['fvu']:.3f}".replace(" -", "")
        for r in res["rows"] if "train_fvu" in r))
    print("dead: latents active on none of the training and held-out tokens; wall: the training loop; tokens/s: "
          "training token visits per second")


def main_run(args) -> None:
    py = ensure_sparsify_venv(args.sparsify_venv, args.torch_spec) if "sparsify" in args.tools else None
    meta = harvest(args)
    print(f"cache: {meta['train_positions']} training / {meta['eval_positions']} held-out positions, layers "
          f"{meta['layers']}", flush=True)
    rows = [affine_baseline(args.work, rp) for rp in ("resid_mid", "mlp_in")]
    for r in rows:
        print(fmt_row(r, len(meta["layers"])), flush=True)
    plan = []
    for i, k in enumerate(int(v) for v in args.k.split(",") if v):
        pair = [t for t in ("ct_ray", "sparsify") if t in args.tools]
        plan += [(t, k) for t in (pair if i % 2 == 0 else pair[::-1])]  # interleaved: neither always goes first
    if "ct_ray" in args.tools:
        plan += [("ct_ray", float(v)) for v in args.lambdas.split(",") if v]
    res = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "meta": {k: meta.get(k) for k in ("layers", "model", "corpus", "context_len", "bos_id")}
           | {"train_positions": meta["train_positions"], "eval_positions": meta["eval_positions"]},
           "hook_points": {"ct_ray": f"{args.ct_read_point} (x) -> mlp_out (y)",
                           "sparsify": "mlp_in = input of layers.{l}.mlp, after the RMSNorm (x) -> mlp_out (y)"},
           "sparsify_data": {"cached": "the same cached activations as ct_ray's, through sparsify's Trainer",
                             "live": "sparsify's Trainer running the model on the same contexts every step"}[
                                 args.sparsify_data],
           "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "torch": torch.__version__,
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip(), "rows": rows}
    json_path = args.json or args.work / "results.json"
    for tool, level in plan:
        res["rows"].append(run_one(args, tool, level, py))
        Path(json_path).write_text(json.dumps(res, indent=1))  # after every run: a killed series keeps its rows
    Path(json_path).write_text(json.dumps(res, indent=1))
    print_table(res)
    print(f"\nJSON: {json_path}")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] in ("_ct-worker", "_sparsify-worker"):
        worker_main(sys.argv[1], sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["run", "install", "harvest", "table"])
    ap.add_argument("--work", type=Path, default=HERE / "_work" / "train_vs_sparsify")
    ap.add_argument("--json", type=Path, default=None, help="results JSON (default <work>/results.json)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default="4,6,15,25")
    ap.add_argument("--corpus", default="wiki-summaries,bbc-news")
    ap.add_argument("--context-len", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=48_000, help="tokens to harvest (before BOS/outliers are dropped)")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--latents", type=int, default=2048, help="latents per layer, both tools")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=480.0, help="seconds of training loop per run")
    ap.add_argument("--grace", type=float, default=900.0, help="a run's subprocess is killed after budget + grace")
    ap.add_argument("--k", default="32,64", help="sparsity levels: k of sparsify's TopK and of ct_ray's TopK")
    ap.add_argument("--lambdas", default="", help="extra ct_ray JumpReLU runs at these λ (comma-separated)")
    ap.add_argument("--tools", default="ct_ray,sparsify")
    ap.add_argument("--batch-tokens", type=int, default=512, help="tokens per optimiser step, both tools")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ct-activation", default="batchtopk", choices=["topk", "batchtopk"])
    ap.add_argument("--ct-read-point", default="resid_mid", choices=["resid_mid", "mlp_in"])
    ap.add_argument("--ct-lr", type=float, default=0.003)
    ap.add_argument("--ct-lambda-ramp-frac", type=float, default=0.3)
    ap.add_argument("--ct-shuffle-buffer", type=int, default=8192)
    ap.add_argument("--sparsify-batch-tokens", type=int, default=None)
    ap.add_argument("--sparsify-data", default="cached", choices=["cached", "live"],
                    help="cached: the same cached activations as ct_ray (the recipe comparison); live: sparsify's "
                         "Trainer runs SmolLM2 on the same contexts every step (BOS excluded, outliers kept)")
    ap.add_argument("--ct-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="a ct_ray OptimSpec field (JSON value), e.g. auxk_alpha=0.03125 (repeatable)")
    ap.add_argument("--sparsify-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="a sparsify TrainConfig field, e.g. auxk_alpha=0.03125 or optimizer=adam (repeatable)")
    ap.add_argument("--sparsify-venv", type=Path, default=HERE / ".venv-sparsify")
    ap.add_argument("--torch-spec", default="torch==2.13.0", help="pip requirement of the sparsify venv's torch "
                    "(elsewhere e.g. 'torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu')")
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args()
    args.work = args.work.resolve()
    opts = []
    for kv in args.sparsify_opt:
        k, _, v = kv.partition("=")
        try:
            opts.append((k, json.loads(v)))
        except ValueError:
            opts.append((k, v))
    args.sparsify_opt = opts
    args.ct_opt = [(k, json.loads(v)) for k, _, v in (kv.partition("=") for kv in args.ct_opt)]
    if args.what == "install":
        print(ensure_sparsify_venv(args.sparsify_venv, args.torch_spec))
    elif args.what == "harvest":
        print(json.dumps(harvest(args), indent=1))
    elif args.what == "table":
        print_table(json.loads(Path(args.json or args.work / "results.json").read_text()))
    else:
        main_run(args)


if __name__ == "__main__":
    main()
