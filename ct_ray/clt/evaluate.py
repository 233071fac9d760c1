"""How well a CLT replaces the MLPs: the model run with every MLP output replaced by the CLT's reconstruction
("spliced"), compared with the real model on held-out tokens; and its reconstruction (FVU, L0) on those tokens."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..harvest.activations import harvest_batch, training_mask
from ..models.hooks import Hooks
from .transcoder import CrossLayerTranscoder


@contextlib.contextmanager
def spliced(model, clt: CrossLayerTranscoder, keep_bos: bool = True):
    """Within the context, `model.model` runs with CLT reconstructions in place of every MLP output
    (cross-layer decoders accumulate from earlier layers, as in the replacement model; no error terms).
    Position 0 (BOS) keeps its real MLP output unless `keep_bos` is False."""
    acts: dict[int, torch.Tensor] = {}

    def read(l):
        return lambda x: acts.__setitem__(l, clt.encode(l, x))

    def write(l):
        def fn(real):
            y = clt.b_dec[l].expand_as(real).clone()
            for ls in range(l + 1):
                k = l - ls
                if k < clt.spans[ls] and ls in acts:
                    y = y + acts[ls] @ clt.W_dec[ls][:, k]
            if keep_bos:  # the BOS attention sink keeps its real MLP output (a constant in the replacement model too)
                y[..., 0, :] = real[..., 0, :]
            return y.to(real.dtype)
        return fn

    with Hooks(model) as h:
        for l in range(model.adapter.n_layers):
            h.on(clt.feature_input_hook, read(l), l).on("mlp_out", write(l), l)
        try:
            yield
        finally:
            acts.clear()


@torch.no_grad()
def replacement_metrics(model, clt: CrossLayerTranscoder, tokens: torch.Tensor, batch: int = 8) -> dict:
    """tokens [n, T] (BOS first). Top-1 agreement, KL(real || spliced), and next-token cross-entropy of both,
    over positions 1.. (the BOS position is skipped)."""
    agree = kl = ce_real = ce_spliced = 0.0
    count = 0
    for i in range(0, len(tokens), batch):
        t = tokens[i : i + batch]
        real = model.model(t, use_cache=False).logits[:, 1:].float()
        with spliced(model, clt):
            rep = model.model(t, use_cache=False).logits[:, 1:].float()
        lp_real, lp_rep = real.log_softmax(-1), rep.log_softmax(-1)
        agree += float((real.argmax(-1) == rep.argmax(-1)).float().sum())
        kl += float((lp_real.exp() * (lp_real - lp_rep)).sum(-1).sum())
        nxt = t[:, 2:]
        ce_real += float(F.nll_loss(lp_real[:, :-1].flatten(0, 1), nxt.flatten(), reduction="sum"))
        ce_spliced += float(F.nll_loss(lp_rep[:, :-1].flatten(0, 1), nxt.flatten(), reduction="sum"))
        count += real.shape[0] * real.shape[1]
    n_ce = count - len(tokens)
    return {"top1_agreement": agree / count, "kl": kl / count, "ce_real": ce_real / max(1, n_ce),
            "ce_spliced": ce_spliced / max(1, n_ce), "eval_tokens": count}


@torch.no_grad()
def reconstruction_metrics(model, clt, tokens: torch.Tensor, batch: int = 8) -> dict:
    """FVU (per layer and mean over layers), L0 (active features per token, summed over layers) and the dead
    fraction (features active on none of these positions; fewer tokens than training saw count more as dead), on
    the same positions training uses (BOS and outlier tokens dropped), with the CLT's own read point."""
    L = clt.n_layers
    err = torch.zeros(L, dtype=torch.float64)
    sum_y = torch.zeros(L, clt.d_model, dtype=torch.float64)
    sum_y2 = torch.zeros(L, dtype=torch.float64)
    active = torch.zeros(L, dtype=torch.float64)
    fired = [torch.zeros(f, dtype=torch.bool) for f in clt.d_tc]
    n = 0
    for i in range(0, len(tokens), batch):
        x, y = harvest_batch(model, tokens[i : i + batch], clt.feature_input_hook)
        m = training_mask(x)
        x, y = x[m].float(), y[m].float()  # [n, L, d]
        acts = [clt.encode(l, x[:, l]) for l in range(L)]
        y_hat = torch.stack(clt.decode(acts), 1)
        err += (y_hat - y).pow(2).sum(-1).sum(0).double()
        sum_y += y.sum(0).double()
        sum_y2 += y.pow(2).sum(-1).sum(0).double()
        active += torch.stack([(a > 0).sum(0).sum() for a in acts]).double()
        for f, a in zip(fired, acts):
            f |= (a > 0).any(0)
        n += x.shape[0]
    var = (sum_y2 - sum_y.pow(2).sum(-1) / max(n, 1)).clamp_min(1e-12)
    fvu = err / var
    return {"fvu": float(fvu.mean()), "fvu_per_layer": fvu.tolist(), "l0": float(active.sum() / max(n, 1)),
            "l0_per_layer": (active / max(n, 1)).tolist(), "eval_positions": n,
            "dead_frac": float(sum(int((~f).sum()) for f in fired) / max(1, sum(clt.d_tc))),
            "dead_frac_per_layer": [float((~f).float().mean()) for f in fired]}
