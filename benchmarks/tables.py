"""Tables benchmark: a large sweep store written through the real commit path, then SQL, resume planning and
compaction on it; the old one-file-per-prompt layout measured in the same run as the baseline.

In one process (plus --workers worker processes):
  1. write: --prompts synthetic prompts as sweep workers produce them (per prompt: one graphs row with every
     column a worker fills, 150 nodes, 1500 edges; fixed-seed random values, 24-hex-digit keys, sweep "bench").
     --workers processes (Ray actors' stand-ins) each hold a `RowBuffer`: per prompt they `add` the nodes, edges
     and graphs rows and `finish` the key; every round (--round prompts) each flushes its buffer to Iceberg data
     files and reports them, and the driver's `Committer` commits the round (nodes, edges, graphs), while the
     workers already compute the next round. Reported: prompts/s, and the write cost per prompt (the workers'
     CPU time in add + flush, the driver's commit time), next to the cost of making the rows;
  2. on that store, each through a fresh `Store` (catalog open + planning included), median of --repeats:
     `SELECT count(*) FROM edges` and `SELECT avg(completeness_score) FROM graphs` via `ct_ray.store.sql.query`,
     and resume planning `Store(...).committed("bench")`; targets < 2 s, < 2 s, < 5 s;
  3. data files per table before and after `ct_ray.store.maintenance.compact(store, older_than_s=0)`, checked
     against <= ceil(bytes / 128 MiB) files per partition; the queries timed again after compaction;
  4. baseline: the old layout (one Parquet file per prompt and table, hive directories, written like the old
     workers: one atomic file write each) at --baseline-prompts, its write cost, and the same three operations
     the old way (DuckDB over `read_parquet('{root}/{table}/*/*.parquet', hive_partitioning=true,
     union_by_name=true)`, the old committed-keys filter; resume = list + read the graphs files); the new
     layout is also written at that same size, so the old/new ratios are printed at equal size and against
     the large store.
  --s3: the same on a moto S3 server started in-process (store s3://bench/tables, SQLite catalog in the temp
     dir), by default 4,000 prompts (baseline 500); no compaction step.

    python benchmarks/tables.py --prompts 4000                 # a quick check (~1 minute)
    python benchmarks/tables.py --json /tmp/bench/tables.json  # 100,000 prompts (several minutes on 2 cores)
    python benchmarks/tables.py --s3 --json /tmp/bench/tables_s3.json
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import hashlib
import itertools
import json
import math
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

SID = "bench"
SEED = 20261201
N_NODES, N_EDGES = 150, 1500
TARGET = {"count(*) edges": 2.0, "avg(completeness) graphs": 2.0, "resume planning": 2.0}
TARGET_S3 = dict.fromkeys(TARGET, 5.0)
QUERIES = {"count(*) edges": "SELECT count(*) FROM edges",
           "avg(completeness) graphs": "SELECT avg(completeness_score) FROM graphs"}
PROMPTS = ["The capital of France is", "The opposite of hot is", "Fact: Michael Jordan plays the sport of",
           "1 2 3 4 5 6 7", "The Eiffel Tower is in the city of", "She opened the door and saw a"]
PARAMS = json.dumps({"max_n_logits": 10, "desired_logit_prob": 0.95, "max_feature_nodes": 8192, "batch_size": 256,
                     "node_threshold": 0.8, "edge_threshold": 0.98, "graph_rows": "pruned"})
_KINDS = np.array(["embedding"] * 10 + ["feature"] * 120 + ["error"] * 15 + ["logit"] * 5)


# --- the rows a sweep worker makes for one prompt ------------------------------------------------------------
def key_of(i: int) -> str:
    return hashlib.sha256(f"{SEED}:{i}".encode()).hexdigest()[:24]


def prompt_rows(i: int) -> tuple[str, dict, pa.Table, pa.Table]:
    """(key, graphs row, nodes, edges) of prompt i: random, but the same in every run."""
    rng = np.random.default_rng([SEED, i])
    key = key_of(i)
    n_tok = int(rng.integers(6, 16))
    tokens = rng.integers(0, 49152, n_tok).tolist()
    logit_tokens = rng.integers(0, 49152, 5).tolist()
    probs = np.sort(rng.dirichlet(np.ones(6)).astype(np.float32))[::-1][:5].tolist()
    node = np.sort(rng.choice(3000, N_NODES, replace=False)).astype(np.int32)
    layer = rng.integers(0, 30, N_NODES, dtype=np.int32)
    pos = rng.integers(0, n_tok, N_NODES, dtype=np.int32)
    feat = rng.integers(0, 8192, N_NODES, dtype=np.int32)
    keys = pa.array([key]).take(pa.array(np.zeros(N_EDGES, np.int32)))
    nodes = pa.table({
        "key": keys.slice(0, N_NODES), "node": node,
        "node_id": [f"{a}_{b}_{c}" for a, b, c in zip(layer.tolist(), feat.tolist(), pos.tolist())],
        "kind": _KINDS, "layer": layer, "position": pos, "feature": feat,
        "token": rng.integers(0, 49152, N_NODES, dtype=np.int32), "activation": rng.random(N_NODES, np.float32) * 5,
        # logit nodes (the last 5) carry their token's text and probability, as a worker writes them
        "token_str": [None] * (N_NODES - 5) + [f"t{t}" for t in logit_tokens],
        "probability": np.r_[np.full(N_NODES - 5, np.nan, np.float32), np.asarray(probs, np.float32)],
        "influence": rng.random(N_NODES, np.float32), "kept": np.ones(N_NODES, bool)})
    edges = pa.table({"key": keys, "source": rng.choice(node, N_EDGES), "target": rng.choice(node, N_EDGES),
                      "weight": rng.standard_normal(N_EDGES, np.float32), "kept": np.ones(N_EDGES, bool)})
    row = {
        "key": key, "prompt_index": i, "prompt": f"{PROMPTS[i % len(PROMPTS)]} ({i})", "target": None,
        "status": "ok", "model": "smollm2-135m", "clt": "random(features=8192,seed=0,firing_rate=0.01)",
        "params": PARAMS, "n_tokens": n_tok, "tokens": tokens, "token_strs": [f"t{t}" for t in tokens],
        "logit_tokens": logit_tokens, "logit_strs": [f"t{t}" for t in logit_tokens], "logit_probs": probs,
        "top_token": logit_tokens[0], "top_token_str": f"t{logit_tokens[0]}", "top_prob": probs[0],
        "n_active_features": int(rng.integers(2000, 9000)), "n_nodes": 3000, "n_edges": int(rng.integers(10**6, 4 * 10**6)),
        "n_features": 2900, "n_nodes_pruned": N_NODES, "n_edges_pruned": N_EDGES, "n_features_pruned": 120,
        "replacement_score": float(rng.random()), "completeness_score": float(rng.random()),
        "replacement_score_pruned": float(rng.random()), "completeness_score_pruned": float(rng.random()),
        "graph_rows": "pruned", "attribute_s": float(rng.random() * 4), "prune_s": float(rng.random() * 0.2),
        "write_s": 0.001, "worker": "bench-host:4242", "created_at": _dt.datetime.now(_dt.timezone.utc),
        "schema_version": 1}
    return key, row, nodes, edges


# --- worker processes ---------------------------------------------------------------------------------------
_W: dict = {}


def _init(configs: dict, sid: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from ct_ray.store.writer import RowBuffer

    _W["buf"] = RowBuffer(configs, sid)


def _ping(_=None) -> int:
    return os.getpid()


def key_order(n: int) -> np.ndarray:
    """Prompt indices 0..n-1 sorted by their key."""
    keys = np.array([key_of(i) for i in range(n)])
    return np.argsort(keys, kind="stable")


def _work(indices) -> tuple[dict, dict]:
    """What a sweep worker does for its prompts of a round, then the driver's flush."""
    buf = _W["buf"]
    t = collections.Counter()
    for i in indices.tolist():
        c0, w0 = time.process_time(), time.perf_counter()
        key, row, nodes, edges = prompt_rows(i)
        c1, w1 = time.process_time(), time.perf_counter()
        buf.add("nodes", nodes)
        buf.add("edges", edges)
        buf.add("graphs", pa.Table.from_pylist([row]))
        buf.finish("prompts", key, ok=True)
        c2, w2 = time.process_time(), time.perf_counter()
        t["gen_cpu"] += c1 - c0
        t["add_cpu"] += c2 - c1
        t["add_wall"] += w2 - w1
    c0, w0 = time.process_time(), time.perf_counter()
    report = buf.flush()
    t["flush_cpu"] += time.process_time() - c0
    t["flush_wall"] += time.perf_counter() - w0
    t["n"] += len(indices)
    return report, dict(t)


