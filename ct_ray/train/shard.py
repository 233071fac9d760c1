"""One worker's share of a feature-sharded CLT, and the step that trains it.

Feature parallelism: worker f of F owns features [lo_f, hi_f) of every layer (encoder rows, thresholds and their
decoder rows); each step it encodes and decodes its slice, one all-reduce sums the partial reconstructions, and the
MSE is computed on the sum (identical on every worker). The all-reduce's backward is the identity, as every worker
holds the full loss. Sparsity terms stay local: a worker's parameters only appear in its own terms.
Data parallelism: replicas of the same feature slice average their gradients.
The shard is plain torch; it runs without Ray (one process, groups None) as the reference for tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..clt.training import LossWeights, clt_loss, fvu, init_b_enc_from_data, init_clt
from ..clt.transcoder import CrossLayerTranscoder
from ..specs.train import TOPK_ACTIVATIONS


def feature_bounds(n_features: int, n_shards: int, shard: int) -> tuple[int, int]:
    per = -(-n_features // n_shards)
    return min(shard * per, n_features), min((shard + 1) * per, n_features)


class _SumAcross(torch.autograd.Function):
    """all-reduce(sum) forward, identity backward (every rank holds the same downstream loss)."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, g):
        return g, None


@dataclass
class Layout:
    n_layers: int
    d_model: int
    n_features: int
    span: int | None
    activation: str
    feature_input_hook: str
    fp: int = 1  # feature shards
    fp_idx: int = 0
    dp: int = 1
    dp_idx: int = 0
    k: int | None = None  # activation topk / batchtopk: active latents per token and layer

    @property
    def clt_activation(self) -> str:
        """The activation of the CLT object (and file): TopK trains a JumpReLU CLT whose thresholds it estimates."""
        return "jumprelu" if self.activation in TOPK_ACTIVATIONS else self.activation


