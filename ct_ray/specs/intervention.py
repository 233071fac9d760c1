"""Typed inputs of the perturbation stage: which features to change, how, where, and how the model responds.

These are the only objects users build by hand (or in YAML); everything past them is plain torch.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..errors import CTRayError
from .base import Spec, parse


class InterventionError(CTRayError):
    """An intervention that cannot be applied: unknown feature/layer/position, bad value, empty list, ..."""


class PositionRange(Spec):
    """Positions `start <= p < stop` (a Python slice without step). BOS (position 0) is skipped."""

    start: int = Field(0, ge=0)
    stop: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self):
        if self.stop <= self.start:
            raise InterventionError(f"empty position range [{self.start}, {self.stop})")
        return self


Positions = int | list[int] | PositionRange | Literal["all"]


Op = Literal["set", "scale", "add"]


class Intervention(Spec):
    """Change the activation of one feature or a group of features at chosen positions: the one description of an
    intervention, from a single `intervene` call to a sweep's plan.

    `features` are (layer, feature index) pairs; `positions` one position (negative counts from the end), a list,
    a `PositionRange` / Python `slice`, or "all" (every position after BOS, generated ones included during
    generation). `op`: "set" (activation := value), "scale" (activation *= value; 0 ablates, -1 flips),
    "add" (activation += value).

    Without `features` an intervention is a template: validation and sweeps apply it to each node they select, at
    the node's own position (`at`); it cannot run by itself.
    """

    features: list[tuple[int, int]] | None = None
    positions: Positions = "all"
    op: Op = "scale"
    value: float

    @property
    def template(self) -> bool:
        return self.features is None

    def at(self, features: list[tuple[int, int]], positions: Positions) -> Intervention:
        """This op and value applied to `features` at `positions` (a concrete intervention, even from a
        subclass such as a sweep plan's `PlannedIntervention`)."""
        return Intervention(features=features, positions=positions, op=self.op, value=self.value)

    def apply(self, a):
        """The new activation for the current activation `a` (a float or a tensor)."""
        if self.op == "set":
            return a.new_full(a.shape, self.value) if hasattr(a, "new_full") else float(self.value)
        return a * self.value if self.op == "scale" else a + self.value

    @field_validator("features", mode="before")
    @classmethod
    def _one_feature(cls, v):
        # (layer, feature) alone is the common case; accept it without the wrapping list
        if isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, int) for x in v):
            return [v]
        if isinstance(v, list) and not v:
            raise InterventionError("an intervention needs at least one (layer, feature) pair")
        return v

    @field_validator("positions", mode="before")
    @classmethod
    def _slice(cls, v):
        if isinstance(v, slice):
            if v.step not in (None, 1):
                raise InterventionError("position slices cannot have a step")
            if v.stop is None:
                raise InterventionError("position slices need a stop (or use positions='all')")
            return PositionRange(start=v.start or 0, stop=v.stop)
        if isinstance(v, range):
            return list(v)
        if isinstance(v, list) and not v:
            raise InterventionError("empty list of positions")
        return v

    @field_validator("value")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise InterventionError(f"intervention value must be finite, got {v}")
        return v

    def describe(self) -> str:
        if self.features is None:
            return f"{self.op}({self.value:g}) (template)"
        feats = ",".join(f"L{l}/F{f}" for l, f in self.features)
        pos = self.positions
        if isinstance(pos, PositionRange):
            pos = f"{pos.start}:{pos.stop}"
        return f"{self.op}({self.value:g}) {feats} @ {pos}"


