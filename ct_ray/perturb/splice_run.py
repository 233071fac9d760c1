"""The intervened forward pass of `Splice` (splice.py): per-layer hooks that add the change of each replaced
quantity to its clean value, frozen attention through the OV projections, pending decoder writes.

`SpliceForward` is a mixin of `Splice`: it holds the pass; splice.py holds the clean pass, the compilation of
interventions into per-layer operations, and the public `run`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.hooks import Hooks, first, module
from .result import InterventionResult

_PEND_ALL_MAX = 2**25  # floats in the pending-decoder buffer of one batch (128 MiB in fp32)
_CHUNK = 2**22  # floats of decoder rows gathered at once


def _nonzero_rows(x: torch.Tensor) -> torch.Tensor:
    """Mask of the vectors (last dim) of `x` that are not all zero (several times faster than ne(0).any(-1))."""
    return x.abs().amax(-1) > 0


@dataclass
class LayerOps:
    rows: torch.Tensor
    pos: torch.Tensor
    feat: torch.Tensor
    op: torch.Tensor
    value: torch.Tensor

    def apply(self, cur: torch.Tensor) -> torch.Tensor:
        v = self.value.to(cur.dtype)
        return torch.where(self.op == 0, v, torch.where(self.op == 1, cur * v, cur + v))


class RunState:
    """Mutable state of one intervened forward pass."""

    def __init__(self, B, P, L, ops, constrained, frozen_attn, record_acts, record_mlp, watch):
        self.B, self.P = B, P
        self.ops: dict[int, LayerOps] = ops
        self.constrained, self.frozen_attn = constrained, frozen_attn
        self.record_acts, self.record_mlp, self.watch = record_acts, record_mlp, watch
        # layers below the first intervened one see exactly the clean residual stream: they are not computed
        self.first = min(ops) if ops else L
        # decoder changes waiting for their layer: [B*P, L, d], or (large batches) per layer [B*P, d]
        self.pend_all: torch.Tensor | None = None
        self.buffer = None  # callable (n floats, like tensor) -> zeroed flat buffer, reused across batches
        self._scratch: dict[str, torch.Tensor] = {}
        self.pend: list[torch.Tensor | None] = [None] * L
        self.stash: list[torch.Tensor | None] = [None] * L  # this pass's MLP output of each layer
        self.acts = [None] * L
        self.pre = [None] * L
        self.mlp_real = [None] * L
        self.mlp_resp = [None] * L
        self.w_acts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (watch index, acts, pre)
        self.logits = None

    def scratch(self, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        """A zeroed tensor reused from layer to layer (allocating fresh large tensors costs page faults)."""
        n = 1
        for x in shape:
            n *= x
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype:
            buf = self._scratch[name] = torch.zeros(n, dtype=like.dtype, device=like.device)
            return buf.view(shape)
        return buf[:n].view(shape).zero_()


class SpliceForward:
    """The intervened pass (mixed into `Splice`, whose attributes it reads)."""

    def _ov(self, run: RunState, l: int, dn: torch.Tensor) -> torch.Tensor:
        """Change of the attention output for a change `dn` [B, P, d] of its (normed) input, frozen pattern.
        Projections run only on the (row, position)s that changed / can change: usually a small part."""
        W = self.W[l]
        B, P, d = dn.shape
        moved = torch.nonzero(_nonzero_rows(dn), as_tuple=True)
        out = run.scratch("attn_out", (B, P, d), dn)
        if moved[0].numel() == 0:
            return out
        v = run.scratch("attn_v", (B, P, self.Hkv * self.dh), dn)
        v[moved] = dn[moved] @ W.W_V.T
        v = v.view(B, P, self.Hkv, self.dh)
        if self.Hkv != self.H:
            v = v.repeat_interleave(self.H // self.Hkv, dim=2)
        z = torch.einsum("hpq,bqhd->bphd", self.patterns[l].to(v.dtype), v).reshape(B, P, self.H * self.dh)
        hit = torch.nonzero(_nonzero_rows(z), as_tuple=True)
        out[hit] = z[hit] @ W.W_O.T
        return out

    def _add_pending(self, run: RunState, l: int, delta: torch.Tensor) -> None:
        """Decode an activation change of layer `l` [B, P, d_tc] into the MLP outputs of the layers it writes."""
        flat = delta.reshape(run.B * run.P, -1)
        r, f = torch.nonzero(flat, as_tuple=True)
        if r.numel():
            self._add_entries(run, l, r, f, flat[r, f])

    def _add_entries(self, run: RunState, l: int, r: torch.Tensor, f: torch.Tensor, v: torch.Tensor) -> None:
        """Changes `v` of layer-`l` features `f` at flat (row * P + position) indices `r`.

        Few features change per position, so this works entry by entry: each change adds its decoder rows, scaled,
        to the pending outputs of the layers they write."""
        W = self.W_dec[l]  # [d_tc, span, d]
        span, d, L = W.shape[1], self.d, self.L
        v = v.to(W.dtype)
        if run.pend_all is None and run.B * run.P * L * d <= _PEND_ALL_MAX:
            run.pend_all = run.buffer(run.B * run.P * L * d, W).view(run.B * run.P, L, d)
        if run.pend_all is not None:
            buf = run.pend_all.view(-1, d)
            step = max(1, _CHUNK // (span * d))
            ks = torch.arange(span, device=W.device)
            for c in range(0, len(r), step):
                rc, fc, vc = r[c : c + step], f[c : c + step], v[c : c + step]
                tgt = (rc * L + l)[:, None] + ks  # row-major index of (row, layer l + k)
                buf.index_add_(0, tgt.reshape(-1), (W[fc] * vc[:, None, None]).reshape(-1, d))
        else:  # a large batch of long prompts: one buffer per layer
            for k in range(span):
                t = l + k
                if run.pend[t] is None:
                    run.pend[t] = torch.zeros(run.B * run.P, d, dtype=W.dtype, device=W.device)
                run.pend[t].index_add_(0, r, W[f, k] * v[:, None])

    def _mlp_norm_hook(self, run: RunState, l: int, x: torch.Tensor, y: torch.Tensor):
        constrained = l in run.constrained
        B, P = run.B, run.P
        if constrained:
            y = (self.mlp_in[l] + self.W[l].mlp_norm.apply(x - self.resid_mid[l], self.s_mlp[l], with_bias=False)
                 ).to(self.mlp_in.dtype)
        read = x if self.clt.feature_input_hook == "resid_mid" else y
        dr = (read - self.read_clean[l]).to(self.cdtype)
        moved = torch.nonzero(_nonzero_rows(dr), as_tuple=True)  # (row, position)s whose read point changed
        changed = moved[0].numel() > 0
        ops = run.ops.get(l)
        want_h = run.record_acts or run.record_mlp or run.watch is not None
        h = None
        if changed and (want_h or not constrained):
            h = self.clean_pre[l].expand(B, P, -1).clone()
            h[moved] = self.clean_pre[l][moved[1]] + dr[moved] @ self.W_enc[l].T
        elif want_h:
            h = self.clean_pre[l].expand(B, P, -1)
        clean_a = self.clean_acts[l]
        # the activations this layer's features write with
        a = None
        if constrained or not changed:
            # clamped (or unchanged): only the intervened entries differ from the clean activations
            if ops is not None:
                cur = clean_a[ops.pos, ops.feat]
                self._add_entries(run, l, ops.rows * P + ops.pos, ops.feat, ops.apply(cur) - cur)
            if run.record_acts or run.watch is not None:
                a = clean_a.expand(B, P, -1)
                if ops is not None:
                    a = a.clone()
                    a[ops.rows, ops.pos, ops.feat] = ops.apply(a[ops.rows, ops.pos, ops.feat])
        else:
            a = self._act(l, h.clone())
            if ops is not None:
                a[ops.rows, ops.pos, ops.feat] = ops.apply(a[ops.rows, ops.pos, ops.feat])
            self._add_pending(run, l, a - clean_a)
        if run.record_acts:
            run.acts[l], run.pre[l] = a, h
        if run.watch is not None:
            self._watch(run, l, a, h)
        if run.record_mlp:
            free_a = self._act(l, h.clone()) if changed else clean_a.expand(B, P, -1)
            run.mlp_resp[l] = (free_a - clean_a) @ self.W_dec[l][:, 0]
        pend = run.pend_all[:, l] if run.pend_all is not None else run.pend[l]
        base = self.mlp_out[l]
        run.stash[l] = base.expand(B, P, -1) if pend is None else base + pend.view(B, P, -1).to(base.dtype)
        return y if constrained else None

    def _watch(self, run: RunState, l: int, a: torch.Tensor, h: torch.Tensor) -> None:
        m = run.watch[:, 0] == l
        if m.any():
            idx = torch.nonzero(m).squeeze(1)
            p, f = run.watch[idx, 1], run.watch[idx, 2]
            run.w_acts.append((idx, a[:, p, f], h[:, p, f]))

    def _skip_layer(self, run: RunState, l: int) -> None:
        """Records of a layer that was not computed (its values are the clean ones)."""
        B, P = run.B, run.P
        a, h = self.clean_acts[l].expand(B, P, -1), self.clean_pre[l].expand(B, P, -1)
        if run.record_acts:
            run.acts[l], run.pre[l] = a, h
        if run.watch is not None:
            self._watch(run, l, a, h)
        if run.record_mlp:
            run.mlp_real[l] = self.mlp_out[l].expand(B, P, -1)
            run.mlp_resp[l] = torch.zeros(B, P, self.d, dtype=self.cdtype, device=self.device)

    def _forward(self, run: RunState, all_positions: bool, skip_clean_layers: bool = True) -> InterventionResult:
        L = self.L
        skip = run.first if (skip_clean_layers and self._block_returns_tensor) else 0

        def frozen_norm(norm, s, x_clean, y_clean):
            # (cast back: a norm gain kept in fp32 must not turn a half-precision residual into fp32)
            return lambda mod, a, o: (y_clean + norm.apply(a[0] - x_clean, s, with_bias=False)).to(y_clean.dtype)

        def head(x, *a, **k):
            # one 2-D product: a strided [B, 1, d] input makes torch fall back to B separate products
            W, b = self.lm_head.weight, getattr(self.lm_head, "bias", None)
            y = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]).contiguous(), W, b)
            run.logits = y.view(*x.shape[:-1], -1)
            return run.logits

        with Hooks(self.model) as h:
            for l in range(skip):
                h.swap("block", lambda *a, l=l, **k: self.resid_post[l].expand(run.B, run.P, -1).clone(), l)
                self._skip_layer(run, l)
            for l in range(skip, L):
                if l in run.constrained:
                    h.hook("attn_norm", frozen_norm(self.W[l].attn_norm, self.s_attn[l], self.attn_in[l],
                                                    self.attn_n[l]), l)
                    if self.has_post_norm:
                        h.hook("attn_post_norm", frozen_norm(self.W[l].attn_post_norm, self.s_post[l],
                                                             self.attn_out[l], self.post_out[l]), l)
                if l in run.frozen_attn:
                    # replaces the module's forward: the live pattern would be discarded, so it is not computed
                    def attn(*a, l=l, **kw):
                        n = kw["hidden_states"] if "hidden_states" in kw else a[0]
                        return (self.attn_out[l] + self._ov(run, l, n - self.attn_n[l])).to(self.attn_out.dtype), None

                    h.swap("attn", attn, l)
                h.hook("mlp_norm", lambda mod, a, o, l=l: self._mlp_norm_hook(run, l, a[0], first(o)), l)
                if run.record_mlp:
                    def keep_real(mod, a, o, l=l):
                        run.mlp_real[l] = first(o)
                        return run.stash[l]

                    h.hook("mlp_out", keep_real, l)
                else:
                    # the MLP's own output is discarded: skip computing it
                    h.swap("mlp_out", lambda *a, l=l, **k: run.stash[l], l)
                    if module(self.ad, "mlp", l) is not module(self.ad, "mlp_out", l):
                        h.swap("mlp", lambda x, *a, **k: x, l)
            if L - 1 in run.constrained:
                h.hook("final_norm", frozen_norm(self.final, self.s_final, self.final_in, self.final_out))
            h.swap("lm_head", head)
            toks = self.tokens[None].expand(run.B, -1)
            out = self.model.model(toks, use_cache=False, logits_to_keep=0 if all_positions else 1).logits

        res = InterventionResult(
            logits=run.logits[:, -1].detach().clone(), out_logits=out[:, -1].detach().clone(),
            clean_logits=self.clean_logits, clean_out_logits=self.clean_out_logits,
        )
        if all_positions:
            res.all_logits = run.logits.detach().clone()
        if run.record_acts:
            res.acts = [a.contiguous() for a in run.acts]
            res.pre_acts = [h.contiguous() for h in run.pre]
        if run.watch is not None:
            n = run.watch.shape[0]
            wa = torch.zeros(run.B, n, dtype=self.cdtype, device=self.device)
            wp = torch.zeros(run.B, n, dtype=self.cdtype, device=self.device)
            for idx, a, h in run.w_acts:
                wa[:, idx], wp[:, idx] = a, h
            res.watched_acts, res.watched_pre = wa, wp
        if run.record_mlp:
            res.mlp_real = torch.stack([r.expand(run.B, run.P, -1) for r in run.mlp_real], 1)
            res.mlp_response = torch.stack([r.expand(run.B, run.P, -1) for r in run.mlp_resp], 1)
        return res

    # --- conveniences -----------------------------------------------------------------------------------