class Shard:
    def __init__(self, layout: Layout, optim, model_name: str = "", fp_group=None, dp_group=None,
                 device: str | torch.device = "cpu"):
        self.lay, self.o, self.device = layout, optim, torch.device(device)
        self.fp_group, self.dp_group = fp_group, dp_group
        lo, hi = feature_bounds(layout.n_features, layout.fp, layout.fp_idx)
        self.lo, self.hi = lo, hi
        # build the full CLT init from the seed, then keep this worker's slice: any sharding gives the same model
        full = CrossLayerTranscoder(layout.n_layers, layout.d_model, layout.n_features, layout.span,
                                    layout.clt_activation, layout.feature_input_hook, model_name)
        init_clt(full, optim.seed, optim.threshold_init)
        self.clt = CrossLayerTranscoder(layout.n_layers, layout.d_model, hi - lo, layout.span,
                                        layout.clt_activation, layout.feature_input_hook, model_name)
        with torch.no_grad():
            for l in range(layout.n_layers):
                self.clt.W_enc[l].copy_(full.W_enc[l][lo:hi])
                self.clt.W_dec[l].copy_(full.W_dec[l][lo:hi])
                self.clt.threshold[l].copy_(full.threshold[l][lo:hi])
                self.clt.b_dec[l].copy_(full.b_dec[l])
        del full
        self.clt.to(self.device)
        # fused: one kernel over all parameters (CPU and CUDA); the per-tensor loop was ~2.6x slower on CPU
        self.opt = torch.optim.Adam(self.clt.parameters(), lr=optim.lr, betas=(0.9, 0.999), fused=True)
        self.density = torch.zeros(layout.n_layers, hi - lo, device=self.device)  # EMA of firing frequency
        self.since_fired = torch.zeros(layout.n_layers, hi - lo, device=self.device)  # training tokens (AuxK)
        self.step_no = 0
        self.last_lambda = 0.0

    # ------------------------------------------------------------------------------------------------
    def init_from_data(self, xs: torch.Tensor) -> None:
        """b_enc from the first batch (the full-model quantiles restricted to this slice are the same numbers). TopK
        starts from half of the pre-activations positive (a data-centred zero bias) so that it has k to choose from
        (at the JumpReLU firing rate most tokens would have fewer than k positive codes)."""
        rate = 0.5 if self.lay.activation in TOPK_ACTIVATIONS else self.o.target_firing_rate
        init_b_enc_from_data(self.clt, xs, rate)

    def init_from_clt(self, clt: CrossLayerTranscoder, sx: torch.Tensor, sy: torch.Tensor) -> None:
        """Warm start from an exported CLT: undo the export's folding of the activation scales (sx, sy of this
        run's data) so that the scaled model computes exactly what the exported one does."""
        lo, hi = self.lo, self.hi
        sx, sy = sx.cpu(), sy.cpu()  # the loaded CLT is on the CPU; copy_ moves the result to this shard's device
        with torch.no_grad():
            for l in range(self.lay.n_layers):
                span = self.clt.spans[l]
                self.clt.W_enc[l].copy_(clt.W_enc[l][lo:hi] / sx[l])
                self.clt.b_enc[l].copy_(clt.b_enc[l][lo:hi])
                self.clt.threshold[l].copy_(clt.threshold[l][lo:hi])
                self.clt.W_dec[l].copy_(clt.W_dec[l][lo:hi] * sy[l : l + span][None, :, None])
                self.clt.b_dec[l].copy_(clt.b_dec[l] * sy[l])

    def lr_at(self, step: int, total: int) -> float:
        start = int(total * (1 - self.o.decay_frac))
        if step < start or total == start:
            return self.o.lr
        return self.o.lr * max(0.0, (total - step) / (total - start))

    def lambda_at(self, step: int, total: int) -> float:
        return self.o.lambda_final * min(1.0, step / max(1, self.o.lambda_ramp_frac * (total - 1)))

    def _gather(self):
        """TopK across feature shards: concatenate the candidates' last dimension over the shards (no gradient)."""
        if self.lay.fp == 1:
            return None

        def gather(t):
            parts = [torch.empty_like(t) for _ in range(self.lay.fp)]
            dist.all_gather(parts, t.contiguous(), group=self.fp_group)
            return torch.cat(parts, -1)
        return gather

    def _reduce(self):
        if self.lay.fp == 1:
            return None
        return lambda recon: _SumAcross.apply(recon, self.fp_group)

    def step(self, xs: torch.Tensor, ys: torch.Tensor, total_steps: int) -> dict:
        """One optimisation step on scaled activations xs, ys [n, L, d]."""
        w = LossWeights(self.lambda_at(self.step_no, total_steps), self.o.c, self.o.preact, self.o.bandwidth)
        self.last_lambda = w.sparsity
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step_no, total_steps)
        self.opt.zero_grad(set_to_none=True)
        sparse = self.o.sparse_decode
        if sparse == "auto":  # the gather only pays off when few features fire
            sparse = float(self.density.mean()) < 0.08 if self.step_no else False  # crossover ~8-10%: RESULTS.md
        topk = (self.lay.activation, self.lay.k) if self.lay.activation in TOPK_ACTIVATIONS else None
        w.auxk = self.o.auxk_alpha
        loss, parts, acts, y_hat = clt_loss(self.clt, xs, ys, w, sparse=sparse, reduce_recon=self._reduce(),
                                            topk=topk, gather=self._gather(), aux=self._aux())
        loss.backward()
        if self.lay.dp > 1:  # replicas of this slice average their gradients
            for p in self.clt.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=self.dp_group)
                    p.grad /= self.lay.dp
        self._clip()
        self.opt.step()
        with torch.no_grad():
            if topk is not None:  # thresholds of the exported JumpReLU: EMA of the smallest kept activation
                self._update_topk_thresholds(parts["topk_threshold"])
            for l in range(self.lay.n_layers):
                self.clt.threshold[l].clamp_(min=0.0)
            fired = torch.stack([(a > 0).float().mean(0) for a in acts])  # [L, F]
            self.density.mul_(0.99).add_(0.01 * fired)
            self.since_fired.add_(xs.shape[0]).masked_fill_(fired > 0, 0.0)
        self.step_no += 1
        stats = {"mse": parts["mse"], "sparsity": parts["sparsity"], "l0": fired.sum(-1)}  # mean active per token
        if "auxk" in parts:
            stats["auxk"] = parts["auxk"]
        stats["y_hat"] = y_hat
        return stats

    def _aux(self):
        """AuxK's dead masks and per-layer k (the same on every feature shard: dead counts summed over them)."""
        if self.o.auxk_alpha <= 0:
            return None
        dead = self.since_fired >= self.o.dead_tokens  # [L, F_local]
        n_dead = dead.sum(-1).float()
        if self.lay.fp > 1:
            dist.all_reduce(n_dead, group=self.fp_group)
        k = self.o.auxk_k or self.lay.d_model // 2
        return list(dead), [min(k, int(c)) for c in n_dead.tolist()]

    def _update_topk_thresholds(self, thr: torch.Tensor) -> None:
        """θ_l of every feature := EMA (0.95, about the last 20 steps; the first step sets it) of the batch's
        JumpReLU-equivalent threshold of layer l (`topk_mask`: its (k·n)-th largest pre-activation), averaged over
        data-parallel replicas so that they agree. The export turns the CLT into a JumpReLU with these thresholds:
        for BatchTopK the batch threshold of Bussmann et al. 2024 (the same codes on a batch whose (k·n)-th value
        equals θ), for TopK a JumpReLU whose mean L0 is about k (per token it varies). The short EMA follows the
        pre-activations' growth during training; the learning-rate decay at the end lets it settle."""
        thr = thr.to(self.device, torch.float32)
        if self.lay.dp > 1:
            dist.all_reduce(thr, group=self.dp_group)
            thr /= self.lay.dp
        for l in range(self.lay.n_layers):
            th = self.clt.threshold[l]
            if self.step_no == 0:
                th.fill_(float(thr[l]))
            else:
                th.mul_(0.95).add_(0.05 * thr[l])

    def _clip(self) -> None:
        """Clip by the global gradient norm: sharded parameters' squares summed over shards, b_dec counted once."""
        sq_sharded = torch.zeros((), device=self.device)
        sq_shared = torch.zeros((), device=self.device)
        for name, p in self.clt.named_parameters():
            if p.grad is None:
                continue
            s = torch.linalg.vector_norm(p.grad).square()  # (pow(2) would allocate a gradient-sized temporary)
            if name.startswith("b_dec"):
                sq_shared += s
            else:
                sq_sharded += s
        if self.lay.fp > 1:
            dist.all_reduce(sq_sharded, group=self.fp_group)
        norm = math.sqrt(float(sq_sharded + sq_shared))
        if norm > self.o.clip:
            for p in self.clt.parameters():
                if p.grad is not None:
                    p.grad.mul_(self.o.clip / (norm + 1e-6))

    # ------------------------------------------------------------------------------------------------
    def metrics(self, stats: dict, ys: torch.Tensor) -> dict:
        """Per-layer and total nMSE (FVU), L0, dead/dense fractions; summed over feature shards."""
        l0 = stats["l0"].clone()
        dead = (self.density < 1e-6).float().sum(-1)
        dense = (self.density > 0.1).float().sum(-1)
        if self.lay.fp > 1:
            for t in (l0, dead, dense):
                dist.all_reduce(t, group=self.fp_group)
        f = fvu(stats["y_hat"], ys)
        n = float(self.lay.n_features)
        aux = {"auxk_loss": float(stats["auxk"])} if "auxk" in stats else {}
        return aux | {"step": self.step_no, "loss_mse": float(stats["mse"]), "fvu": float(f.mean()), "l0": float(l0.sum()),
                "fvu_per_layer": f.tolist(), "l0_per_layer": l0.tolist(),
                "dead_frac": float(dead.sum() / (n * self.lay.n_layers)),
                "dense_frac": float(dense.sum() / (n * self.lay.n_layers)),
                "lr": self.opt.param_groups[0]["lr"], "lambda": self.last_lambda}

    # --- checkpoint state (plain tensors: safetensors, never pickle) -----------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """On the CPU (safetensors files)."""
        out = {f"p.{k}": v.detach().cpu().clone() for k, v in self.clt.state_dict().items()}
        for i, p in enumerate(self.clt.parameters()):
            st = self.opt.state.get(p, {})
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    out[f"adam.{i}.{k}"] = st[k].cpu().clone()
            if "step" in st:
                out[f"adam.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).clone()
        out["density"] = self.density.cpu().clone()
        out["since_fired"] = self.since_fired.cpu().clone()
        out["step_no"] = torch.tensor([self.step_no], dtype=torch.int64)
        return out

    def load_state_tensors(self, t: dict[str, torch.Tensor]) -> None:
        t = {k: v.to(self.device) for k, v in t.items()}
        self.clt.load_state_dict({k[2:]: v for k, v in t.items() if k.startswith("p.")})
        for i, p in enumerate(self.clt.parameters()):
            if f"adam.{i}.exp_avg" in t:
                self.opt.state[p] = {"step": t[f"adam.{i}.step"].reshape(()).clone(),
                                     "exp_avg": t[f"adam.{i}.exp_avg"], "exp_avg_sq": t[f"adam.{i}.exp_avg_sq"]}
        self.density = t["density"]
        if "since_fired" in t:  # (checkpoints before AuxK: every latent counts as just fired)
            self.since_fired = t["since_fired"]
        self.step_no = int(t["step_no"][0].item())