def write_new(url: str, catalog: str | None, n: int, workers: int, round_prompts: int, label: str) -> dict:
    """Write n prompts through RowBuffers in `workers` processes and a Committer; returns timings."""
    from ct_ray.store.commit import Committer
    from ct_ray.store.tables import Store
    from ct_ray.store.writer import sweep_writer_configs

    store = Store(url, catalog=catalog)
    configs = sweep_writer_configs(store)
    committer = Committer(store, SID)
    ctx = mp.get_context("spawn")
    t_start = time.perf_counter()
    commits, times = [], collections.Counter()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init, initargs=(configs, SID)) as ex:
        list(ex.map(_ping, range(workers * 4)))  # processes started and imported before the clock starts
        t_up = time.perf_counter() - t_start
        t0 = time.perf_counter()
        bounds = list(range(0, n, round_prompts)) + [n]
        rounds = collections.deque()
        order = key_order(n)  # prompts in key order, as the sweep runner schedules them

        def submit(lo, hi):
            step = math.ceil((hi - lo) / workers)
            rounds.append([ex.submit(_work, order[a:min(hi, a + step)]) for a in range(lo, hi, step)])

        def commit_oldest():
            for f in rounds.popleft():
                report, t = f.result()
                times.update(t)
                if not committer.add(report):
                    raise RuntimeError("a report was refused")
            c0 = time.perf_counter()
            committer.commit()
            commits.append(time.perf_counter() - c0)
            done = int(times["n"])
            if len(commits) % 10 == 0 or done == n:
                el = time.perf_counter() - t0
                print(f"  [{label}] {done}/{n} prompts committed, {done / el:.0f} prompts/s, "
                      f"last commit {commits[-1]:.2f} s", flush=True)

        for lo, hi in zip(bounds, bounds[1:]):
            submit(lo, hi)
            if len(rounds) > 1:  # the workers compute round r+1 while the driver commits round r
                commit_oldest()
        while rounds:
            commit_oldest()
        wall = time.perf_counter() - t0
    return {"prompts": n, "workers": workers, "round": round_prompts, "rounds": len(commits), "wall_s": wall,
            "startup_s": t_up, "prompts_per_s": n / wall, "commit_s": sum(commits), "commits": commits,
            "commit_median_s": statistics.median(commits), "commit_max_s": max(commits),
            "commit_first100_median_s": statistics.median(commits[:100]),
            "commit_last100_median_s": statistics.median(commits[-100:]),
            **{k: v for k, v in times.items() if k != "n"}}


