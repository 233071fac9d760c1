"""One-call interventions and generation with an intervention held."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..specs.intervention import Intervention, InterventionError, SpliceMode
from .splice import InterventionResult, Splice


def intervene(model, clt, prompt: str | Sequence[int] | torch.Tensor, interventions, *,
              mode: str | SpliceMode | dict | None = None, layers: tuple[int, int] | None = None,
              freeze_attention: bool | None = None, return_activations: bool = False) -> InterventionResult:
    """Apply `interventions` (all together) to `prompt` on `model` with `clt` spliced in; one row of results.

    For many interventions of one prompt, build a `Splice` once and call `run` with one row per intervention:
    the clean pass is shared and the rows run in batched forward passes.
    """
    rows = Splice.normalise_rows([interventions])
    if not rows[0]:
        raise InterventionError("empty list of interventions")
    return Splice(model, clt, prompt).run(rows, mode, layers=layers, freeze_attention=freeze_attention,
                                          return_activations=return_activations)


@dataclass
class Generation:
    tokens: list[int]  # prompt (with BOS) + generated
    new_tokens: list[int]
    text: str  # the generated text only


@torch.no_grad()
def generate(model, clt, prompt: str | Sequence[int] | torch.Tensor, interventions=None, max_new_tokens: int = 20, *,
             mode: str | SpliceMode | dict | None = None, freeze_attention: bool | None = None,
             temperature: float = 0.0, seed: int = 0, stop_at_eos: bool = True) -> Generation:
    """Generate with `interventions` held at every step (greedy unless `temperature` > 0).

    Each step re-splices the current sequence: a clean pass of the sequence fixes the error terms (and, where
    frozen, the attention patterns) of every position, then the intervened pass picks the next token. Positions
    "all" therefore cover the generated tokens too; explicit positions refer to the prompt. With no
    interventions (None or []) this is the real model's own continuation.
    """
    if max_new_tokens < 0:
        raise InterventionError("max_new_tokens must be >= 0")
    if temperature < 0:
        raise InterventionError("temperature must be >= 0")
    if interventions is None or (isinstance(interventions, (list, tuple)) and len(interventions) == 0):
        row = []
    else:
        row = Splice.normalise_rows([interventions])[0]
    tokens = model.encode(prompt)
    prompt_len = int(tokens.numel())
    limit = model.adapter.max_positions
    eos = getattr(model.tokenizer, "eos_token_id", None) if model.tokenizer is not None else None
    g = torch.Generator().manual_seed(seed)
    for _ in range(max_new_tokens):
        if limit and tokens.numel() >= limit:
            break
        sp = Splice(model, clt, tokens)
        res = sp.run([row], mode, freeze_attention=freeze_attention)
        logits = res.out_logits[0].float().cpu()
        if temperature > 0:
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g))
        else:
            nxt = int(logits.argmax())
        tokens = torch.cat([tokens, torch.tensor([nxt])])
        if stop_at_eos and eos is not None and nxt == eos:
            break
    new = tokens[prompt_len:].tolist()
    text = "".join(model.decode(new)) if new else ""
    return Generation(tokens.tolist(), new, text)


def node_intervention(graph, node: int, op: str = "set", value: float = 0.0) -> Intervention:
    """An intervention on one feature node of `graph` (at the node's own position)."""
    kinds = graph.nodes.column("kind").to_pylist()
    if not 0 <= node < len(kinds):
        raise InterventionError(f"node {node} outside the graph's {len(kinds)} nodes")
    if kinds[node] != "feature":
        raise InterventionError(f"node {node} is a {kinds[node]} node: only feature nodes can be intervened on")
    row = graph.nodes.slice(node, 1).to_pylist()[0]
    return Intervention(features=[(row["layer"], row["feature"])], positions=row["position"], op=op, value=value)
