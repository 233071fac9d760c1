"""Mean replacement / completeness scores of a fixed set of prompts' attribution graphs: what `ct-ray train` reports
at its end and what the nightly promotion gate compares (`ops/promotion.py`)."""

from __future__ import annotations

import math


def canary_scores(model, clt, prompts: list[str], attribution: dict) -> dict:
    """Mean replacement / completeness scores of the canary prompts' attribution graphs (full graphs)."""
    from .attribute import attribute

    rep, comp = [], []
    for p in prompts:
        s = attribute(model, clt, p, **attribution).scores()
        rep.append(s["replacement_score"])
        comp.append(s["completeness_score"])
    mean = lambda v: sum(v) / len(v) if v else math.nan
    return {"replacement_score": mean(rep), "completeness_score": mean(comp), "canary_prompts": len(prompts)}


def canary_line(c: dict) -> str:
    """The one-line summary `ct-ray train` and the demo print."""
    return (f"canary graphs ({c['canary_prompts']} prompts): replacement {c['replacement_score']:.3f}, "
            f"completeness {c['completeness_score']:.3f}")
