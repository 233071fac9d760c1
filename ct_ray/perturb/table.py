"""The `perturbations` table: one row per (intervention, logit node) of a validated graph.

Schema (version 1):
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

SCHEMA_VERSION = 1

PERTURBATION_SCHEMA = pa.schema(
    [
        ("graph_id", pa.string()),
        ("intervention_id", pa.int32()),
        ("target", pa.string()),
        ("target_kind", pa.string()),
        ("target_influence", pa.float32()),
        ("intervention", pa.string()),
        ("op", pa.string()),
        ("value", pa.float32()),
        ("mode", pa.string()),
        ("layer_start", pa.int32()),
        ("layer_end", pa.int32()),
        ("freeze_attention", pa.bool_()),
        ("token", pa.int32()),
        ("token_str", pa.string()),
        ("logit_before", pa.float32()),
        ("logit_after", pa.float32()),
        ("prob_before", pa.float32()),
        ("prob_after", pa.float32()),
        ("predicted_delta", pa.float32()),
        ("predicted_direct", pa.float32()),
        ("measured_delta", pa.float32()),
        ("kl", pa.float32()),
        ("schema_version", pa.int32()),
    ]
)


def graph_id(graph) -> str:
    """The graph's own id when it has one (meta 'graph_id'), else a digest of model, CLT and tokens."""
    if graph.meta.get("graph_id"):
        return str(graph.meta["graph_id"])
    key = json.dumps([graph.meta.get("model"), graph.meta.get("clt"), graph.meta.get("tokens")])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def perturbation_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts with the schema's columns, schema_version optional) -> a table with the documented schema."""
    cols = {f.name: [] for f in PERTURBATION_SCHEMA}
    for r in rows:
        for name in cols:
            cols[name].append(SCHEMA_VERSION if name == "schema_version" and name not in r else r[name])
    return pa.table({n: pa.array(v, PERTURBATION_SCHEMA.field(n).type) for n, v in cols.items()},
                    schema=PERTURBATION_SCHEMA)
