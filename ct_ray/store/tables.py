"""The sweep tables: versioned Arrow schemas and atomic, idempotent Parquet writes through fsspec.

Layout under a store root (any fsspec URL; default `./ct_ray_data`), hive-partitioned by sweep:

    {root}/graphs/sweep_id={id}/{key}.parquet          one row per prompt (the commit record of the key)
    {root}/nodes/sweep_id={id}/{key}.parquet           the prompt's graph nodes
    {root}/edges/sweep_id={id}/{key}.parquet           the prompt's graph edges
    {root}/perturbations/sweep_id={id}/{key}.{plan}.{chunk}.parquet
    {root}/_sweeps/{id}/plan.json                      what the sweep was asked to do (for `sweep status`)
    {root}/_sweeps/{id}/supernodes/{key}.json          supernode groupings saved from the explorer
    {root}/features/clt_id={cid}/{job}.{layer}.parquet feature dashboards of a CLT (ct-ray features)
    {root}/_features/{cid}/job.json                    the commit record of the CLT's features job

Every file is written whole or not at all: locally into a hidden temporary name then renamed; on object storage
with one PUT (objects appear atomically). A task writes its `nodes` and `edges` files first and its `graphs` row
last, so the `graphs` row is the commit record of a key: readers (the SQL views) only show nodes/edges of keys
with a committed `graphs` row whose status is 'ok'. A re-run writes the same file names, so nothing duplicates.
See docs/tables.md.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import StorageError
from .fs import filesystem, is_local

TABLES_SCHEMA_VERSION = 1
DEFAULT_STORE = "./ct_ray_data"
TABLE_NAMES = ("graphs", "nodes", "edges", "perturbations")
SWEEPS_DIR = "_sweeps"
PARTITION = "sweep_id"
_TMP_TAG = ".tmp-"

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
        ("token", pa.int32()),
        ("token_str", pa.string()),
        ("activation", pa.float32()),
        ("probability", pa.float32()),  # logit nodes
        ("influence", pa.float32()),  # influence on the logits (full graph)
        ("kept", pa.bool_()),  # in the pruned graph
    ]
)

EDGES_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.int32()),  # `node` of the source
        ("target", pa.int32()),  # `node` of the target
        ("weight", pa.float32()),  # direct effect of source on target
        ("kept", pa.bool_()),  # in the pruned graph
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
    ]
)

SCHEMAS = {"graphs": GRAPHS_SCHEMA, "nodes": NODES_SCHEMA, "edges": EDGES_SCHEMA, "perturbations": PERTURBATIONS_SCHEMA}

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

# tables partitioned by something other than the sweep: the feature dashboards live per CLT
PARTITIONS = {"features": "clt_id"}
ALL_SCHEMAS = {**SCHEMAS, "features": FEATURES_SCHEMA}


def _with_meta(schema: pa.Schema, name: str) -> pa.Schema:
    return schema.with_metadata({b"ct_ray.table": name.encode(), b"ct_ray.schema_version": str(TABLES_SCHEMA_VERSION).encode()})


def conform(table: pa.Table | list[dict] | dict, name: str) -> pa.Table:
    """Cast `table` (an Arrow table, list of row dicts or dict of columns) to the table's schema: columns in order,
    missing nullable columns filled with nulls. Unknown columns are an error (the schema is versioned)."""
    schema = ALL_SCHEMAS[name]
    if isinstance(table, list):
        table = pa.Table.from_pylist(table)
    elif isinstance(table, dict):
        table = pa.table(table)
    unknown = [c for c in table.column_names if schema.get_field_index(c) < 0]
    if unknown:
        raise ValueError(f"columns not in the {name} schema v{TABLES_SCHEMA_VERSION}: {', '.join(unknown)}")
    cols = []
    for f in schema:
        if f.name in table.column_names:
            cols.append(table.column(f.name).cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=_with_meta(schema, name))


def _one_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


class Store:
    """A store root (fsspec URL) holding the sweep tables. Picklable: ships to actors by URL + options."""

    def __init__(self, url: str = DEFAULT_STORE, **storage_options):
        url = str(url)
        if "://" not in url:
            url = os.path.abspath(os.path.expanduser(url))
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options)
        self._fs = None

    def __getstate__(self):
        return {"url": self.url, "storage_options": self.storage_options, "_fs": None}

    def __repr__(self):
        return f"Store({self.url!r})"

    @property
    def fs(self):
        if self._fs is None:
            self._fs, self._root = filesystem(self.url, **dict(self.storage_options))
        return self._fs

    @property
    def root(self) -> str:
        self.fs  # noqa: B018 (resolves _root)
        return self._root

    @property
    def local(self) -> bool:
        return is_local(self.fs)

    def partition(self, table: str, sweep_id: str) -> str:
        return f"{self.root}/{table}/{PARTITIONS.get(table, PARTITION)}={sweep_id}"

    def file_path(self, table: str, sweep_id: str, name: str) -> str:
        return f"{self.partition(table, sweep_id)}/{name}.parquet"

    # --- writes ---------------------------------------------------------------------------------------
    def put_bytes(self, path: str, data: bytes) -> None:
        """Write `data` at `path` atomically: readers see the old object, or the new one whole."""
        fs = self.fs
        try:
            if self.local:
                parent = os.path.dirname(path)
                os.makedirs(parent, exist_ok=True)
                tmp = os.path.join(parent, f".{os.path.basename(path)}{_TMP_TAG}{uuid.uuid4().hex[:8]}")
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            else:
                fs.pipe_file(path, data)  # a single PUT: the object appears whole or not at all
        except Exception as e:
            raise StorageError(f"cannot write {self._url_of(path)}: {_one_line(e)}") from e

    def write_table(self, table: str, sweep_id: str, name: str, data: pa.Table) -> str:
        t = conform(data, table)
        buf = io.BytesIO()
        pq.write_table(t, buf, compression="zstd")
        path = self.file_path(table, sweep_id, name)
        self.put_bytes(path, buf.getvalue())
        return path

    def delete(self, table: str, sweep_id: str, name: str) -> None:
        path = self.file_path(table, sweep_id, name)
        try:
            if self.fs.exists(path):
                self.fs.rm_file(path)
        except Exception as e:
            raise StorageError(f"cannot delete {self._url_of(path)}: {_one_line(e)}") from e

    def _url_of(self, path: str) -> str:
        if self.local:
            return path
        return f"{self.url.split('://', 1)[0]}://{path}"

    # --- listing / reading ------------------------------------------------------------------------------
    def list_names(self, table: str, sweep_id: str) -> list[str]:
        """Committed file names (without .parquet) of a table's sweep partition."""
        part = self.partition(table, sweep_id)
        try:
            if not self.local:
                self.fs.invalidate_cache(part)
            if not self.fs.exists(part):
                return []
            paths = self.fs.ls(part, detail=False)
        except FileNotFoundError:
            return []
        except Exception as e:
            raise StorageError(f"cannot list {self._url_of(part)}: {_one_line(e)}") from e
        out = []
        for p in paths:
            base = p.rstrip("/").rsplit("/", 1)[-1]
            if base.endswith(".parquet") and not base.startswith("."):
                out.append(base[: -len(".parquet")])
        return sorted(out)

    def list_partitions(self, table: str) -> list[str]:
        """Partition values of a table (e.g. the clt ids of `features`)."""
        d, col = f"{self.root}/{table}", PARTITIONS.get(table, PARTITION)
        try:
            if not self.local:
                self.fs.invalidate_cache(d)
            paths = self.fs.ls(d, detail=False) if self.fs.exists(d) else []
        except FileNotFoundError:
            return []
        except Exception as e:
            raise StorageError(f"cannot list {self._url_of(d)}: {_one_line(e)}") from e
        bases = (p.rstrip("/").rsplit("/", 1)[-1] for p in paths)
        return sorted(b.split("=", 1)[1] for b in bases if b.startswith(f"{col}="))

    def sweeps(self) -> list[str]:
        """Sweep ids with at least one graphs file or a plan."""
        ids = set()
        for sub in ("graphs", SWEEPS_DIR):
            d = f"{self.root}/{sub}"
            try:
                if not self.local:
                    self.fs.invalidate_cache(d)
                if not self.fs.exists(d):
                    continue
                for p in self.fs.ls(d, detail=False):
                    base = p.rstrip("/").rsplit("/", 1)[-1]
                    if sub == "graphs" and base.startswith(f"{PARTITION}="):
                        ids.add(base.split("=", 1)[1])
                    elif sub == SWEEPS_DIR and not base.startswith("."):
                        ids.add(base)
            except FileNotFoundError:
                continue
            except Exception as e:
                raise StorageError(f"cannot list {self._url_of(d)}: {_one_line(e)}") from e
        return sorted(ids)

    def read(self, table: str, sweep_id: str, columns: list[str] | None = None, names: list[str] | None = None) -> pa.Table:
        """A sweep partition of a table (all its committed files), without the partition column."""
        names = self.list_names(table, sweep_id) if names is None else names
        schema = _with_meta(ALL_SCHEMAS[table], table)
        if columns:
            schema = pa.schema([schema.field(c) for c in columns])
        if not names:
            return schema.empty_table()
        if len(names) > 8:  # many small files: let Arrow fetch them concurrently
            import pyarrow.dataset as pads

            try:
                d = pads.dataset([self.file_path(table, sweep_id, n) for n in names], format="parquet",
                                 filesystem=self.fs, schema=schema)
                return d.to_table(columns=columns).cast(schema)
            except Exception:  # a file replaced mid-read, or an unusual filesystem: read one by one below
                pass
        parts = []
        for n in names:
            path = self.file_path(table, sweep_id, n)
            try:
                with self.fs.open(path, "rb") as f:
                    parts.append(pq.read_table(io.BytesIO(f.read()), columns=columns))
            except FileNotFoundError:
                continue  # replaced between listing and reading
            except Exception as e:
                raise StorageError(f"cannot read {self._url_of(path)}: {_one_line(e)}") from e
        if not parts:
            return schema.empty_table()
        return pa.concat_tables(parts, promote_options="default").cast(schema)

    # --- sweep metadata -----------------------------------------------------------------------------------
    def write_json(self, rel: str, obj) -> None:
        self.put_bytes(f"{self.root}/{rel}", json.dumps(obj, indent=1, default=str).encode())

    def read_json(self, rel: str):
        path = f"{self.root}/{rel}"
        try:
            if not self.local:
                self.fs.invalidate_cache(path.rsplit("/", 1)[0])
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except Exception as e:
            raise StorageError(f"cannot read {self._url_of(path)}: {_one_line(e)}") from e

    def cleanup_tmp(self, sweep_id: str, older_than_s: float = 600.0) -> int:
        """Remove temporary files left by killed local writers (never visible to readers anyway)."""
        if not self.local:
            return 0
        n, now = 0, time.time()
        for table in TABLE_NAMES:
            part = self.partition(table, sweep_id)
            if not os.path.isdir(part):
                continue
            for name in os.listdir(part):
                p = os.path.join(part, name)
                if _TMP_TAG in name and name.startswith(".") and now - os.path.getmtime(p) > older_than_s:
                    try:
                        os.unlink(p)
                        n += 1
                    except OSError:
                        pass
        return n

    def check_writable(self) -> None:
        """Fail early, with a clear message, when the store cannot be written."""
        probe = f"{self.root}/{SWEEPS_DIR}/.probe-{uuid.uuid4().hex[:8]}"
        self.put_bytes(probe, b"ok")
        try:
            self.fs.rm_file(probe)
        except Exception:
            pass


