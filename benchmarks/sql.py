"""SQL benchmark: DuckDB query times over the tables of a 100-prompt sweep, locally and on S3 (moto server).

In one process:
  1. a real sweep of --prompts prompts (default: a tiny Llama, 4 layers, with a random CLT of 512 features/layer,
     pruned graphs stored, a graph-only perturbation job per prompt; --model smollm2-135m for the real model,
     --graph-rows full to store whole graphs: ~3M edges per prompt here) into a local store;
  2. the docs/sql.md example queries plus a few lookups, each timed (median of --repeats) through
     `ct_ray.store.sql.connect` (views over the Iceberg tables' current data files, committed-rows filter);
  3. baseline: the same queries over compacted copies (one Parquet file per table, no commit filter) - the ratio
     is the price of the sweep's data files and views.
Query times at 10^5 prompts and on S3: benchmarks/tables.py.

    python benchmarks/sql.py              # tiny model, 100 prompts, ~3 minutes on 2 cores
    python benchmarks/sql.py --prompts 30 --repeats 1
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pyarrow.parquet as pq  # noqa: E402

from benchmarks.sweep import PROMPTS  # noqa: E402

EXTRA = {
    "count rows": "SELECT (SELECT count(*) FROM graphs) g, (SELECT count(*) FROM nodes) n, (SELECT count(*) FROM edges) e",
    "one prompt's nodes": "SELECT * FROM nodes WHERE sweep_id = '{sid}' AND key = '{key}' ORDER BY node",
    "top edges into logits": ("SELECT e.key, e.source, e.weight FROM edges e JOIN nodes t ON t.sweep_id = e.sweep_id "
                              "AND t.key = e.key AND t.node = e.target WHERE t.kind = 'logit' AND e.kept "
                              "ORDER BY abs(e.weight) DESC LIMIT 20"),
}


def doc_queries() -> dict[str, str]:
    text = (REPO / "docs" / "sql.md").read_text()
    out = {}
    for block in re.findall(r"```sql\n(.*?)```", text, flags=re.S):
        for q in block.split(";"):
            q = q.strip()
            if q.startswith("-- example:"):
                out[q.splitlines()[0][len("-- example:"):].strip()] = q
    return out


def timed(con, sql: str, repeats: int) -> tuple[float, int]:
    ts, n = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = len(con.sql(sql).fetchall())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--graph-rows", choices=("full", "pruned"), default="pruned")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir")
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ct_sql_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    import ray

    from ct_ray.models.tiny import save_tiny
    from ct_ray.store.sql import connect
    from ct_ray.sweep import parse_sweep_spec, run_sweep

    model = str(save_tiny("llama", work / "tiny", n_layers=4, d_model=128, d_mlp=512, max_pos=128)) \
        if args.model == "tiny" else args.model
    sid = "bench"
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} ({i})" for i in range(args.prompts)]
    spec = parse_sweep_spec({"sweep_id": sid, "model": model, "random_clt": {"features": 512, "firing_rate": 0.01},
                             "prompts": prompts, "graph_rows": args.graph_rows, "storage": str(work / "store"),
                             "perturbation": {"top_k": 5, "interventions": [{"op": "scale", "value": -1.0}],
                                              "function": "ct_ray.sweep.perturbation:predicted_only"},
                             "resources": {"workers": args.workers, "num_cpus": 1}})
    ray.init(address="local", num_cpus=max(2, args.workers), include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 2**20)
    r = run_sweep(spec)
    ray.shutdown()
    print(f"sweep: {r.ok} prompts ({r.skipped} already there) in {r.seconds:.1f} s", flush=True)

    store = str(work / "store")
    t0 = time.perf_counter()
    con = connect(store)
    t_connect = time.perf_counter() - t0
    sizes = {t: con.sql(f"SELECT count(*) FROM {'raw_' + t if t != 'graphs' else t}").fetchall()[0][0]
             for t in ("graphs", "nodes", "edges", "perturbations")}
    nbytes = sum(p.stat().st_size for p in Path(store).rglob("*.parquet"))
    nfiles = len(list(Path(store).rglob("*.parquet")))
    key = con.sql("SELECT key FROM graphs WHERE status = 'ok' LIMIT 1").fetchall()[0][0]
    queries = {**doc_queries(), **{k: v.format(sid=sid, key=key) for k, v in EXTRA.items()}}
    queries = {k: v.replace("'quickstart'", f"'{sid}'") for k, v in queries.items()}

    # baseline: compacted copies, one file per table, plain views
    import duckdb

    comp = work / "compact"
    comp.mkdir(exist_ok=True)
    base = duckdb.connect()
    for t in ("graphs", "nodes", "edges", "perturbations"):
        src = t if t == "graphs" else f"raw_{t}"
        # the store's connection is sandboxed (no COPY, no files outside the store): write through Arrow
        pq.write_table(con.sql(f"SELECT * FROM {src}").to_arrow_table(), f"{comp}/{t}.parquet")
        base.execute(f"CREATE VIEW {t} AS SELECT * FROM read_parquet('{comp}/{t}.parquet')")

    rows = []
    for name, q in queries.items():
        t_local, n = timed(con, q, args.repeats)
        t_base, n_base = timed(base, q, args.repeats)
        rows.append({"query": name, "rows": n, "local_s": t_local, "compacted_s": t_base})
        print(f"{name[:60]:<60} {n:>6} rows  local {t_local:7.3f} s  compacted {t_base:7.3f} s  "
              f"({t_local / t_base:5.1f}x)", flush=True)

    out = {"date": _dt.date.today().isoformat(), "cores": os.cpu_count(), "argv": sys.argv, "model": args.model,
           "graph_rows": args.graph_rows, "n_prompts": args.prompts, "table_rows": sizes, "files": nfiles,
           "bytes": nbytes, "connect_s": t_connect,
           "queries": rows, "total_s": time.perf_counter() - t_start}
    print(f"tables: {sizes}, {nfiles} files, {nbytes / 2**20:.1f} MiB; connect {t_connect:.3f} s; "
          f"total {out['total_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
