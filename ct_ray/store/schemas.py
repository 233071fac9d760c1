"""The result tables' schemas: one place from which every table (Iceberg schema, SQL views, docs) derives.

Every table carries its partition column (`sweep_id`, `clt_id` or `run`, always a string) as the last column:
Iceberg data files hold the partition column (unlike hive directories), so every engine reads it the same way.
A schema version only ever adds nullable columns (Iceberg schema evolution, by name); see docs/tables.md.
"""

from __future__ import annotations

import pyarrow as pa

TABLES_SCHEMA_VERSION = 2  # 2: perturbations rows carry what `ct-ray perturb` reports (docs/tables.md)

GRAPHS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # deterministic task key (prompt + model + CLT + parameters)
        ("prompt_index", pa.int32()),  # position of the prompt in the sweep's input (first occurrence)
        ("prompt", pa.string()),
        ("target", pa.string()),  # optional target text from the prompt source
        ("status", pa.string()),  # 'ok' | 'error'
        ("error_kind", pa.string()),  # 'prompt' | 'input' | 'internal' | 'worker' (null when ok)
        ("error", pa.string()),  # one-line message (null when ok)
        ("model", pa.string()),
        ("clt", pa.string()),
        ("params", pa.string()),  # JSON: attribution + pruning parameters
        ("n_tokens", pa.int32()),
        ("tokens", pa.list_(pa.int32())),
        ("token_strs", pa.list_(pa.string())),
        ("logit_tokens", pa.list_(pa.int32())),
        ("logit_strs", pa.list_(pa.string())),
        ("logit_probs", pa.list_(pa.float32())),
        ("top_token", pa.int32()),
        ("top_token_str", pa.string()),
        ("top_prob", pa.float32()),
        ("target_token", pa.int32()),  # first token of `target`
        ("target_prob", pa.float32()),  # the model's probability of target_token at the last position
        ("target_rank", pa.int32()),  # 0 = the model's top token
        ("target_in_graph", pa.bool_()),  # target_token is one of the graph's logit nodes
        ("n_active_features", pa.int32()),
        ("n_nodes", pa.int32()),  # full graph
        ("n_edges", pa.int64()),
        ("n_features", pa.int32()),
        ("n_nodes_pruned", pa.int32()),
        ("n_edges_pruned", pa.int64()),
        ("n_features_pruned", pa.int32()),
        ("replacement_score", pa.float64()),
        ("completeness_score", pa.float64()),
        ("replacement_score_pruned", pa.float64()),
        ("completeness_score_pruned", pa.float64()),
        ("graph_rows", pa.string()),  # which graph the nodes/edges rows hold: 'pruned' | 'full'
        ("attribute_s", pa.float32()),
        ("prune_s", pa.float32()),
        ("write_s", pa.float32()),
        ("worker", pa.string()),  # host:pid that produced the row
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("schema_version", pa.int16()),
    ]
)

NODES_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("node", pa.int32()),  # node index in the full graph (edges refer to it)
        ("node_id", pa.string()),  # circuit-tracer / Neuronpedia id
        ("kind", pa.string()),  # feature | error | embedding | logit
        ("layer", pa.int32()),  # -1 embeddings, n_layers logits
        ("position", pa.int32()),
        ("feature", pa.int32()),  # feature index within its layer, -1 otherwise
        ("token", pa.int32()),  # token at the position (logit nodes: the predicted token)
        ("token_str", pa.string()),
        ("activation", pa.float32()),  # feature activation; error/embedding vector norm; logit: demeaned logit
        ("probability", pa.float32()),  # logit nodes: the model's probability of the token
        ("influence", pa.float32()),  # influence on the logits (full graph; NaN until computed)
        ("kept", pa.bool_()),  # in the pruned graph
    ]
)

# an attribution Graph's own nodes table (attribution/graph.py): the sweep's without its key and the pruning flag
GRAPH_NODES_SCHEMA = pa.schema([f for f in NODES_SCHEMA if f.name not in ("key", "kept")])

EDGES_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.int32()),  # `node` of the source
        ("target", pa.int32()),  # `node` of the target
        ("weight", pa.float32()),  # direct effect of source on target
        ("kept", pa.bool_()),  # in the pruned graph
    ]
)

EDGE_HEADS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.int32()),  # the edge (`node` values, as in edges)
        ("target", pa.int32()),
        ("layer", pa.int32()),  # the last head of the paths: layer and head; -1/-1 the residual path (no head),
        ("head", pa.int32()),  # -1/-2 the heads not listed, summed (an edge's rows sum to its weight)
        ("weight", pa.float32()),
    ]
)

