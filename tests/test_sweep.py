"""Prompt sweeps on a real (local) Ray: tables complete and identical to attribute(), re-runs, worker kills,
interrupted drivers, bad prompts. S3 and SQL round trips are in test_sweep_s3.py."""

import os
import signal

import numpy as np
import pyarrow.compute as pc
import pytest

from ct_ray import attribute, load_clt, load_model
from ct_ray.cli import main as cli_main
from ct_ray.store.sql import connect, query
from ct_ray.store.tables import Store
from ct_ray.sweep import parse_sweep_spec, read_prompts, run_sweep

PROMPTS = ["The cat sat on", "Once upon a time", "1 2 3 4", "hello world", "abcabcabc", "Paris is in",
           "red green blue", "x = y + z", "What is the", "zzz top", "the end of the line is near", "quiet night"]


def make_spec(tiny_dir, clt_dir, store, sweep_id, prompts, **kw):
    return parse_sweep_spec({"sweep_id": sweep_id, "model": str(tiny_dir), "clt": clt_dir, "prompts": prompts,
                             "storage": str(store), "resources": {"workers": 2, "num_cpus": 1},
                             "attribution": {"max_n_logits": 5, "batch_size": 64}, **kw})


def check_consistent(store_url: str, sweep_id: str, n_keys: int, **storage_options):
    """Exactly one graphs row per key; nodes/edges of every ok key complete; edges reference existing nodes."""
    con = connect(store_url, **storage_options)
    q = lambda sql: con.execute(sql, [sweep_id]).fetchall()
    assert q("SELECT count(*), count(DISTINCT key) FROM graphs WHERE sweep_id = ?") == [(n_keys, n_keys)]
    # every ok graph's pruned node/edge counts match its rows, no duplicates
    bad = q("""SELECT g.key FROM graphs g
               LEFT JOIN (SELECT key, count(*) n, count(DISTINCT node) d FROM nodes WHERE sweep_id = $1 GROUP BY key) n
                 USING (key)
               LEFT JOIN (SELECT key, count(*) e FROM edges WHERE sweep_id = $1 GROUP BY key) e USING (key)
               WHERE g.sweep_id = $1 AND g.status = 'ok'
                 AND (n.n IS DISTINCT FROM g.n_nodes_pruned OR n.d != n.n OR coalesce(e.e, 0) != g.n_edges_pruned)""")
    assert bad == []
    dangling = q("""SELECT count(*) FROM edges e WHERE sweep_id = $1 AND NOT EXISTS
                    (SELECT 1 FROM nodes n WHERE n.sweep_id = $1 AND n.key = e.key AND n.node = e.source)
                    OR sweep_id = $1 AND NOT EXISTS
                    (SELECT 1 FROM nodes n WHERE n.sweep_id = $1 AND n.key = e.key AND n.node = e.target)""")
    assert dangling == [(0,)]
    con.close()