def sweep_counts(store: Store, sweep_id: str) -> dict:
    """Progress of a sweep from storage alone: planned keys, committed ok/error rows, perturbation files."""
    plan = store.read_json(f"{SWEEPS_DIR}/{sweep_id}/plan.json")
    g = store.read("graphs", sweep_id, columns=["key", "status", "error_kind"])
    status = g.column("status").to_pylist()
    kinds = g.column("error_kind").to_pylist()
    keys = set(g.column("key").to_pylist())
    errors: dict[str, int] = {}
    for s, k in zip(status, kinds):
        if s != "ok":
            errors[k or "unknown"] = errors.get(k or "unknown", 0) + 1
    planned = len(plan["keys"]) if plan and "keys" in plan else None
    done_of_plan = len(keys & set(plan["keys"])) if planned is not None else len(keys)
    n_pert = len(store.list_names("perturbations", sweep_id))
    return {
        "sweep_id": sweep_id,
        "planned": planned,
        "committed": len(keys),
        "ok": status.count("ok"),
        "error": len(status) - status.count("ok"),
        "errors_by_kind": errors,
        "pending": (planned - done_of_plan) if planned is not None else None,
        "perturbation_files": n_pert,
        "plan": {k: v for k, v in (plan or {}).items() if k != "keys"},
    }