# --- the old layout (baseline) ----------------------------------------------------------------------------------
def write_old(root: str, n: int) -> dict:
    """One Parquet file per prompt and table, hive directories, each written whole then renamed (the old Store)."""
    import io
    import uuid

    import pyarrow.parquet as pq

    from ct_ray.store.schemas import PARTITIONS, conform

    def put(table: str, key: str, t: pa.Table) -> None:
        t = conform(t, table).drop_columns([PARTITIONS[table]])
        buf = io.BytesIO()
        pq.write_table(t, buf, compression="zstd")
        d = f"{root}/{table}/sweep_id={SID}"
        os.makedirs(d, exist_ok=True)
        tmp = f"{d}/.{key}.parquet.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, f"{d}/{key}.parquet")

    gen = cpu = 0.0
    w0 = time.perf_counter()
    for i in range(n):
        c0 = time.process_time()
        key, row, nodes, edges = prompt_rows(i)
        c1 = time.process_time()
        put("nodes", key, nodes)
        put("edges", key, edges)
        put("graphs", key, pa.Table.from_pylist([row]))
        gen += c1 - c0
        cpu += time.process_time() - c1
    return {"prompts": n, "wall_s": time.perf_counter() - w0, "write_cpu_s": cpu, "gen_cpu_s": gen}