def test_sweep_tables_match_attribute_and_rerun_skips(ray_local, tiny_dir, clt_dir, tmp_path):
    # prompts from a text file with bad lines: empty, non-UTF-8, longer than the context (max_pos 32), a duplicate
    lines = [p.encode() for p in PROMPTS[:8]] + [b"", b"bad \xff\xfe bytes", b"y" * 40, PROMPTS[0].encode()]
    (tmp_path / "prompts.txt").write_bytes(b"\n".join(lines) + b"\n")
    store = tmp_path / "store"
    spec = make_spec(tiny_dir, clt_dir, store, "s1", {"url": str(tmp_path / "prompts.txt")},
                     perturbation={"top_k": 2, "interventions": [{"op": "scale", "value": -1}],
                                   "function": "ct_ray.sweep.perturbation:predicted_only"})
    r = run_sweep(spec)
    assert (r.n_prompts, r.duplicates, r.skipped, r.ok, r.failed, r.perturbed) == (11, 1, 0, 8, 3, 8)
    kinds = sorted((k, m.split(" (")[0]) for _, k, m in r.errors)
    assert kinds == [("prompt", "empty prompt"), ("prompt", "prompt has 41 tokens, more than the model context of 32"),
                     ("prompt", "prompt is not valid UTF-8")]
    check_consistent(str(store), "s1", 11)

    # identical to calling attribute() + prune() directly
    lm, clt = load_model(tiny_dir), load_clt(clt_dir)
    st = Store(str(store))
    nodes, edges = st.read("nodes", "s1"), st.read("edges", "s1")
    assert nodes.num_rows and edges.num_rows
    graphs = st.read("graphs", "s1")
    items = {i.key: i for i in read_prompts(spec)[0]}
    for key, status in zip(graphs.column("key").to_pylist(), graphs.column("status").to_pylist()):
        if status != "ok":
            continue
        g = attribute(lm, clt, items[key].prompt, max_n_logits=5, batch_size=64)
        p = g.prune()
        n = nodes.filter(pc.equal(nodes.column("key"), key))
        e = edges.filter(pc.equal(edges.column("key"), key))
        for col in ("node", "node_id", "kind", "layer", "position", "feature", "token", "token_str"):
            assert n.column(col).to_pylist() == p.nodes.column(col).to_pylist(), col
        for col in ("activation", "influence"):
            np.testing.assert_allclose(n.column(col).to_numpy(), p.nodes.column(col).to_numpy(), rtol=1e-5, atol=1e-6)
        pe = p.edges()
        assert e.column("source").to_pylist() == pe.column("source").to_pylist()
        assert e.column("target").to_pylist() == pe.column("target").to_pylist()
        np.testing.assert_allclose(e.column("weight").to_numpy(), pe.column("weight").to_numpy(), rtol=1e-4, atol=1e-6)
        row = graphs.filter(pc.equal(graphs.column("key"), key)).to_pylist()[0]
        assert row["tokens"] == g.meta["tokens"] and row["n_nodes"] == g.n_nodes and row["n_edges"] == g.n_edges
        assert row["completeness_score"] == pytest.approx(g.scores()["completeness_score"], rel=1e-5)

    # one perturbation file per ok graph: top_k nodes x interventions x logits
    pert = query("SELECT key, count(DISTINCT node) n FROM perturbations WHERE sweep_id = 's1' GROUP BY key", str(store))
    assert pert.num_rows == 8 and set(pert.column("n").to_pylist()) == {2}

    # every example query of docs/sql.md runs on a real sweep's tables
    from .test_sql import DOCS, sql_blocks

    con = connect(str(store))
    examples = [q for b in sql_blocks(DOCS.read_text()) if b.startswith("-- example")
                for q in b.split(";") if q.strip()]
    assert len(examples) >= 5
    for q in examples:
        con.sql(q.replace("'quickstart'", "'s1'")).fetchall()
    assert con.execute("SELECT count(*) FROM perturbations WHERE status = 'ok'").fetchone()[0] > 0
    con.close()

    # a re-run finds everything committed: no worker starts, nothing is written (no new snapshot)
    snaps = {t: st.table(t).current_snapshot().snapshot_id for t in ("graphs", "nodes", "edges", "perturbations")}
    mtimes = {p: p.stat().st_mtime_ns for p in store.rglob("*.parquet")}
    r2 = run_sweep(spec)
    assert (r2.skipped, r2.ok, r2.failed, r2.perturbed) == (11, 0, 0, 0) and r2.seconds < 5
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*.parquet")} == mtimes
    assert {t: Store(str(store)).table(t).current_snapshot().snapshot_id for t in snaps} == snaps

    # status from storage alone, through the CLI
    assert cli_main(["sweep", "status", "s1", "--store", str(store)]) == 0
    assert cli_main(["sql", "--store", str(store), "--format", "csv",
                     "SELECT status, count(*) n FROM graphs GROUP BY status ORDER BY status"]) == 0


def test_sigkill_worker_mid_sweep_and_a_prompt_that_kills_its_worker(ray_local, tiny_dir, clt_dir, tmp_path,
                                                                      monkeypatch):
    """A worker SIGKILLed mid-sweep costs nothing (its prompts re-run, alone, elsewhere or after its restart);
    a prompt that kills its worker every time becomes an error row after `retries` re-runs; the sweep finishes."""
    from ct_ray.sweep.worker import CRASH_ENV

    store = tmp_path / "store"
    monkeypatch.setenv(CRASH_ENV, "poison prompt")
    spec = make_spec(tiny_dir, clt_dir, store, "kill", PROMPTS + ["poison prompt"], retries=1)
    killed = []

    def on_event(kind, out):
        if kind == "prompt" and not killed:
            killed.append(out["pid"])
            os.kill(out["pid"], signal.SIGKILL)  # its queued prompt is in flight

    r = run_sweep(spec, on_event=on_event)
    assert killed and r.ok == len(PROMPTS) and r.failed == 1
    assert r.errors[0][:2] == (len(PROMPTS), "worker") and "died 2 time(s)" in r.errors[0][2]
    check_consistent(str(store), "kill", len(PROMPTS) + 1)
    # the killed worker's rows were buffered, never committed: they were lost with it and re-run elsewhere
    workers = set(query("SELECT worker FROM graphs WHERE status = 'ok'", str(store)).column("worker").to_pylist())
    assert workers and not any(w.endswith(f":{killed[0]}") for w in workers)
    # the poison prompt's error is transient ('worker'): a re-run tries it again, the rest is skipped
    monkeypatch.delenv(CRASH_ENV)
    r2 = run_sweep(spec)
    assert (r2.skipped, r2.ok, r2.failed) == (len(PROMPTS), 1, 0)


