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

import torch

from ..errors import CLTError
from ..models.adapters import frozen_scales
from ..models.hooks import MODULES, Hooks, first, module
from ..specs.intervention import (
    Intervention,
    InterventionError,
    PositionRange,
    SpliceMode,
    parse_intervention,
    parse_mode,
)
from .linear import constrained_pass
from .result import InterventionResult
from .splice_run import LayerOps, RunState, SpliceForward

_OPS = {"set": 0, "scale": 1, "add": 2}


class Splice(SpliceForward):
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
        for name in MODULES:  # every module a spliced pass hooks, resolved once for a clear error up front
            for l in range(ad.n_layers):
                module(ad, name, l)
        self.has_post_norm = any(module(ad, "attn_post_norm", l) is not None for l in range(ad.n_layers))
        self.lm_head = module(ad, "lm_head")
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
        L = self.L
        rec: dict[str, list] = {k: [None] * L for k in ("attn_in", "attn_n", "attn_out", "pat", "post", "mid",
                                                         "mlp_in", "mlp_out", "resid_post")}
        self._block_returns_tensor = True  # blocks can then be skipped by returning their clean output

        def put(key, l, val, key2=None, val2=None):  # returns None: a hook that returns a value replaces the output
            rec[key][l] = val[0].detach().clone()
            if key2 is not None:
                rec[key2][l] = val2[0].detach().clone()

        def attn(mod, a, o, l):
            if not isinstance(o, tuple) or len(o) < 2 or o[1] is None:
                raise RuntimeError("attention module returned no pattern: the model must use eager attention")
            put("attn_out", l, o[0])
            put("pat", l, o[1])

        def block(mod, a, o, l):
            self._block_returns_tensor &= isinstance(o, torch.Tensor)
            put("resid_post", l, first(o))

        fin: dict = {}
        with Hooks(self.model) as h:
            for l in range(L):
                h.hook("attn_norm", lambda mod, a, o, l=l: put("attn_in", l, a[0], "attn_n", first(o)), l)
                h.hook("attn", lambda mod, a, o, l=l: attn(mod, a, o, l), l)
                if self.has_post_norm:
                    h.hook("attn_post_norm", lambda mod, a, o, l=l: put("post", l, first(o)), l)
                h.hook("mlp_norm", lambda mod, a, o, l=l: put("mid", l, a[0], "mlp_in", first(o)), l)
                h.hook("mlp_out", lambda mod, a, o, l=l: put("mlp_out", l, first(o)), l)
                h.hook("block", lambda mod, a, o, l=l: block(mod, a, o, l), l)
            h.hook("final_norm", lambda mod, a, o: fin.update(x=a[0][0].detach().clone(), y=first(o)[0].detach().clone()))
            h.hook("lm_head", lambda mod, a, o: fin.update(logits=first(o)[0].detach().clone()))
            # last position only, exactly as the intervened passes compute it, so no-op changes are exactly zero
            out = self.model.model(self.tokens[None], use_cache=False, logits_to_keep=1).logits[0, -1]

        st = {k: torch.stack(v) if v[0] is not None else None for k, v in rec.items()}
        self.attn_in, self.attn_n, self.attn_out = st["attn_in"], st["attn_n"], st["attn_out"]
        self.patterns, self.post_out = st["pat"], st["post"]
        self.resid_mid, self.mlp_in, self.mlp_out = st["mid"], st["mlp_in"], st["mlp_out"]
        self.resid_post = st["resid_post"]
        self.final_in, self.final_out = fin["x"], fin["y"]
        self.clean_logits = fin["logits"][-1]  # pre-softcap
        self.clean_out_logits = out.detach().clone()
        # frozen norm denominators (used only in constrained layers)
        self.s_attn, self.s_mlp, self.s_post, self.s_final = frozen_scales(
            self.W, self.final, self.attn_in, self.resid_mid, self.final_in, lambda l, s: self.attn_out[l])
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

    def compile(self, rows: list[list[Intervention]], P: int | None = None) -> dict[int, LayerOps]:
        per: dict[int, list[tuple]] = {}
        for b, row in enumerate(rows):
            seen = set()
            for iv in row:
                if iv.template:
                    raise InterventionError(f"{iv.describe()}: a template names no features; validation and sweep "
                                            "plans apply it to graph nodes (Intervention.at)")
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
            out[l] = LayerOps(lt(b), lt(p), lt(f), lt(op), torch.tensor(v, dtype=torch.float64, device=self.device))
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
            run = RunState(len(chunk), self.P, self.L, ops, cons, frozen_attn, return_activations,
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
