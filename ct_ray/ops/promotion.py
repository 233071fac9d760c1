"""Scoring a CLT for promotion: reconstruction (FVU, L0) and replacement-model fidelity (top-1 agreement, spliced KL)
on a fixed held-out text set, plus the mean replacement / completeness scores of attribution graphs over a fixed
set of canary prompts. Candidate and production are scored by the same code on the same inputs, so the numbers
compare; the inputs are fixed by the spec, so a version's result is cached in the registry (evals/)."""

from __future__ import annotations

import hashlib
import json
import math

import torch

from ..attribution.canary import canary_scores
from ..clt.evaluate import reconstruction_metrics, replacement_metrics

# direction of each metric: +1 higher is better, -1 lower is better
METRICS = {"fvu": -1, "l0": -1, "kl": -1, "top1_agreement": 1, "replacement_score": 1, "completeness_score": 1}


def eval_id(model: str, eval_spec: dict, canary: dict) -> str:
    """Identity of an evaluation (model + held-out set + canary prompts and attribution settings)."""
    blob = json.dumps({"model": model, "eval": eval_spec, "canary": canary}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def evaluate_clt(model, clt, tokens: torch.Tensor, prompts: list[str], attribution: dict) -> dict:
    out = reconstruction_metrics(model, clt, tokens)
    out.update(replacement_metrics(model, clt, tokens))
    out.update(canary_scores(model, clt, prompts, attribution))
    return out


def decide(candidate: dict, production: dict | None, margins: dict) -> tuple[bool, list[str]]:
    """Promote only if the candidate beats production by at least each configured margin (in the metric's units;
    a negative margin tolerates that much regression; None skips the metric). Missing or NaN values fail."""
    if production is None:
        return True, ["no production version yet"]
    ok, reasons = True, []
    for name, sign in METRICS.items():
        m = margins.get(name)
        if m is None:
            continue
        c, p = candidate.get(name), production.get(name)
        gain = sign * (c - p) if c is not None and p is not None else math.nan
        passed = not math.isnan(gain) and gain >= m
        ok &= passed
        reasons.append(f"{name}: {c:.4g} vs {p:.4g}, gain {gain:+.4g} (needs >= {m:+g}) "
                       f"{'ok' if passed else 'FAILED'}" if not math.isnan(gain) else f"{name}: missing FAILED")
    return ok, reasons