def test_interrupted_driver_resumes_without_duplicates(ray_local, tiny_dir, clt_dir, tmp_path):
    store = tmp_path / "store"
    spec = make_spec(tiny_dir, clt_dir, store, "resume", PROMPTS, resources={"workers": 1, "num_cpus": 1},
                     commit={"every_prompts": 2})
    seen = []

    def interrupt(kind, out):
        seen.append(kind)
        if seen.count("commit") == 2:
            raise KeyboardInterrupt  # Ctrl-C on the driver: workers die with it, in-flight work is lost

    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, on_event=interrupt)
    done = Store(str(store)).committed("resume").column("key").to_pylist()
    assert 4 <= len(done) < len(PROMPTS)
    r = run_sweep(spec)
    assert r.skipped == len(done) and r.ok == len(PROMPTS) - len(done)
    check_consistent(str(store), "resume", len(PROMPTS))


def test_rounds_are_sized_by_bytes_and_files_by_key(ray_local, tiny_dir, clt_dir, tmp_path):
    """commit.every_mb: a round once the workers hold that many bytes of rows (here about one prompt's), not a count;
    prompts run in key order, so rounds hold increasing key ranges (their files' key bounds do not interleave)."""
    from ct_ray.store.visibility import round_snapshots

    store = tmp_path / "store"
    spec = make_spec(tiny_dir, clt_dir, store, "bytes", PROMPTS[:6], resources={"workers": 1, "num_cpus": 1},
                     commit={"every_mb": 0.0001, "every_seconds": 3600})
    assert run_sweep(spec).ok == 6
    check_consistent(str(store), "bytes", 6)
    st = Store(str(store))
    # more than the final round, none forced by a count or a time (how many depends on when results arrive)
    assert len(round_snapshots(st.table("edges"), "bytes")) >= 2
    files = sorted((f.lower_bounds[1], f.upper_bounds[1]) for f in
                   (task.file for task in st.table("edges").scan().plan_files()))
    assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(files, files[1:]))


def test_worker_start_failure_is_one_clear_error(ray_local, tiny_dir, tmp_path):
    from ct_ray.errors import CTRayError

    spec = make_spec(tiny_dir, str(tmp_path / "no_clt"), tmp_path / "store", "nostart", PROMPTS[:2],
                     resources={"workers": 1, "num_cpus": 1})
    with pytest.raises(CTRayError, match="sweep worker cannot start: no CLT at"):
        run_sweep(spec)
    assert Store(str(tmp_path / "store")).committed("nostart").num_rows == 0


def test_a_prompt_utf8_cannot_encode_is_one_error_row(ray_local, tiny_dir, tmp_path):
    """Issue 21 item 4: a lone surrogate (a YAML or JSON escape) in a prompt or a target, inline or in a JSONL file,
    gets an error row of kind 'prompt'; the other prompts are committed and a re-run skips it."""
    from ct_ray.store.tables import Store
    from ct_ray.sweep import parse_sweep_spec

    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a\\ud800b"}\n{"prompt": "The cat sat on"}\n')
    for i, prompts in enumerate([["x\ud800y", {"prompt": "ok", "target": "t\udfffu"}, "The cat sat on"],
                                 {"url": str(jsonl)}]):
        spec = parse_sweep_spec({"sweep_id": f"u{i}", "model": str(tiny_dir), "prompts": prompts,
                                 "random_clt": {"features": 8}, "storage": str(tmp_path / "store"),
                                 "resources": {"workers": 1, "num_cpus": 1}})
        r = run_sweep(spec)
        n_bad = len(prompts) - 1 if isinstance(prompts, list) else 1
        assert (r.ok, r.failed) == (1, n_bad)
        rows = Store(str(tmp_path / "store")).read("graphs", f"u{i}").to_pylist()
        bad = [x for x in rows if x["status"] != "ok"]
        assert len(bad) == n_bad and all(x["error_kind"] == "prompt" and "lone surrogate" in x["error"] for x in bad)
        assert any("\\ud800" in x["prompt"] for x in bad)
        assert run_sweep(spec).skipped == n_bad + 1
