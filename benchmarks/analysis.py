"""Analysis benchmark: `ct-ray analyze` (feature_stats + circuit_paths) on the synthetic sweep store of
benchmarks/tables.py, against the hand-written SQL a user writes today for the one aggregate it replaces.

  1. the store: --prompts synthetic prompts written through the real commit path (tables.py's `write_new`: 150 nodes,
     1,500 edges per prompt), or the one already in --dir;
  2. baseline, measured in the same run: DuckDB (`ct-ray sql`'s engine) over the same tables, the GROUP BY of
     recurring features (prompts, activation mean/max, summed influence per feature): no paths, no top lists;
  3. `ct-ray analyze bench --workers W` as a subprocess: wall time and the peak memory of its whole process tree
     (driver, Ray daemons and task workers), sampled every 0.2 s: summed PSS (shared pages split between their
     users: the tree's footprint) and summed RSS (shared pages counted once per process);
  4. the same command again: the tables' row counts must not change (partitions replaced, never appended), and
     feature_stats must hold one row per feature.
Targets (issue 22): <= 300 s and peak RSS <= 4 GB at 100,000 prompts on the 2-core machine.

    python benchmarks/analysis.py --prompts 4000 --workers 1          # a quick check (~1 minute)
    python benchmarks/analysis.py --dir /tmp/bench_an --keep --json /tmp/bench_an/analysis.json   # 100,000 prompts
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

BASELINE_SQL = """SELECT layer, feature, count(DISTINCT key) AS n_prompts, count(*) AS n_nodes,
                         avg(activation) AS act_mean, max(activation) AS act_max, sum(influence) AS influence
                  FROM nodes WHERE sweep_id = 'bench' AND kind = 'feature' GROUP BY layer, feature"""


def tree_memory(pid: int) -> tuple[int, int]:
    """(Σ RSS, Σ PSS) of a process and its descendants. RSS counts pages shared between processes (Ray's object
    store, libraries) once per process; PSS splits each shared page between its users, so its sum is the tree's
    real footprint."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    rss = pss = 0
    for q in procs:
        try:
            m = q.memory_full_info()
            rss, pss = rss + m.rss, pss + m.pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss, pss


def run_analyze(url: str, workers: int) -> dict:
    cmd = [sys.executable, "-m", "ct_ray.cli", "analyze", "bench", "--store", url, "--workers", str(workers),
           "--no-progress", "--show", "3"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak = [0, 0]

    def sample():
        while proc.poll() is None:
            rss, pss = tree_memory(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out = proc.communicate()[0]
    wall = time.perf_counter() - t0
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"ct-ray analyze failed ({proc.returncode}):\n{out}")
    return {"wall_s": wall, "peak_rss_mb": peak[0] / 2**20, "peak_pss_mb": peak[1] / 2**20, "output": out.strip()}


def counts(url: str) -> dict:
    from ct_ray.store.sql import query
    from ct_ray.store.tables import Store

    st = Store(url)
    q = lambda s: query(s, store=st).to_pylist()[0]  # noqa: E731
    return {**q("SELECT count(*) AS feature_rows, count(DISTINCT (clt, layer, feature)) AS features "
                "FROM feature_stats WHERE sweep_id = 'bench'"),
            **q("SELECT count(*) AS path_rows, count(DISTINCT key) AS graphs, count(DISTINCT path) AS paths "
                "FROM circuit_paths WHERE sweep_id = 'bench'")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2, help="analyze --workers (Ray tasks in flight)")
    ap.add_argument("--dir", help="work directory (default: a temp dir); a store already there is reused")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="ct_analysis_bench_"))
    url = str(work / f"store{args.prompts}")
    res: dict = {"prompts": args.prompts, "workers": args.workers, "cores": os.cpu_count()}
    try:
        from ct_ray.store.tables import Store

        have = Store(url).committed("bench").num_rows if os.path.exists(url) else 0
        if have != args.prompts:
            import tables as tb

            shutil.rmtree(url, ignore_errors=True)
            print(f"writing {args.prompts} synthetic prompts to {url} ...", flush=True)
            res["write"] = tb.write_new(url, None, args.prompts, 2, 2000, "write")
        else:
            print(f"reusing {url} ({have} prompts)")
        from ct_ray.store.sql import query

        t0 = time.perf_counter()
        base = query(BASELINE_SQL, store=Store(url))
        res["baseline_sql_s"] = time.perf_counter() - t0
        res["baseline_features"] = base.num_rows
        print(f"baseline (DuckDB GROUP BY of recurring features): {res['baseline_sql_s']:.1f} s, {base.num_rows} features")
        first = run_analyze(url, args.workers)
        res["first"] = {**first, **counts(url)}
        print(first["output"])
        second = run_analyze(url, args.workers)
        res["second"] = {**second, **counts(url)}
        keys = ("feature_rows", "features", "path_rows", "graphs", "paths")
        res["idempotent"] = all(res["first"][k] == res["second"][k] for k in keys) and \
            res["second"]["feature_rows"] == res["second"]["features"] == res["baseline_features"] and \
            res["second"]["graphs"] == args.prompts
        for name in ("first", "second"):
            r = res[name]
            print(f"analyze ({name} run): {r['wall_s']:.1f} s, peak PSS {r['peak_pss_mb']:.0f} MB (RSS summed "
                  f"{r['peak_rss_mb']:.0f} MB) over its process tree; "
                  f"{r['feature_rows']} feature_stats rows, {r['path_rows']} circuit_paths rows over {r['graphs']} "
                  f"graphs ({r['paths']} distinct paths)")
        print(f"ratio analyze / baseline SQL: {res['first']['wall_s'] / res['baseline_sql_s']:.1f}x (analyze also "
              f"computes paths, pushes and top lists)")
        print(f"targets: <= 300 s: {'met' if res['first']['wall_s'] <= 300 else 'MISSED'}; peak <= 4096 MB (PSS): "
              f"{'met' if res['first']['peak_pss_mb'] <= 4096 else 'MISSED'}; idempotent: {res['idempotent']}")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({k: v for k, v in res.items()}, indent=1, default=str))
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