QK_ATTRIBUTIONS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("target", pa.int32()),  # the graph node whose incoming edges this head carries most at the query position
        ("layer", pa.int32()),
        ("head", pa.int32()),
        ("query_position", pa.int32()),
        ("key_position", pa.int32()),
        ("score", pa.float32()),  # the real pre-softmax score (before any softcap)
        ("pattern", pa.float32()),  # the real attention weight
        ("role", pa.string()),  # pair | query | key: a pairwise term or a query-/key-side marginal
        ("rank", pa.int16()),  # 0 = largest |weight| of its role
        ("query_source", pa.string()),  # node ids (Neuronpedia form; "bias": the constant terms)
        ("key_source", pa.string()),
        ("weight", pa.float32()),
    ]
)

PERTURBATIONS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # the graph's key
        ("plan", pa.string()),  # hash of the perturbation plan
        ("intervention", pa.int32()),  # index of the intervention within the graph's job
        ("node", pa.int32()),  # intervened node (`node` in nodes)
        ("node_id", pa.string()),
        ("layer", pa.int32()),
        ("position", pa.int32()),
        ("feature", pa.int32()),
        ("influence", pa.float32()),  # the intervened node's influence on the logits
        ("op", pa.string()),  # 'scale' | 'set' | 'add'
        ("value", pa.float32()),
        ("mode", pa.string()),  # 'constrained' | 'free'
        ("target_node", pa.int32()),  # node whose change is measured (a logit or a feature)
        ("target_id", pa.string()),
        ("target_kind", pa.string()),
        ("target_token", pa.int32()),  # logit targets: the token
        ("baseline", pa.float32()),  # the target's value without intervention
        ("predicted_delta", pa.float32()),  # change predicted by the graph
        ("measured_delta", pa.float32()),  # change measured on the model (null when not measured)
        ("status", pa.string()),  # 'ok' | 'error'
        ("error", pa.string()),
        # version 2 (one row type for sweeps and `ct-ray perturb`; older files read these as null)
        ("supernode", pa.string()),  # the intervened supernode's name (null: one node)
        ("interventions", pa.string()),  # JSON list of the concrete Interventions applied together
        ("layer_start", pa.int32()),  # constrained layer range, inclusive; -1 in free mode
        ("layer_end", pa.int32()),
        ("freeze_attention", pa.bool_()),  # free layers kept the clean attention patterns
        ("target_str", pa.string()),  # logit targets: the token's text
        ("logit_before", pa.float32()),  # logit targets: pre-softcap logit, clean
        ("logit_after", pa.float32()),  # ... intervened
        ("prob_before", pa.float32()),  # logit targets: output probability, clean
        ("prob_after", pa.float32()),  # ... intervened
        ("predicted_direct", pa.float32()),  # the direct-edge prediction (equals predicted_delta in constrained mode)
        ("kl", pa.float32()),  # KL(clean || intervened) of the output distribution at the last position
    ]
)

_CONTEXT = pa.struct([
    ("context", pa.int64()),  # index of the context in the job's corpus contexts
    ("doc", pa.int32()),  # document index in the corpus
    ("offset", pa.int32()),  # token offset of the context in its document
    ("position", pa.int32()),  # position of the max activation in the context (BOS = 0)
    ("activation", pa.float32()),  # the max activation in the context
    ("quantile", pa.float32()),  # quantile samples: the sample's quantile; top contexts: null
    ("start", pa.int32()),  # position of the window's first token in the context
    ("tokens", pa.list_(pa.string())),  # the window's tokens
    ("acts", pa.list_(pa.float32())),  # the feature's activation at each token of the window
])

FEATURES_SCHEMA = pa.schema(
    [
        ("job", pa.string()),  # deterministic key of the features job (CLT + model + corpus + parameters)
        ("clt", pa.string()),  # the CLT id as sweeps record it (`graphs.clt`)
        ("model", pa.string()),
        ("layer", pa.int32()),
        ("feature", pa.int32()),  # index within its layer
        ("node_prefix", pa.string()),  # `{layer}_{feature}_`: node ids of this feature start with it
        ("n_tokens", pa.int64()),  # tokens seen (BOS excluded)
        ("n_active", pa.int64()),  # tokens where the feature fires
        ("density", pa.float64()),  # n_active / n_tokens
        ("mean_activation", pa.float32()),  # mean activation when active (NaN when dead)
        ("max_activation", pa.float32()),
        ("top_contexts", pa.list_(_CONTEXT)),  # by decreasing max activation
        ("quantile_samples", pa.list_(_CONTEXT)),  # contexts at a few quantiles of the active contexts' max
        ("schema_version", pa.int16()),
    ]
)