def old_connect(root: str, fs=None):
    """The old `connect`: a view per table over its hive directory, nodes/edges only of keys with an ok row."""
    import duckdb

    con = duckdb.connect()
    if fs is not None:
        con.register_filesystem(fs)
    for t in ("graphs", "nodes", "edges"):
        if fs is not None:
            fs.invalidate_cache()
            assert fs.glob(f"{root.split('://', 1)[-1]}/{t}/sweep_id=*/*.parquet")
        elif not os.path.isdir(f"{root}/{t}"):
            raise FileNotFoundError(f"{root}/{t}")
        src = (f"read_parquet('{root}/{t}/*/*.parquet', hive_partitioning=true, union_by_name=true, "
               f"hive_types={{'sweep_id': 'VARCHAR'}})")
        con.execute(f"CREATE VIEW {t if t == 'graphs' else 'raw_' + t} AS SELECT * FROM {src}")
    for t in ("nodes", "edges"):
        con.execute(f"CREATE VIEW {t} AS SELECT r.* FROM raw_{t} r SEMI JOIN graphs g "
                    "ON r.sweep_id = g.sweep_id AND r.key = g.key AND g.status = 'ok'")
    return con


def old_committed(root: str, fs=None) -> pa.Table:
    """The old resume planning: list the graphs partition, read key/status/error_kind of every file."""
    import pyarrow.dataset as pads

    part = f"{root.split('://', 1)[-1]}/graphs/sweep_id={SID}"
    if fs is None:
        names = [f"{part}/{p}" for p in os.listdir(part) if p.endswith(".parquet") and not p.startswith(".")]
    else:
        fs.invalidate_cache(part)
        names = [p for p in fs.ls(part, detail=False) if p.endswith(".parquet")]
    return pads.dataset(names, format="parquet", filesystem=fs).to_table(columns=["key", "status", "error_kind"])


# --- timing ---------------------------------------------------------------------------------------------------
def timed(fn, repeats: int) -> tuple[float, float, object]:
    ts, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), max(ts), out


def time_new(url: str, catalog: str | None, n: int, repeats: int) -> dict:
    from ct_ray.store.sql import query
    from ct_ray.store.tables import Store

    out = {}
    for name, sql in QUERIES.items():
        med, mx, r = timed(lambda sql=sql: query(sql, store=Store(url, catalog=catalog)), repeats)
        v = r.column(0)[0].as_py()
        if name.startswith("count"):
            assert v == n * N_EDGES, (name, v)
        out[name] = {"median_s": med, "max_s": mx, "value": v}
    med, mx, r = timed(lambda: Store(url, catalog=catalog).committed(SID), repeats)
    assert r.num_rows == n, r.num_rows
    out["resume planning"] = {"median_s": med, "max_s": mx, "value": r.num_rows}
    return out


