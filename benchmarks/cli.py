"""CLI start-up benchmark: how long `ct-ray` takes before it does anything, and whether it loaded torch.

Each command runs in a fresh subprocess (`python -c "from ct_ray.cli import main; ..."`, what the console script
does), --repeats times; the best wall time is reported. Baselines measured in the same run: a bare interpreter
(`python -c pass`), `python -c "import duckdb"` (what `ct-ray sql` cannot avoid) and the imports of pyiceberg's SQL
catalog, its pyarrow FileIO and tables (what `tables list` and `sweep status` cannot avoid: opening a table). The
stores are made by this script without Ray (the commit path of the sweep driver, as tests/test_sql.py does): an empty
folder for `sql`, a store with one committed sweep of five keys for `tables list` and `sweep status`.

At the end: the slowest imports of `python -X importtime -c "import ct_ray.cli"` and of `ct-ray --help`.

    python benchmarks/cli.py                        # this checkout, best of 5
    python benchmarks/cli.py --repo /tmp/ct_before  # another checkout of ct_ray (e.g. a git worktree of an older
                                                    # commit), with this checkout's interpreter and packages
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# runs the CLI as the console script does, and reports on stderr which heavy modules it had loaded at exit
RUNNER = ("import atexit, sys\n"
          "def _report():\n"
          "    heavy = [m for m in ('torch', 'transformers', 'ray') if m in sys.modules]\n"
          "    sys.stderr.write('\\nBENCH-LOADED ' + ','.join(heavy) + '\\n')\n"
          "atexit.register(_report)\n"
          "from ct_ray.cli import main\n"
          "sys.exit(main(sys.argv[1:]))\n")


# what opening an Iceberg table costs before any ct_ray code: the floor of `tables list` and `sweep status`
PYICEBERG = "import pyiceberg.catalog.sql, pyiceberg.io.pyarrow, pyiceberg.table"


def make_stores(tmp: Path) -> tuple[str, str]:
    """An empty folder, and a store with sweep 's' (keys a-d ok, e error) committed through the driver's path."""
    sys.path.insert(0, str(REPO))
    from ct_ray.store.commit import Committer
    from ct_ray.store.tables import Store
    from ct_ray.store.writer import RowBuffer, sweep_writer_configs

    empty = tmp / "empty"
    empty.mkdir()
    st = Store(str(tmp / "store"))
    buf = RowBuffer(sweep_writer_configs(st), "s")
    for key, status in (("a", "ok"), ("b", "ok"), ("c", "ok"), ("d", "ok"), ("e", "error")):
        buf.add("nodes", [{"key": key, "node": 0, "kind": "feature", "kept": True}])
        buf.add("edges", [{"key": key, "source": 0, "target": 0, "weight": 1.0}])
        buf.add("graphs", [{"key": key, "status": status}])
        buf.finish("prompts", key, ok=status == "ok")
    c = Committer(st, "s")
    assert c.add(buf.flush())
    c.commit()
    return str(empty), st.url


def run_once(argv: list[str], env: dict, cwd: str) -> tuple[float, int, str, str]:
    t = time.perf_counter()
    r = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    dt = time.perf_counter() - t
    loaded = ""
    for line in r.stderr.splitlines():
        if line.startswith("BENCH-LOADED"):
            loaded = line[len("BENCH-LOADED"):].strip()
    return dt, r.returncode, loaded, r.stderr


def importtime_top(argv: list[str], env: dict, cwd: str, n: int) -> list[tuple[int, int, str]]:
    r = subprocess.run([sys.executable, "-X", "importtime", *argv], env=env, cwd=cwd, capture_output=True, text=True,
                       timeout=600)
    rows = []
    for line in r.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cum_us, name = line[len("import time:"):].split("|")
        rows.append((int(cum_us), int(self_us), name.rstrip()))
    top = sorted(rows, reverse=True)[:n]
    return top


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=str(REPO), help="checkout whose ct_ray is timed (default: this one)")
    ap.add_argument("--repeats", type=int, default=5, help="runs per command; the best is reported (default 5)")
    ap.add_argument("--top", type=int, default=15, help="import-time entries printed (default 15)")
    args = ap.parse_args()

    repo = str(Path(args.repo).resolve())
    env = {**os.environ, "PYTHONPATH": repo, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("CT_RAY_CATALOG", None)  # the stores' own SQLite catalogs
    where = subprocess.run([sys.executable, "-c", "import ct_ray.cli; print(ct_ray.cli.__file__)"], env=env,
                           capture_output=True, text=True, cwd=repo).stdout.strip()
    print(f"ct_ray.cli from {where}; python {sys.version.split()[0]} ({sys.executable}); "
          f"{os.cpu_count()} CPUs, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    with tempfile.TemporaryDirectory() as d:
        empty, store = make_stores(Path(d))
        py = [sys.executable, "-c"]
        ct = [*py, RUNNER]
        cases = [
            ("python -c pass (baseline)", [*py, "pass"], None),
            ("python -c 'import duckdb' (baseline)", [*py, "import duckdb"], None),
            ("python -c 'import pyiceberg...' (baseline)", [*py, PYICEBERG], None),
            ("ct-ray --help", [*ct, "--help"], 0),
            ('ct-ray sql "SELECT 1" (empty store)', [*ct, "sql", "SELECT 1", "--store", empty], 0),
            ("ct-ray tables list", [*ct, "tables", "list", "--store", store], 0),
            ("ct-ray sweep status s", [*ct, "sweep", "status", "s", "--store", store], 0),
            ("ct-ray export --help", [*ct, "export", "--help"], 0),
            ("ct-ray serve --help", [*ct, "serve", "--help"], 0),
        ]
        print(f"\nbest of {args.repeats} fresh processes (median in brackets):")
        print(f"{'command':<44} {'best s':>7} {'median':>8}  torch/transformers/ray loaded")
        for name, argv, want_rc in cases:
            times, loaded, rc, err = [], "", 0, ""
            for _ in range(args.repeats):
                dt, rc, loaded, err = run_once(argv, env, d)
                times.append(dt)
            if want_rc is not None and rc != want_rc:
                print(f"{name:<44} exit {rc}: {err.strip().splitlines()[-1] if err.strip() else ''}")
                continue
            times.sort()
            flag = "" if want_rc is None else (loaded or "none")
            print(f"{name:<44} {times[0]:7.3f} {f'({times[len(times) // 2]:.3f})':>8}  {flag}")

        for title, argv in (('python -X importtime -c "import ct_ray.cli"', ["-c", "import ct_ray.cli"]),
                            ("python -X importtime <ct-ray> --help", ["-c", RUNNER, "--help"])):
            print(f"\n{title}: top {args.top} by cumulative time (us: cumulative, self)")
            for cum, self_us, name in importtime_top(argv, env, d, args.top):
                print(f"  {cum:>9} {self_us:>9}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