TRAIN_METRICS_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("loss_mse", pa.float64()),
        ("fvu", pa.float64()),  # mean over layers of the batch's normalised MSE
        ("l0", pa.float64()),  # active features per token, summed over layers
        ("fvu_per_layer", pa.list_(pa.float64())),
        ("l0_per_layer", pa.list_(pa.float64())),
        ("dead_frac", pa.float64()),
        ("dense_frac", pa.float64()),
        ("lr", pa.float64()),
        ("lambda", pa.float64()),  # sparsity coefficient at this step
        ("tokens_per_s", pa.float64()),
        ("schema_version", pa.int16()),
    ]
)

# --- analysis tables (ct_ray/analysis, `ct-ray analyze` / `ct-ray diff`): each partition replaced whole per run ---
FEATURE_STATS_SCHEMA = pa.schema(
    [
        ("clt", pa.string()),  # the CLT id as the sweep's graphs rows name it
        ("layer", pa.int32()),
        ("feature", pa.int32()),
        ("node_prefix", pa.string()),  # `{layer}_{feature}_`: joins nodes.node_id and features.node_prefix
        ("n_prompts", pa.int32()),  # graphs in which it is a node (any position)
        ("n_prompts_kept", pa.int32()),  # graphs in which it is a kept (pruned-graph) node
        ("frac_prompts", pa.float32()),  # n_prompts / the sweep's 'ok' graphs
        ("n_nodes", pa.int64()),  # node rows (prompt x position)
        ("activation_mean", pa.float32()),  # over its node rows
        ("activation_max", pa.float32()),
        ("influence_sum", pa.float64()),  # Σ over graphs of its logit influence there (nodes.influence, summed over positions)
        ("influence_mean", pa.float32()),  # influence_sum / n_prompts
        ("influence_max", pa.float32()),  # its largest logit influence in one graph
        ("top_logits", pa.list_(pa.string())),  # logit tokens it pushes most: Σ of its direct edges into each logit
        ("top_logit_weights", pa.list_(pa.float32())),
        ("top_keys", pa.list_(pa.string())),  # graphs where its influence is largest
        ("top_key_influence", pa.list_(pa.float32())),
        ("schema_version", pa.int16()),
    ]
)

CIRCUIT_PATHS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # the graph
        ("rank", pa.int16()),  # 0 = the graph's strongest path
        ("path", pa.string()),  # signature across prompts: 'L3/F17 > L9/F2 > " Paris"' (positions dropped)
        ("hops", pa.int16()),  # edges on the path
        ("node_ids", pa.list_(pa.string())),  # the path's nodes in this graph, source first, the logit last
        ("layers", pa.list_(pa.int32())),  # feature nodes' layers, source first
        ("features", pa.list_(pa.int32())),
        ("logit_token", pa.int32()),
        ("logit_str", pa.string()),
        ("score", pa.float32()),  # p(logit) x Π normalised |edge weight| along the path (its share of the influence)
        ("support", pa.int32()),  # graphs of the sweep with this path among their strongest
        ("support_frac", pa.float32()),  # support / graphs analysed
        ("mean_score", pa.float32()),  # mean score over those graphs
        ("schema_version", pa.int16()),
    ]
)

SUPERNODES_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # the graph (null: a sweep-level group of features)
        ("method", pa.string()),  # how the groups were made, e.g. 'auto-v1'
        ("supernode", pa.string()),  # the group's name
        ("size", pa.int32()),
        ("node_ids", pa.list_(pa.string())),  # members in this graph (graph-level rows)
        ("layers", pa.list_(pa.int32())),  # members' layers and features (sweep-level rows: the group's features)
        ("features", pa.list_(pa.int32())),
        ("influence", pa.float32()),  # the members' summed logit influence
        ("label", pa.string()),  # a readable hint: the logit tokens the group pushes most
        ("schema_version", pa.int16()),
    ]
)