EXTRA = {  # the query set of a large store, each through ct_ray's SQL and through pyiceberg / Polars directly
    "count(*) raw_edges": "SELECT count(*) FROM raw_edges",
    "GROUP BY nodes": "SELECT layer, feature, count(*) n, avg(activation) a FROM nodes GROUP BY ALL ORDER BY n DESC "
                      "LIMIT 10",
    "nodes JOIN graphs": "SELECT n.layer, avg(g.replacement_score) r, count(*) c FROM nodes n JOIN graphs g "
                         "USING (sweep_id, key) WHERE g.status = 'ok' GROUP BY 1 ORDER BY 1",
    "one key's edges": "SELECT count(*), sum(weight) FROM edges WHERE key = '{key}'",
}
TARGET_EXTRA = {"GROUP BY nodes": 30.0, "one key's edges": 0.5}


def time_extra(url: str, catalog: str | None, n: int, repeats: int, engines: bool = True) -> dict:
    """EXTRA through `ct_ray.store.sql.query`; one key's rows through `Store.read`, pyiceberg and Polars; counts and
    the GROUP BY through Polars (scan_iceberg, its native reader)."""
    import polars as pl
    from pyiceberg.expressions import EqualTo

    from ct_ray.store.catalog import identifier
    from ct_ray.store.sql import query
    from ct_ray.store.tables import Store

    os.environ.setdefault("POLARS_ICEBERG_PLANNER", "pyiceberg")
    keys = (key_of((7 + j * 7919) % n) for j in itertools.count())  # a new key each time
    out = {}

    def run(name, fn, check=None):
        med, mx, r = timed(fn, repeats)
        if check is not None:
            check(r)
        out[name] = {"median_s": med, "max_s": mx}
        print(f"    {name:<34} {med:7.3f} s", flush=True)

    for name, sql in EXTRA.items():
        def q(sql=sql):
            return query(sql.format(key=next(keys)), store=Store(url, catalog=catalog))
        if name.startswith("count"):
            run(f"{name} (sql)", q, lambda r: r.column(0)[0].as_py() == n * N_EDGES or sys.exit("count mismatch"))
        elif name.startswith("one key"):
            run(f"{name} (sql)", q, lambda r: r.column(0)[0].as_py() == N_EDGES or sys.exit("point read mismatch"))
        else:
            run(f"{name} (sql)", q)
    run("one key's edges (Store.read)", lambda: Store(url, catalog=catalog).read("edges", SID, keys=[next(keys)]),
        lambda r: r.num_rows == N_EDGES or sys.exit("Store.read mismatch"))
    if not engines:
        return out

    def table(name):
        return Store(url, catalog=catalog).catalog.load_table(identifier(name))

    run("one key's edges (pyiceberg)", lambda: table("edges").scan(row_filter=EqualTo("key", next(keys))).to_arrow(),
        lambda r: r.num_rows == N_EDGES or sys.exit("pyiceberg mismatch"))
    run("one key's edges (polars)", lambda: pl.scan_iceberg(table("edges"), reader_override="native")
        .filter(pl.col("key") == next(keys)).select(pl.len()).collect(),
        lambda r: r.item() == N_EDGES or sys.exit("polars mismatch"))
    run("count(*) edges (polars)", lambda: pl.scan_iceberg(table("edges"), reader_override="native")
        .select(pl.len()).collect(), lambda r: r.item() == n * N_EDGES or sys.exit("polars count mismatch"))
    run("GROUP BY nodes (polars)", lambda: pl.scan_iceberg(table("nodes"), reader_override="native")
        .group_by("layer", "feature").agg(pl.len().alias("n"), pl.col("activation").mean())
        .sort("n", descending=True).head(10).collect())
    return out


def time_old(root: str, n: int, repeats: int, fs=None) -> dict:
    out = {}
    for name, sql in QUERIES.items():
        def run(sql=sql):
            con = old_connect(root, fs)
            try:
                return con.sql(sql).fetchall()[0][0]
            finally:
                con.close()

        med, mx, v = timed(run, repeats)
        if name.startswith("count"):
            assert v == n * N_EDGES, (name, v)
        out[name] = {"median_s": med, "max_s": mx, "value": v}
    med, mx, r = timed(lambda: old_committed(root, fs), repeats)
    assert r.num_rows == n
    out["resume planning"] = {"median_s": med, "max_s": mx, "value": r.num_rows}
    return out


