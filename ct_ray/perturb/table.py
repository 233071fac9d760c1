"""The validation table of `ct-ray perturb --out` (schema: store/schemas.py VALIDATION_SCHEMA): one row per
(intervention, logit node) of a validated graph. A sweep's per-graph rows are the `perturbations` store table.

Columns (version 1):
  graph_id            string   id of the graph (see `graph_id`)
  intervention_id     int32    index of the intervention within this graph's validation
  target              string   what was intervened on: a node id ('3_17_5') or a supernode name
  target_kind         string   'node' | 'supernode'
  target_influence    float32  the target's influence on the logits (summed over supernode members)
  intervention        string   JSON list of the applied `Intervention` specs
  op                  string   'set' | 'scale' | 'add'
  value               float32  the op's value
  mode                string   'free' | 'constrained'
  layer_start         int32    constrained layer range (inclusive); -1 in free mode
  layer_end           int32
  freeze_attention    bool     free layers kept the clean attention patterns
  token               int32    the logit node's token
  token_str           string
  logit_before        float32  pre-softcap logit of the token, clean
  logit_after         float32  pre-softcap logit of the token, intervened
  prob_before         float32  output probability of the token, clean
  prob_after          float32  output probability of the token, intervened
  predicted_delta     float32  the graph's predicted change of the demeaned logit (direct in constrained mode,
                               through the graph's features in free mode)
  predicted_direct    float32  the direct-edge prediction (both modes)
  measured_delta      float32  measured change of the demeaned logit (logit - mean logit over the vocabulary)
  kl                  float32  KL(clean ‖ intervened) of the output distribution at the last position (per
                               intervention, repeated on its rows)
  schema_version      int32
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

from ..store.schemas import VALIDATION_SCHEMA

SCHEMA_VERSION = 1


def graph_id(graph) -> str:
    """The graph's own id when it has one (meta 'graph_id'), else a digest of model, CLT and tokens."""
    if graph.meta.get("graph_id"):
        return str(graph.meta["graph_id"])
    key = json.dumps([graph.meta.get("model"), graph.meta.get("clt"), graph.meta.get("tokens")])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def validation_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts with the schema's columns, schema_version optional) -> a table with the documented schema."""
    cols = {f.name: [] for f in VALIDATION_SCHEMA}
    for r in rows:
        for name in cols:
            cols[name].append(SCHEMA_VERSION if name == "schema_version" and name not in r else r[name])
    return pa.table({n: pa.array(v, VALIDATION_SCHEMA.field(n).type) for n, v in cols.items()},
                    schema=VALIDATION_SCHEMA)
