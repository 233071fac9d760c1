"""The real model with the CLT spliced in, for one prompt: one clean forward pass, then batched intervened passes.

Every replaced quantity is written as `clean value + change`, where the change is computed from the difference
between the current and the clean input of that point. With no intervention every difference is exactly zero, so
the spliced model reproduces the real model bit for bit, and in the linear (constrained) regions the response is
exactly the linear map the attribution graph is built from, without cancellation of large clean values.

Per layer `l` of an intervened pass (batch of B intervention sets of the same prompt):
  * free layer: CLT features are recomputed from the (changed) read point, the intervention is applied to them,
    and the MLP output is `clean mlp_out + Σ_{l' <= l} W_dec[l'→l] (acts[l'] - clean acts[l'])`, i.e. the CLT
    reconstruction of the new activations plus the error term frozen from the clean pass;
  * constrained layer: attention pattern and norm denominators are frozen, feature activations are the clean
    ones with the intervention applied, so only the intervened features' decoders carry the change.
Position 0 (BOS) is an attention sink whose features are never nodes: its activations stay zero, its MLP output
stays the real one.

Cost: layers below a batch's first intervened layer are not computed (their input is exactly clean, so they return
their clean output); rows are batched by first intervened layer; the real MLPs are not run (their output would be
replaced); in frozen-attention layers only the positions that changed go through the OV projections; feature
changes are decoded entry by entry (few features change per position).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import CLTError
from ..specs.intervention import (
    Intervention,
    InterventionError,
    PositionRange,
    SpliceMode,
    parse_intervention,
    parse_mode,
)
from .linear import constrained_pass
from .modules import splice_modules

_OPS = {"set": 0, "scale": 1, "add": 2}
_PEND_ALL_MAX = 2**25  # floats in the pending-decoder buffer of one batch (128 MiB in fp32)
_CHUNK = 2**22  # floats of decoder rows gathered at once


def _nonzero_rows(x: torch.Tensor) -> torch.Tensor:
    """Mask of the vectors (last dim) of `x` that are not all zero (several times faster than ne(0).any(-1))."""
    return x.abs().amax(-1) > 0


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


@dataclass
class InterventionResult:
    """Outputs of a batch of intervened passes (row b = the b-th intervention set).

    logits: pre-softcap logits at the last position [B, V] (what graph logit nodes are built from);
    out_logits: the model's output logits (post-softcap) at the last position [B, V], for probabilities and KL;
    acts / pre_acts: per layer [B, P, d_tc] feature activations / pre-activations (when requested);
    watched_acts / watched_pre: [B, n] activations / pre-activations of the `watch` (layer, pos, feature) triples;
    mlp_real: [B, L, P, d] the real MLP's output on the spliced model's MLP input (when requested);
    mlp_response: [B, L, P, d] change of the CLT reconstruction at each layer due to that layer's own features
      being recomputed (no intervention applied), i.e. the CLT's model of the MLP's response;
    mlp_real_at / mlp_response_at: [B, P, d] the same two at one layer per row (`record_mlp_at`; zero where none).
    """

    logits: torch.Tensor
    out_logits: torch.Tensor
    clean_logits: torch.Tensor
    clean_out_logits: torch.Tensor
    acts: list[torch.Tensor] | None = None
    pre_acts: list[torch.Tensor] | None = None
    watched_acts: torch.Tensor | None = None
    watched_pre: torch.Tensor | None = None
    mlp_real: torch.Tensor | None = None
    mlp_response: torch.Tensor | None = None
    all_logits: torch.Tensor | None = None
    mlp_real_at: torch.Tensor | None = None
    mlp_response_at: torch.Tensor | None = None

    @property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self.out_logits.float(), -1)

    @property
    def clean_probs(self) -> torch.Tensor:
        return torch.softmax(self.clean_out_logits.float(), -1)

    def logit_delta(self, tokens, demean: bool = True) -> torch.Tensor:
        """Change of the logits of `tokens` [B, n]; demeaned (logit - mean logit) like graph logit nodes."""
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        new, old = self.logits.double(), self.clean_logits.double()
        d = new[:, tokens] - old[tokens]
        if demean:
            d = d - (new.mean(-1, keepdim=True) - old.mean())
        return d.float()

    def kl(self) -> torch.Tensor:
        """KL(clean ‖ intervened) of the output distribution at the last position, per row [B]."""
        lp = torch.log_softmax(self.clean_out_logits.double(), -1)
        lq = torch.log_softmax(self.out_logits.double(), -1)
        return (lp.exp() * (lp - lq)).sum(-1).float()

    def take(self, idx: torch.Tensor) -> InterventionResult:
        """The rows `idx` (in that order)."""
        pick = lambda x: None if x is None else x[idx.to(x.device)]  # noqa: E731
        return InterventionResult(
            logits=pick(self.logits), out_logits=pick(self.out_logits), clean_logits=self.clean_logits,
            clean_out_logits=self.clean_out_logits,
            acts=None if self.acts is None else [pick(a) for a in self.acts],
            pre_acts=None if self.pre_acts is None else [pick(a) for a in self.pre_acts],
            watched_acts=pick(self.watched_acts), watched_pre=pick(self.watched_pre), mlp_real=pick(self.mlp_real),
            mlp_response=pick(self.mlp_response), all_logits=pick(self.all_logits),
            mlp_real_at=pick(self.mlp_real_at), mlp_response_at=pick(self.mlp_response_at),
        )

    @staticmethod
    def concat(parts: list[InterventionResult]) -> InterventionResult:
        if len(parts) == 1:
            return parts[0]

        def cat(name, dim=0):
            xs = [getattr(p, name) for p in parts]
            return None if xs[0] is None else torch.cat(xs, dim)

        def cat_layers(name):
            xs = [getattr(p, name) for p in parts]
            if xs[0] is None:
                return None
            return [torch.cat([x[l] for x in xs]) for l in range(len(xs[0]))]

        p0 = parts[0]
        return InterventionResult(
            logits=cat("logits"), out_logits=cat("out_logits"), clean_logits=p0.clean_logits,
            clean_out_logits=p0.clean_out_logits, acts=cat_layers("acts"), pre_acts=cat_layers("pre_acts"),
            watched_acts=cat("watched_acts"), watched_pre=cat("watched_pre"), mlp_real=cat("mlp_real"),
            mlp_response=cat("mlp_response"), all_logits=cat("all_logits"), mlp_real_at=cat("mlp_real_at"),
            mlp_response_at=cat("mlp_response_at"),
        )


@dataclass
class _LayerOps:
    rows: torch.Tensor
    pos: torch.Tensor
    feat: torch.Tensor
    op: torch.Tensor
    value: torch.Tensor

    def apply(self, cur: torch.Tensor) -> torch.Tensor:
        v = self.value.to(cur.dtype)
        return torch.where(self.op == 0, v, torch.where(self.op == 1, cur * v, cur + v))


class _Run:
    """Mutable state of one intervened forward pass."""

    def __init__(self, B, P, L, ops, constrained, frozen_attn, record_acts, record_mlp, watch):
        self.B, self.P = B, P
        self.ops: dict[int, _LayerOps] = ops
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


class Splice:
    """The model with `clt` spliced in, for one prompt (string or token ids; BOS is prepended as in attribution).

    `run(rows)` evaluates a batch of intervention sets in batched forward passes; see the module docstring.
    A run temporarily hooks (and swaps the forward of) the model's modules: do not run two at once on one model.
    """

    def __init__(self, model, clt, prompt: str | Sequence[int] | torch.Tensor):
        ad = model.adapter
        clt.check_model(ad.n_layers, ad.d_model)
        if clt.feature_input_hook not in ("resid_mid", "mlp_in"):
            raise CLTError(f"unsupported CLT feature_input_hook {clt.feature_input_hook!r}")
        self.model, self.clt, self.ad = model, clt, ad
        self.mods = splice_modules(ad)
        self.L, self.d = ad.n_layers, ad.d_model
        self.H, self.Hkv, self.dh = ad.n_heads, ad.n_kv_heads, ad.d_head
        self.W = ad.layer_weights()
        self.final = ad.final_norm()
        self.device = next(model.model.parameters()).device
        self.tokens = model.encode(prompt).to(self.device)
        self.P = int(self.tokens.numel())
        self._clt_weights()
        self._clean()

    # --- clean pass -----------------------------------------------------------------------------------
    def _clt_weights(self) -> None:
        dev, clt = self.device, self.clt
        self.W_enc = [clt.W_enc[l].detach().to(dev) for l in range(self.L)]
        self.b_enc = [clt.b_enc[l].detach().to(dev) for l in range(self.L)]
        self.W_dec = [clt.W_dec[l].detach().to(dev) for l in range(self.L)]
        self.thr = [clt.threshold[l].detach().to(dev) for l in range(self.L)]
        self.cdtype = self.W_enc[0].dtype

    def _fire(self, l: int, h: torch.Tensor) -> torch.Tensor:
        return torch.relu(h) if self.clt.activation == "relu" else h * (h > self.thr[l].to(h.dtype))

    def _act(self, l: int, h: torch.Tensor) -> torch.Tensor:
        a = self._fire(l, h)
        a[..., 0, :] = 0  # BOS
        return a

    @torch.no_grad()
    def _clean(self) -> None:
        L, m = self.L, self.mods
        rec: dict[str, list] = {k: [None] * L for k in ("attn_in", "attn_n", "attn_out", "pat", "post", "mid",
                                                         "mlp_in", "mlp_out", "resid_post")}
        self._block_returns_tensor = True  # blocks can then be skipped by returning their clean output
        hs = []

        def put(key, l, val):
            rec[key][l] = val[0].detach().clone()

        for l in range(L):
            def attn_norm(mod, a, o, l=l):
                put("attn_in", l, a[0])
                put("attn_n", l, _first(o))

            hs.append(m.attn_norm[l].register_forward_hook(attn_norm))

            def attn(mod, a, o, l=l):
                if not isinstance(o, tuple) or len(o) < 2 or o[1] is None:
                    raise RuntimeError("attention module returned no pattern: the model must use eager attention")
                put("attn_out", l, o[0])
                put("pat", l, o[1])

            hs.append(m.attn[l].register_forward_hook(attn))
            if m.attn_post_norm is not None:
                hs.append(m.attn_post_norm[l].register_forward_hook(lambda mod, a, o, l=l: put("post", l, _first(o))))

            def mlp_norm(mod, a, o, l=l):
                put("mid", l, a[0])
                put("mlp_in", l, _first(o))

            hs.append(m.mlp_norm[l].register_forward_hook(mlp_norm))
            hs.append(m.mlp_out[l].register_forward_hook(lambda mod, a, o, l=l: put("mlp_out", l, _first(o))))

            def block(mod, a, o, l=l):
                self._block_returns_tensor &= isinstance(o, torch.Tensor)
                put("resid_post", l, _first(o))

            hs.append(self.ad.blocks()[l].register_forward_hook(block))
        fin: dict = {}
        hs.append(m.final_norm.register_forward_hook(
            lambda mod, a, o: fin.update(x=a[0][0].detach().clone(), y=_first(o)[0].detach().clone())))
        hs.append(m.lm_head.register_forward_hook(lambda mod, a, o: fin.update(logits=_first(o)[0].detach().clone())))
        try:
            # last position only, exactly as the intervened passes compute it, so no-op changes are exactly zero
            out = self.model.model(self.tokens[None], use_cache=False, logits_to_keep=1).logits[0, -1]
        finally:
            for h in hs:
                h.remove()

        st = {k: torch.stack(v) if v[0] is not None else None for k, v in rec.items()}
        self.attn_in, self.attn_n, self.attn_out = st["attn_in"], st["attn_n"], st["attn_out"]
        self.patterns, self.post_out = st["pat"], st["post"]
        self.resid_mid, self.mlp_in, self.mlp_out = st["mid"], st["mlp_in"], st["mlp_out"]
        self.resid_post = st["resid_post"]
        self.final_in, self.final_out = fin["x"], fin["y"]
        self.clean_logits = fin["logits"][-1]  # pre-softcap
        self.clean_out_logits = out.detach().clone()
        # frozen norm denominators (used only in constrained layers)
        self.s_attn = [self.W[l].attn_norm.scale(self.attn_in[l]) for l in range(L)]
        self.s_mlp = [self.W[l].mlp_norm.scale(self.resid_mid[l]) for l in range(L)]
        self.s_post = None
        if self.post_out is not None:
            self.s_post = [self.W[l].attn_post_norm.scale(self.attn_out[l]) for l in range(L)]
        self.s_final = self.final.scale(self.final_in)
        # clean CLT features, from the real read points
        self.read_clean = self.resid_mid if self.clt.feature_input_hook == "resid_mid" else self.mlp_in
        self.clean_pre, self.clean_acts = [], []
        for l in range(L):
            h = self.read_clean[l].to(self.cdtype) @ self.W_enc[l].T + self.b_enc[l]
            self.clean_pre.append(h)
            self.clean_acts.append(self._act(l, h.clone()))

    # --- compiling interventions -----------------------------------------------------------------------
    def positions(self, pos, P: int | None = None) -> list[int]:
        """Resolve an intervention's positions against a prompt of P tokens (default: this prompt)."""
        P = self.P if P is None else P
        if pos == "all":
            if P < 2:
                raise InterventionError("the prompt has no position after BOS to intervene on")
            return list(range(1, P))
        if isinstance(pos, PositionRange):
            if pos.stop > P:
                raise InterventionError(f"position range [{pos.start}, {pos.stop}) outside the prompt's {P} tokens")
            out = list(range(max(1, pos.start), pos.stop))
            if not out:
                raise InterventionError("the position range covers only BOS (position 0), which has no features")
            return out
        ps = [pos] if isinstance(pos, int) else list(pos)
        out = []
        for p in ps:
            q = p + P if p < 0 else p
            if not 0 <= q < P:
                raise InterventionError(f"position {p} outside the prompt's {P} tokens")
            if q == 0:
                raise InterventionError("position 0 is the BOS attention sink: its features are not nodes")
            out.append(q)
        return out

    def compile(self, rows: list[list[Intervention]], P: int | None = None) -> dict[int, _LayerOps]:
        per: dict[int, list[tuple]] = {}
        for b, row in enumerate(rows):
            seen = set()
            for iv in row:
                ps = self.positions(iv.positions, P)
                for l, f in iv.features:
                    if not 0 <= l < self.L:
                        raise InterventionError(f"layer {l} outside the model's {self.L} layers")
                    if not 0 <= f < self.clt.d_tc[l]:
                        raise InterventionError(f"feature {f} outside layer {l}'s {self.clt.d_tc[l]} features")
                    for p in ps:
                        if (l, p, f) in seen:
                            raise InterventionError(
                                f"feature L{l}/F{f} at position {p} is targeted twice in one intervention set")
                        seen.add((l, p, f))
                        per.setdefault(l, []).append((b, p, f, _OPS[iv.op], iv.value))
        out = {}
        for l, items in per.items():
            b, p, f, op, v = zip(*items)
            lt = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
            out[l] = _LayerOps(lt(b), lt(p), lt(f), lt(op), torch.tensor(v, dtype=torch.float64, device=self.device))
        return out

    @staticmethod
    def normalise_rows(rows) -> list[list[Intervention]]:
        if isinstance(rows, (Intervention, dict)):
            rows = [rows]
        rows = list(rows)
        if not rows:
            raise InterventionError("empty list of interventions")
        out = []
        for r in rows:
            r = [r] if isinstance(r, (Intervention, dict)) else list(r)
            out.append([parse_intervention(x) for x in r])
        return out

    # --- intervened passes ----------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, rows, mode: str | SpliceMode | dict | None = None, *, layers: tuple[int, int] | None = None,
            freeze_attention: bool | None = None, return_activations: bool = False, watch=None,
            record_mlp: bool = False, all_positions: bool = False, batch_size: int = 32,
            skip_clean_layers: bool = True, linear_path: bool = True,
            record_mlp_at: Sequence[int | None] | None = None) -> InterventionResult:
        """Run intervention sets in batches of `batch_size` forward passes.

        rows: a list whose items are intervention sets (an Intervention, a dict, or a list of them; an empty
          list is the unintervened spliced model); all interventions of one set apply together.
        mode / layers / freeze_attention: see `SpliceMode`.
        return_activations: also return every layer's feature activations and pre-activations [B, P, d_tc].
        watch: (layer, position, feature) triples [n, 3] whose activations/pre-activations to return (cheap).
        record_mlp: also return the real MLP outputs and the CLT's response per layer.
        record_mlp_at: per row, the one layer (None: none) whose real MLP output and CLT response to return in
          `mlp_real_at` / `mlp_response_at` (what validation's faithfulness check reads; much cheaper).
        all_positions: also return the pre-softcap logits of every position [B, P, V].
        skip_clean_layers: layers below a batch's first intervened layer return their clean output instead of
          being computed (their input is exactly clean); off only to test that this changes nothing.
        linear_path: batches constrained from their first intervened layer to the last, asking for logits only,
          propagate just the residual-stream change (`linear.py`); off only to test that this changes nothing.
        """
        rows = self.normalise_rows(rows)
        spec = parse_mode(mode, layers=layers, freeze_attention=freeze_attention)
        cons = set(spec.constrained_layers(self.L))
        frozen_attn = set(range(self.L)) if spec.freeze_attention else set(cons)
        self.compile(rows)  # validate everything before the first pass
        if batch_size < 1:
            raise InterventionError("batch_size must be >= 1")
        if watch is not None:
            watch = torch.as_tensor(watch, dtype=torch.long, device=self.device).reshape(-1, 3)
        # rows with the same first intervened layer share the layers they skip: batch them together
        first = torch.tensor([min((l for iv in r for l, _ in iv.features), default=self.L) for r in rows])
        order = torch.argsort(first, stable=True)
        parts = []
        pool: list[torch.Tensor] = []

        def buffer(n: int, like: torch.Tensor) -> torch.Tensor:
            # one zeroed buffer for every batch of this call: fresh pages cost more than zeroing used ones
            if not pool or pool[0].numel() < n or pool[0].dtype != like.dtype:
                pool[:] = [torch.zeros(n, dtype=like.dtype, device=like.device)]
                return pool[0]
            return pool[0][:n].zero_()

        mlp_at = None
        if record_mlp_at is not None:
            if len(record_mlp_at) != len(rows):
                raise InterventionError(f"record_mlp_at has {len(record_mlp_at)} layers for {len(rows)} rows")
            mlp_at = torch.tensor([self.L if x is None or not 0 <= x < self.L else int(x) for x in record_mlp_at],
                                  dtype=torch.long, device=self.device)
        plain = linear_path and skip_clean_layers and not (return_activations or record_mlp or all_positions)
        for i in range(0, len(rows), batch_size):
            idx = order[i : i + batch_size]
            chunk = [rows[k] for k in idx.tolist()]
            at = None if mlp_at is None else mlp_at[idx.to(self.device)]
            ops = self.compile(chunk)
            if plain and cons.issuperset(range(min(ops, default=self.L), self.L)):
                o = constrained_pass(self, ops, len(chunk), watch, at)
                parts.append(InterventionResult(
                    logits=o.logits, out_logits=o.out_logits, clean_logits=self.clean_logits,
                    clean_out_logits=self.clean_out_logits, watched_acts=o.watched_acts, watched_pre=o.watched_pre,
                    mlp_real_at=o.mlp_real_at, mlp_response_at=o.mlp_response_at))
                continue
            run = _Run(len(chunk), self.P, self.L, ops, cons, frozen_attn, return_activations,
                       record_mlp or at is not None, watch)
            run.buffer = buffer
            res = self._forward(run, all_positions, skip_clean_layers)
            if at is not None:
                b = torch.arange(len(chunk), device=self.device)
                res.mlp_real_at = res.mlp_real[b, at.clamp(max=self.L - 1)]
                res.mlp_response_at = res.mlp_response[b, at.clamp(max=self.L - 1)]
                res.mlp_real_at[at >= self.L] = 0
                res.mlp_response_at[at >= self.L] = 0
                if not record_mlp:
                    res.mlp_real = res.mlp_response = None
            parts.append(res)
        return InterventionResult.concat(parts).take(torch.argsort(order))

    def _ov(self, run: _Run, l: int, dn: torch.Tensor) -> torch.Tensor:
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

    def _add_pending(self, run: _Run, l: int, delta: torch.Tensor) -> None:
        """Decode an activation change of layer `l` [B, P, d_tc] into the MLP outputs of the layers it writes."""
        flat = delta.reshape(run.B * run.P, -1)
        r, f = torch.nonzero(flat, as_tuple=True)
        if r.numel():
            self._add_entries(run, l, r, f, flat[r, f])

    def _add_entries(self, run: _Run, l: int, r: torch.Tensor, f: torch.Tensor, v: torch.Tensor) -> None:
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

    def _mlp_norm_hook(self, run: _Run, l: int, x: torch.Tensor, y: torch.Tensor):
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

    def _watch(self, run: _Run, l: int, a: torch.Tensor, h: torch.Tensor) -> None:
        m = run.watch[:, 0] == l
        if m.any():
            idx = torch.nonzero(m).squeeze(1)
            p, f = run.watch[idx, 1], run.watch[idx, 2]
            run.w_acts.append((idx, a[:, p, f], h[:, p, f]))

    def _skip_layer(self, run: _Run, l: int) -> None:
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

    def _forward(self, run: _Run, all_positions: bool, skip_clean_layers: bool = True) -> InterventionResult:
        m, L = self.mods, self.L
        hs, swapped = [], []
        blocks = self.ad.blocks()
        skip = run.first if (skip_clean_layers and self._block_returns_tensor) else 0

        def swap(mod, fn):
            swapped.append((mod, mod.__dict__.get("forward")))
            mod.forward = fn

        def frozen_norm(norm, s, x_clean, y_clean):
            # (cast back: a norm gain kept in fp32 must not turn a half-precision residual into fp32)
            return lambda mod, a, o: (y_clean + norm.apply(a[0] - x_clean, s, with_bias=False)).to(y_clean.dtype)

        for l in range(skip):
            swap(blocks[l], lambda *a, l=l, **k: self.resid_post[l].expand(run.B, run.P, -1).clone())
            self._skip_layer(run, l)
        for l in range(skip, L):
            if l in run.constrained:
                hs.append(m.attn_norm[l].register_forward_hook(
                    frozen_norm(self.W[l].attn_norm, self.s_attn[l], self.attn_in[l], self.attn_n[l])))
                if m.attn_post_norm is not None:
                    hs.append(m.attn_post_norm[l].register_forward_hook(
                        frozen_norm(self.W[l].attn_post_norm, self.s_post[l], self.attn_out[l], self.post_out[l])))
            if l in run.frozen_attn:
                # replaces the module's forward: the live pattern would be discarded, so it is not computed
                def attn(*a, l=l, **kw):
                    n = kw["hidden_states"] if "hidden_states" in kw else a[0]
                    return (self.attn_out[l] + self._ov(run, l, n - self.attn_n[l])).to(self.attn_out.dtype), None

                swap(m.attn[l], attn)
            hs.append(m.mlp_norm[l].register_forward_hook(
                lambda mod, a, o, l=l: self._mlp_norm_hook(run, l, a[0], _first(o))))
            if run.record_mlp:
                def keep_real(mod, a, o, l=l):
                    run.mlp_real[l] = _first(o)
                    return run.stash[l]

                hs.append(m.mlp_out[l].register_forward_hook(keep_real))
            else:
                # the MLP's own output is discarded: skip computing it
                swap(m.mlp_out[l], lambda *a, l=l, **k: run.stash[l])
                if m.mlp[l] is not m.mlp_out[l]:
                    swap(m.mlp[l], lambda x, *a, **k: x)
        if L - 1 in run.constrained:
            hs.append(m.final_norm.register_forward_hook(
                frozen_norm(self.final, self.s_final, self.final_in, self.final_out)))

        def head(x, *a, **k):
            # one 2-D product: a strided [B, 1, d] input makes torch fall back to B separate products
            W, b = m.lm_head.weight, getattr(m.lm_head, "bias", None)
            y = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]).contiguous(), W, b)
            run.logits = y.view(*x.shape[:-1], -1)
            return run.logits

        swap(m.lm_head, head)
        try:
            toks = self.tokens[None].expand(run.B, -1)
            out = self.model.model(toks, use_cache=False, logits_to_keep=0 if all_positions else 1).logits
        finally:
            for h in hs:
                h.remove()
            for mod, prev in reversed(swapped):
                if prev is None:
                    del mod.forward
                else:
                    mod.forward = prev

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
    def baseline(self, **kw) -> InterventionResult:
        """The spliced model without intervention (equals the real model)."""
        return self.run([[]], **kw)

    def clean_watch(self, watch) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.as_tensor(watch, dtype=torch.long).reshape(-1, 3)
        acts = torch.stack([self.clean_acts[int(l)][int(p), int(f)] for l, p, f in w.tolist()]) if len(w) else \
            torch.zeros(0)
        pre = torch.stack([self.clean_pre[int(l)][int(p), int(f)] for l, p, f in w.tolist()]) if len(w) else \
            torch.zeros(0)
        return acts, pre