def file_stats(url: str, catalog: str | None) -> dict:
    """Per table: data files, bytes, rows of the current snapshot, and the worst partition's files vs
    ceil(bytes / 128 MiB)."""
    from ct_ray.store.commit import live_files
    from ct_ray.store.tables import Store

    st = Store(url, catalog=catalog)
    out = {}
    for t in ("graphs", "nodes", "edges"):
        files = live_files(st, t)
        parts = collections.defaultdict(lambda: [0, 0])
        for f in files:
            p = parts[str(f.partition[0])]
            p[0] += 1
            p[1] += f.file_size_in_bytes
        out[t] = {"files": len(files), "bytes": sum(f.file_size_in_bytes for f in files),
                  "rows": sum(f.record_count for f in files),
                  "per_128mib_ok": all(c <= max(1, math.ceil(b / 2**27)) for c, b in parts.values()),
                  "bound": sum(max(1, math.ceil(b / 2**27)) for c, b in parts.values())}
    return out


def fmt_files(s: dict) -> str:
    return ", ".join(f"{t} {v['files']} files / {v['bytes'] / 2**20:.0f} MiB (bound {v['bound']})" for t, v in s.items())


# --- main ---------------------------------------------------------------------------------------------------------
def start_moto() -> tuple[object, str]:
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return server, endpoint