GRAPH_DIFFS_SCHEMA = pa.schema(
    [
        ("sweep_a", pa.string()),
        ("sweep_b", pa.string()),
        ("prompt", pa.string()),  # matched by prompt text (null: the sweep-level aggregate row)
        ("key_a", pa.string()),
        ("key_b", pa.string()),
        ("match", pa.string()),  # 'feature' (same CLT: layer, feature) | 'decoder' (cosine >= threshold)
        ("replacement_delta", pa.float64()),  # b - a, pruned graphs
        ("completeness_delta", pa.float64()),
        ("top_token_a", pa.string()),
        ("top_token_b", pa.string()),
        ("top_prob_delta", pa.float32()),  # b - a of the model's probability of a's top token
        ("logit_prob_l1", pa.float32()),  # Σ |p_b - p_a| over the union of both graphs' logit tokens
        ("influence_a", pa.float64()),  # features' total logit influence in a
        ("influence_b", pa.float64()),
        ("matched_influence_a", pa.float64()),  # of which on features matched in b
        ("matched_influence_b", pa.float64()),
        ("n_features_a", pa.int32()),
        ("n_features_b", pa.int32()),
        ("n_matched", pa.int32()),
        ("edge_change_l1", pa.float64()),  # Σ |w_b - w_a| over matched edges and unmatched edges' |w|
        ("edge_change_rel", pa.float64()),  # edge_change_l1 / (Σ|w_a| + Σ|w_b|): 0 unchanged, 1 disjoint
        ("top_changed_edges", pa.list_(pa.string())),  # 'src > tgt: a -> b', largest |change| first
        ("n_prompts", pa.int32()),  # aggregate row: prompts compared
        ("schema_version", pa.int16()),
    ]
)

# table -> partition column (identity-partitioned; always a string)
PARTITIONS = {"graphs": "sweep_id", "nodes": "sweep_id", "edges": "sweep_id", "perturbations": "sweep_id",
              "edge_heads": "sweep_id", "qk_attributions": "sweep_id",
              "features": "clt_id", "train_metrics": "run", "feature_stats": "sweep_id", "circuit_paths": "sweep_id",
              "supernodes": "sweep_id", "graph_diffs": "diff_id"}
SWEEP_TABLES = ("graphs", "nodes", "edges", "perturbations", "edge_heads", "qk_attributions")
ANALYSIS_TABLES = ("feature_stats", "circuit_paths", "supernodes", "graph_diffs")
TABLE_NAMES = tuple(PARTITIONS)
_BASE = {"graphs": GRAPHS_SCHEMA, "nodes": NODES_SCHEMA, "edges": EDGES_SCHEMA, "perturbations": PERTURBATIONS_SCHEMA,
         "edge_heads": EDGE_HEADS_SCHEMA, "qk_attributions": QK_ATTRIBUTIONS_SCHEMA,
         "features": FEATURES_SCHEMA, "train_metrics": TRAIN_METRICS_SCHEMA, "feature_stats": FEATURE_STATS_SCHEMA,
         "circuit_paths": CIRCUIT_PATHS_SCHEMA, "supernodes": SUPERNODES_SCHEMA, "graph_diffs": GRAPH_DIFFS_SCHEMA}


def _full(name: str) -> pa.Schema:
    s = _BASE[name].append(pa.field(PARTITIONS[name], pa.string()))
    return s.with_metadata({b"ct_ray.table": name.encode(), b"ct_ray.schema_version": str(TABLES_SCHEMA_VERSION).encode()})


# the full schema of each table, partition column included (what the data files hold)
SCHEMAS = {name: _full(name) for name in _BASE}


def empty_table(schema: pa.Schema) -> pa.Table:
    """A table of no rows with `schema` (metadata kept). Not `schema.empty_table()`: that imports pandas (0.3-0.5 s,
    most of `ct-ray sql`'s start-up on an empty store)."""
    return pa.Table.from_batches([], schema=schema)


def conform(table: pa.Table | list[dict] | dict, name: str, partition: str | None = None) -> pa.Table:
    """Cast `table` (an Arrow table, list of row dicts or dict of columns) to the table's schema: columns in order,
    missing nullable columns filled with nulls, the partition column set to `partition` when given. Unknown columns
    are an error (the schema is versioned)."""
    schema = SCHEMAS[name]
    if isinstance(table, list):
        table = pa.Table.from_pylist(table)
    elif isinstance(table, dict):
        table = pa.table(table)
    unknown = [c for c in table.column_names if schema.get_field_index(c) < 0]
    if unknown:
        raise ValueError(f"columns not in the {name} schema v{TABLES_SCHEMA_VERSION}: {', '.join(unknown)}")
    part = PARTITIONS[name]
    cols = []
    have = set(table.column_names)
    for f in schema:
        if f.name == part and partition is not None:
            cols.append(pa.repeat(pa.scalar(partition, pa.string()), table.num_rows))
        elif f.name in have:
            c = table.column(f.name)
            cols.append(c if c.type == f.type else c.cast(f.type))  # (a cast call per column per prompt adds up)
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)