class SpliceMode(Spec):
    """How the spliced model responds to an intervention.

    free: every layer recomputes its CLT features from its (changed) input; MLP outputs are CLT reconstructions
      plus the error terms frozen from the clean run. `freeze_attention` keeps the clean attention patterns.
    constrained: inside `layers` (inclusive range, default all) the change only travels through the intervened
      features' decoders: feature activations (so MLP outputs), attention patterns and norm denominators are
      frozen at their clean values, so the response there is linear, as in the attribution graph. Layers after
      the range run as in free mode.
    """

    mode: Literal["free", "constrained"] = "free"
    layers: tuple[int, int] | None = None
    freeze_attention: bool = False

    @model_validator(mode="after")
    def _range(self):
        if self.layers is not None:
            lo, hi = self.layers
            if lo < 0 or hi < lo:
                raise InterventionError(f"bad layer range {self.layers}: need 0 <= start <= end")
            if self.mode == "free":
                raise InterventionError("a layer range only applies to mode='constrained'")
        return self

    def constrained_layers(self, n_layers: int) -> range:
        if self.mode == "free":
            return range(0)
        lo, hi = self.layers if self.layers is not None else (0, n_layers - 1)
        if hi >= n_layers:
            raise InterventionError(f"layer range {self.layers} outside the model's {n_layers} layers")
        return range(lo, hi + 1)


DEFAULT_OPS: tuple[tuple[str, float], ...] = (("set", 0.0), ("scale", -1.0), ("scale", 2.0))


def templates(v) -> list:
    """Intervention templates from `(op, value)` pairs, dicts or Interventions (a before-validator)."""
    if not isinstance(v, (list, tuple)):
        return v
    out = []
    for i, x in enumerate(v):
        if isinstance(x, (list, tuple)) and len(x) == 2 and isinstance(x[0], str):
            x = {"op": x[0], "value": x[1]}
        if isinstance(x, Intervention):  # also a plan's PlannedIntervention: its mode is the caller's business
            x = x.model_dump(include={"features", "op", "value"})
        if isinstance(x, dict) and x.get("features") is not None:
            raise InterventionError(f"ops[{i}]: these interventions are templates (op and value): the targets are "
                                    "chosen per graph, so `features` cannot be given")
        try:
            out.append(parse_intervention(x))
        except InterventionError as e:
            raise InterventionError(f"ops[{i}]: {e}") from None
    return out


class ValidationSpec(Spec):
    """Options of `validate` and `ct-ray perturb`: perturb the `top_k` most influential nodes (or supernodes) of a
    graph with each of `ops` (intervention templates; `(op, value)` pairs accepted) in `mode`. A sweep's per-graph
    plan is `PerturbationPlan` (specs/attribution.py), whose interventions also name their mode."""

    top_k: int = Field(10, ge=1)
    ops: list[Intervention] = Field(default_factory=lambda: [Intervention(op=o, value=v) for o, v in DEFAULT_OPS],
                                    min_length=1)
    mode: SpliceMode = SpliceMode(mode="constrained")
    batch_size: int = Field(32, ge=1)

    @field_validator("ops", mode="before")
    @classmethod
    def _templates(cls, v):
        return templates(v)

    def plan_hash(self) -> str:
        """The `plan` column of its perturbations rows."""
        return self.digest(8)


def parse_intervention(x) -> Intervention:
    """An `Intervention` from itself or a dict; pydantic errors become one-line `InterventionError`s."""
    if isinstance(x, Intervention):
        return x
    if not isinstance(x, dict):
        raise InterventionError(f"expected an Intervention or a dict, got {type(x).__name__}")
    return parse(Intervention, x, "intervention", InterventionError, root="intervention")


def parse_mode(mode: str | SpliceMode | dict | None = None, **kw) -> SpliceMode:
    if isinstance(mode, SpliceMode) and not kw:
        return mode
    if isinstance(mode, SpliceMode):
        data = mode.model_dump()
    else:
        data = dict(mode) if isinstance(mode, dict) else {"mode": mode or "free"}
    data.update({k: v for k, v in kw.items() if v is not None})
    return parse(SpliceMode, data, "splice mode", InterventionError, root="mode")


# shorthands -------------------------------------------------------------------------------------------------
def ablate(layer: int, feature: int, positions: Positions | slice = "all") -> Intervention:
    return Intervention(features=[(layer, feature)], positions=positions, op="set", value=0.0)


def steer(layer: int, feature: int, factor: float, positions: Positions | slice = "all") -> Intervention:
    return Intervention(features=[(layer, feature)], positions=positions, op="scale", value=factor)