class _SkipBaseline(Exception):
    pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, help="prompts in the big store (default 100000; 4000 with --s3)")
    ap.add_argument("--workers", type=int, default=4, help="worker processes, each with its RowBuffer")
    ap.add_argument("--round", type=int, help="prompts per commit round (default: what the sweep driver's byte rule "
                    "gives, commit.every_mb of Arrow rows)")
    ap.add_argument("--baseline-prompts", type=int, help="prompts in the old-layout baseline (default 2000; 500 with --s3)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--s3", action="store_true", help="on a moto S3 server instead of a local directory")
    ap.add_argument("--no-compact", action="store_true")
    ap.add_argument("--no-engines", action="store_true", help="skip the pyiceberg / Polars timings of the query set")
    ap.add_argument("--no-baseline", action="store_true", help="skip the old-layout baseline")
    ap.add_argument("--queries-only", metavar="JSON", help="time the queries on the store a previous run kept in --dir "
                    "(no write; write figures from that run's JSON)")
    ap.add_argument("--dir", help="work directory (default: a temp dir, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json")
    args = ap.parse_args()
    n = args.prompts or (4000 if args.s3 else 100_000)
    if args.round is None:
        from ct_ray.specs.common import CommitSpec

        _, row, nodes, edges = prompt_rows(0)
        per_prompt = nodes.nbytes + edges.nbytes + pa.Table.from_pylist([row]).nbytes
        args.round = max(1, int(CommitSpec().every_mb * 2**20 // per_prompt))
    n_old = args.baseline_prompts or (500 if args.s3 else 2000)
    work = Path(args.dir or tempfile.mkdtemp(prefix="ct_tables_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    for sub in ("new_small", "old", "catalogs") if args.queries_only else ("new", "new_small", "old", "catalogs"):
        shutil.rmtree(work / sub, ignore_errors=True)
    (work / "catalogs").mkdir()
    t_all = time.perf_counter()
    res = {"date": _dt.date.today().isoformat(), "cores": os.cpu_count(), "argv": sys.argv, "prompts": n,
           "baseline_prompts": n_old, "s3": args.s3, "load_avg_start": os.getloadavg()[0]}
    server = fs = None
    if args.s3:
        server, endpoint = start_moto()
        from ct_ray.store.fs import filesystem

        fs, _ = filesystem("s3://bench/old", endpoint_url=endpoint)
        url, url_small = "s3://bench/tables", "s3://bench/tables_small"
        cat, cat_small = (f"sqlite:///{work}/catalogs/{x}.db" for x in ("big", "small"))
    else:
        url, url_small = str(work / "new"), str(work / "new_small")
        cat = cat_small = None
    try:
        print(f"write: {n} prompts ({N_NODES} nodes, {N_EDGES} edges each), {args.workers} workers, "
              f"rounds of {args.round}, into {url}", flush=True)
        if args.queries_only:  # the store a previous run left in --dir (its write figures are in that run's JSON)
            res["write"] = json.loads(Path(args.queries_only).read_text())["write"]
        else:
            res["write"] = write_new(url, cat, n, args.workers, min(args.round, n), "new")
        res["files_before"] = file_stats(url, cat)
        print(f"  {fmt_files(res['files_before'])}", flush=True)
        res["queries"] = time_new(url, cat, n, args.repeats)
        print("  " + ", ".join(f"{k} {v['median_s']:.3f} s" for k, v in res["queries"].items()), flush=True)
        if not args.s3:
            res["extra"] = time_extra(url, cat, n, args.repeats, engines=not args.no_engines)
        if not args.s3 and not args.no_compact:
            try:
                from ct_ray.store.maintenance import compact
            except ImportError as e:
                res["compact"] = {"error": f"not run: {e}"}
            else:
                from ct_ray.store.tables import Store

                t0 = time.perf_counter()
                out = compact(Store(url, catalog=cat), older_than_s=0)
                res["compact"] = {"seconds": time.perf_counter() - t0, "result": out}
                res["files_after"] = file_stats(url, cat)
                print(f"  compacted in {res['compact']['seconds']:.1f} s: {fmt_files(res['files_after'])}", flush=True)
                res["queries_after"] = time_new(url, cat, n, args.repeats)
                res["extra_after"] = time_extra(url, cat, n, args.repeats, engines=not args.no_engines)
        if args.no_baseline:
            raise _SkipBaseline
        # baseline: the old layout at n_old, and the new one at the same size
        print(f"baseline: {n_old} prompts, old layout and new", flush=True)
        old_root = str(work / "old")
        res["old_write"] = write_old(old_root, n_old)
        if args.s3:
            t0 = time.perf_counter()
            fs.put(old_root + "/", "bench/old/", recursive=True)
            res["old_write"]["upload_s"] = time.perf_counter() - t0
            old_root = "s3://bench/old"
        res["old_queries"] = time_old(old_root, n_old, args.repeats, fs)
        res["small_write"] = write_new(url_small, cat_small, n_old, args.workers, min(args.round, n_old), "new, small")
        res["small_queries"] = time_new(url_small, cat_small, n_old, args.repeats)
    except _SkipBaseline:
        pass
    finally:
        if server is not None:
            server.stop()
    res["total_s"] = time.perf_counter() - t_all
    res["load_avg_end"] = os.getloadavg()[0]
    report(res, args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    if not args.dir and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(res: dict, args) -> None:
    n, n_old, w = res["prompts"], res["baseline_prompts"], res["write"]
    where = "S3 (moto, 127.0.0.1)" if res["s3"] else "local disk"
    ms = lambda s, k: 1000 * s / k
    write_ms = ms(w["add_cpu"] + w["flush_cpu"], n)
    lines = [
        "",
        f"==== tables benchmark: {n} prompts on {where}, {w['workers']} worker processes, "
        f"{w['rounds']} commit rounds of {w['round']} ====",
        f"write   {n / w['wall_s']:8.0f} prompts/s  ({w['wall_s']:.1f} s wall, workers started in {w['startup_s']:.1f} s "
        f"before the clock)",
        f"        per prompt: making the rows {ms(w['gen_cpu'], n):.2f} ms CPU; write overhead {write_ms:.2f} ms CPU "
        f"(RowBuffer.add {ms(w['add_cpu'], n):.2f} + flush to data files {ms(w['flush_cpu'], n):.2f}) "
        f"+ driver commit {ms(w['commit_s'], n):.3f} ms wall (median round {w['commit_median_s']:.2f} s, "
        f"max {w['commit_max_s']:.2f} s)",
        f"        commit per round: median of the first 100 rounds {w['commit_first100_median_s']:.3f} s, of the last 100 "
        f"{w['commit_last100_median_s']:.3f} s (ratio {w['commit_last100_median_s'] / w['commit_first100_median_s']:.2f}; "
        f"bar <= 1.5)",
        f"files   {fmt_files(res['files_before'])}",
    ]
    if "compact" in res:
        c = res["compact"]
        if "error" in c:
            lines.append(f"compact {c['error']}")
        else:
            ok = all(v["per_128mib_ok"] for v in res["files_after"].values())
            lines.append(f"compact {c['seconds']:.1f} s -> {fmt_files(res['files_after'])}: "
                         f"{'<= 1 file per 128 MiB per partition: OK' if ok else 'MORE files than ceil(bytes/128 MiB)'}")
    if "old_queries" not in res:
        lines += ["", f"{'operation (fresh Store each)':<36}{'target':>8}{'new':>10}{'compacted':>11}"]
        target = {**TARGET, **TARGET_EXTRA}
        rows = {**res["queries"], **res.get("extra", {})}
        after = {**res.get("queries_after", {}), **res.get("extra_after", {})}
        for k, v in rows.items():
            base = k.split(" (")[0]
            tg = target.get(base)
            a = after.get(k, {}).get("median_s")
            ok = "" if tg is None else ("ok" if max(v["median_s"], a or 0) < tg else "MISSED")
            lines.append(f"{k:<36}{(f'< {tg:g} s' if tg else ''):>8}{v['median_s']:>8.3f} s"
                         f"{(f'{a:>9.3f} s' if a is not None else ''):>11}  {ok}")
        lines.append(f"(medians of {args.repeats}; load average {res['load_avg_start']:.1f} -> {res['load_avg_end']:.1f}; "
                     f"total {res['total_s']:.0f} s)")
        print("\n".join(lines), flush=True)
        return
    head = f"{'operation (fresh Store each)':<28}{'target':>8}{'new':>10}"
    if "queries_after" in res:
        head += f"{'compacted':>11}"
    head += (f"{'old@' + str(n_old):>12}{'new@' + str(n_old):>12}{'old/new@' + str(n_old):>15}"
             f"{'old x' + str(n // n_old) + '/new':>14}")
    lines += ["", head]
    target = TARGET_S3 if res["s3"] else TARGET
    for k in res["queries"]:
        new = res["queries"][k]["median_s"]
        old, small = res["old_queries"][k]["median_s"], res["small_queries"][k]["median_s"]
        ok = "ok" if max([new] + [res[q][k]["median_s"] for q in ("queries_after",) if q in res]) < target[k] else "MISSED"
        s = f"{k:<28}{f'< {target[k]:g} s':>8}{new:>8.3f} s"
        if "queries_after" in res:
            s += f"{res['queries_after'][k]['median_s']:>9.3f} s"
        s += f"{old:>10.3f} s{small:>10.3f} s{old / small:>14.1f}x{old * n / n_old / new:>13.0f}x  {ok}"
        lines.append(s)
    ow = res["old_write"]
    lines += [
        "",
        f"old-layout write at {n_old} prompts: {ms(ow['write_cpu_s'], n_old):.2f} ms CPU per prompt (3 files each; "
        f"new: {write_ms:.2f} ms + commit), {n_old / ow['wall_s']:.0f} prompts/s in one process"
        + (f"; upload to S3 {ow['upload_s']:.1f} s" if "upload_s" in ow else ""),
        f"new layout at {n_old} prompts: {res['small_write']['prompts_per_s']:.0f} prompts/s",
        f"(old x{n // n_old}: the old layout's time scaled linearly to {n} prompts, one file per prompt and table;"
        f" medians of {args.repeats}; load average {res['load_avg_start']:.1f} -> {res['load_avg_end']:.1f};"
        f" total {res['total_s']:.0f} s)",
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
