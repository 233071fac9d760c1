"""Importing an old per-file store (one Parquet file per prompt and table) into the Iceberg tables: exactly the rows
the old readers showed, once, however often the import runs or wherever it was cut short."""

import datetime as _dt
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ct_ray.store.migrate import LEGACY_TABLES, import_legacy
from ct_ray.store.schemas import PARTITIONS, SCHEMAS, TABLE_NAMES
from ct_ray.store.sql import query
from ct_ray.store.tables import Store


def file_schema(name):
    return pa.schema([f for f in SCHEMAS[name] if f.name != PARTITIONS[name]])


def put(root, rel, rows, schema=None):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, compression="zstd")


def graph_row(key, status="ok", i=0):
    t = _dt.datetime(2026, 11, 1, tzinfo=_dt.timezone.utc)
    row = {"key": key, "prompt_index": i, "prompt": f"prompt {key}", "status": status, "model": "tiny", "clt": "c",
           "params": "{}", "worker": "h:1", "created_at": t, "schema_version": 1}
    if status == "ok":
        row.update(n_tokens=3, tokens=[1, 2, 3], token_strs=["a", "b", "c"], logit_tokens=[7], logit_strs=["x"],
                   logit_probs=[0.5], completeness_score=0.25 + i, n_nodes=2, n_edges=3)
    else:
        row.update(error_kind="prompt", error="empty prompt")
    return row


def nodes(key, n=2):
    return [{"key": key, "node": i, "node_id": f"0_{i}_1", "kind": "feature", "layer": 0, "position": 1,
             "feature": i, "activation": 1.0 + i, "kept": True} for i in range(n)]


def edges(key, n=3):
    return [{"key": key, "source": i, "target": (i + 1) % n, "weight": 0.5 * i, "kept": i % 2 == 0} for i in range(n)]


def perts(key, plan, n=2):
    return [{"key": key, "plan": plan, "intervention": i, "node": i, "op": "scale", "value": -1.0, "mode": "free",
             "predicted_delta": 0.1 * i, "status": "ok"} for i in range(n)]


def legacy_store(root):
    """An old-layout store: committed keys, an uncommitted key, an error key with a stray file, a stale features
    job, a features partition with no commit record, a train_metrics run and a sweep plan."""
    for sid, keys in (("s1", ["a", "d", "e"]), ("007", ["a"])):
        for i, k in enumerate(keys):
            row = graph_row(k, i=i)
            schema = file_schema("graphs")
            if k == "e":  # a file of an older schema version: a column missing, read as null
                schema = pa.schema([f for f in schema if f.name != "completeness_score"])
                row.pop("completeness_score")
            put(root, f"graphs/sweep_id={sid}/{k}.parquet", [row], schema)
            put(root, f"nodes/sweep_id={sid}/{k}.parquet", nodes(k), file_schema("nodes"))
            put(root, f"edges/sweep_id={sid}/{k}.parquet", edges(k), file_schema("edges"))
    put(root, "perturbations/sweep_id=s1/a.p1.parquet", perts("a", "p1"), file_schema("perturbations"))
    put(root, "perturbations/sweep_id=s1/d.p0.parquet", perts("d", "p0", 1), file_schema("perturbations"))
    put(root, "perturbations/sweep_id=s1/d.p1.0.parquet", perts("d", "p1", 3), file_schema("perturbations"))
    # b: an error row (its stray nodes file is of a dead attempt); c: files but no graphs row (never committed)
    put(root, "graphs/sweep_id=s1/b.parquet", [graph_row("b", "error", 9)], file_schema("graphs"))
    put(root, "nodes/sweep_id=s1/b.parquet", nodes("b"), file_schema("nodes"))
    for t, rows in (("nodes", nodes("c")), ("edges", edges("c")), ("perturbations", perts("c", "p1"))):
        put(root, f"{t}/sweep_id=s1/c{'.p1' if t == 'perturbations' else ''}.parquet", rows, file_schema(t))
    put(root, "nodes/sweep_id=s1/.a.parquet.tmp-0badc0de", nodes("a"), file_schema("nodes"))  # a killed writer's
    # features: the committed job J2 (two layers), a replaced job J1; clt2 never committed (no job.json)
    feat = lambda job, layer, n: [{"job": job, "clt": "clt1", "model": "tiny", "layer": layer, "feature": f,
                                   "node_prefix": f"{layer}_{f}_", "n_tokens": 100, "n_active": f, "density": f / 100,
                                   "top_contexts": [{"context": 1, "doc": 0, "offset": 0, "position": 2,
                                                     "activation": 1.5, "tokens": ["x", "y"], "acts": [0.0, 1.5]}],
                                   "quantile_samples": [], "schema_version": 1} for f in range(n)]
    put(root, "features/clt_id=clt1/J1.000.parquet", feat("J1", 0, 5), file_schema("features"))
    put(root, "features/clt_id=clt1/J2.000.parquet", feat("J2", 0, 4), file_schema("features"))
    put(root, "features/clt_id=clt1/J2.001.parquet", feat("J2", 1, 4), file_schema("features"))
    put(root, "features/clt_id=clt2/J9.000.parquet", feat("J9", 0, 2), file_schema("features"))
    os.makedirs(os.path.join(root, "_features", "clt1"), exist_ok=True)
    with open(os.path.join(root, "_features", "clt1", "job.json"), "w") as f:
        json.dump({"job": "J2", "clt_id": "clt1", "n_layers": 2}, f)
    # the old train_metrics table: the run column in the file, a history key that is not in the schema
    hist = pa.table({"run": ["r1"] * 3, "step": [50, 25, 75], "loss_mse": [0.2, 0.3, 0.1], "fvu": [0.5, 0.6, 0.4],
                     "l0": [10.0, 12.0, 9.0], "fvu_per_layer": [[0.5, 0.5]] * 3, "lr": [1e-3] * 3, "aux": [1, 2, 3]})
    os.makedirs(os.path.join(root, "tables", "train_metrics", "run=r1"))
    pq.write_table(hist, os.path.join(root, "tables", "train_metrics", "run=r1", "part-0.parquet"))
    os.makedirs(os.path.join(root, "_sweeps", "s1"), exist_ok=True)
    with open(os.path.join(root, "_sweeps", "s1", "plan.json"), "w") as f:
        json.dump({"sweep_id": "s1", "keys": ["a", "b", "c", "d", "e"]}, f)


def snapshots(store):
    out = {}
    for t in TABLE_NAMES:
        tab = store.existing_table(t)
        out[t] = None if tab is None or tab.current_snapshot() is None else tab.current_snapshot().snapshot_id
    return out


def rows_of(url, sql):
    return query(sql, url).to_pylist()


def check_imported(url):
    assert rows_of(url, "SELECT sweep_id, key, status FROM graphs ORDER BY 1, 2") == [
        {"sweep_id": "007", "key": "a", "status": "ok"}, {"sweep_id": "s1", "key": "a", "status": "ok"},
        {"sweep_id": "s1", "key": "b", "status": "error"}, {"sweep_id": "s1", "key": "d", "status": "ok"},
        {"sweep_id": "s1", "key": "e", "status": "ok"}]
    # every committed row once; nothing of c (uncommitted), of b's dead attempt or of the temporary file
    assert rows_of(url, "SELECT sweep_id, key, count(*) n FROM raw_nodes GROUP BY 1, 2 ORDER BY 1, 2") == [
        {"sweep_id": "007", "key": "a", "n": 2}, {"sweep_id": "s1", "key": "a", "n": 2},
        {"sweep_id": "s1", "key": "d", "n": 2}, {"sweep_id": "s1", "key": "e", "n": 2}]
    assert rows_of(url, "SELECT count(*) n, count(DISTINCT sweep_id || key) k FROM raw_edges") == [{"n": 12, "k": 4}]
    assert rows_of(url, "SELECT key, plan, count(*) n FROM raw_perturbations GROUP BY 1, 2 ORDER BY 1, 2") == [
        {"key": "a", "plan": "p1", "n": 2}, {"key": "d", "plan": "p0", "n": 1}, {"key": "d", "plan": "p1", "n": 3}]
    assert rows_of(url, "SELECT job, layer, count(*) n FROM features GROUP BY 1, 2 ORDER BY 1, 2") == [
        {"job": "J2", "layer": 0, "n": 4}, {"job": "J2", "layer": 1, "n": 4}]
    assert rows_of(url, "SELECT DISTINCT clt_id FROM features") == [{"clt_id": "clt1"}]
    assert rows_of(url, "SELECT run, step, fvu, schema_version FROM train_metrics ORDER BY step") == [
        {"run": "r1", "step": s, "fvu": f, "schema_version": 1} for s, f in ((25, 0.6), (50, 0.5), (75, 0.4))]
    st = Store(url)
    g = st.read("graphs", "s1", keys=["a", "e"]).sort_by("key").to_pylist()
    assert g[0]["tokens"] == [1, 2, 3] and g[0]["logit_probs"] == [0.5] and g[0]["completeness_score"] == 0.25
    assert g[0]["created_at"] == _dt.datetime(2026, 11, 1, tzinfo=_dt.timezone.utc)
    assert g[1]["completeness_score"] is None  # the older file's missing column
    n = st.read("nodes", "s1", keys=["a"]).sort_by("node").to_pylist()
    assert n == [{**r, "token": None, "token_str": None, "probability": None, "influence": None}
                 for r in nodes("a")]
    f = st.read("features", "clt1").sort_by([("layer", "ascending"), ("feature", "ascending")]).to_pylist()
    assert f[1]["top_contexts"][0]["tokens"] == ["x", "y"] and f[1]["quantile_samples"] == []
    assert sorted(st.committed("s1").column("key").to_pylist()) == ["a", "b", "d", "e"]


def test_import_keeps_exactly_the_committed_rows_and_is_idempotent(tmp_path):
    root = str(tmp_path / "store")
    legacy_store(root)
    st = Store(root)
    c = import_legacy(st)
    assert {t: c[t] for t in LEGACY_TABLES} == {"graphs": 5, "nodes": 8, "edges": 12, "perturbations": 6,
                                             "features": 8, "train_metrics": 3}
    assert c["sweeps"] == ["007", "s1"] and c["skipped_keys"] == 0
    # c's nodes/edges/perturbations, b's stray nodes file, J1's file and clt2's file
    assert c["dropped_files"] == 6
    check_imported(root)
    assert os.path.exists(os.path.join(root, "graphs", "sweep_id=s1", "a.parquet"))  # the old files stay
    before = snapshots(Store(root))
    again = import_legacy(Store(root))
    assert {t: again[t] for t in LEGACY_TABLES} == dict.fromkeys(LEGACY_TABLES, 0)
    assert again["skipped_keys"] == 5 and again["skipped_partitions"] == 2 and again["files"] == 0
    assert snapshots(Store(root)) == before  # no new commit at all
    check_imported(root)


def test_import_cut_short_is_finished_by_running_it_again(tmp_path, monkeypatch):
    """The import dies between a round's edges commit and its graphs commit (one key per round), and once more
    after a graphs commit before its perturbations: the next run repairs the half-committed round and imports the
    rest, each row once."""
    import ct_ray.store.commit as commit

    root = str(tmp_path / "store")
    legacy_store(root)
    real = commit.commit_files
    seen = {"graphs": 0}

    def dies(store, name, *a, **kw):
        if name == "graphs":
            seen["graphs"] += 1
            if seen["graphs"] == 4:  # s1's round of d (after 007's a, s1's a and b)
                raise KeyboardInterrupt
        return real(store, name, *a, **kw)

    monkeypatch.setattr(commit, "commit_files", dies)
    with pytest.raises(KeyboardInterrupt):
        import_legacy(Store(root), batch_prompts=1)
    # d's nodes and edges are in, its graphs row is not: invisible through the views, removed by the next run
    assert rows_of(root, "SELECT count(*) n FROM raw_nodes WHERE sweep_id = 's1' AND key = 'd'") == [{"n": 2}]
    assert rows_of(root, "SELECT count(*) n FROM nodes WHERE sweep_id = 's1' AND key = 'd'") == [{"n": 0}]

    def dies_at_perts(store, name, *a, **kw):
        if name == "perturbations":
            raise KeyboardInterrupt
        return real(store, name, *a, **kw)

    monkeypatch.setattr(commit, "commit_files", dies_at_perts)
    with pytest.raises(KeyboardInterrupt):
        import_legacy(Store(root), batch_prompts=2)
    monkeypatch.setattr(commit, "commit_files", real)
    assert rows_of(root, "SELECT count(*) n FROM graphs") == [{"n": 5}]  # d and e went in, d's perturbations not
    c = import_legacy(Store(root), batch_prompts=2)
    assert (c["graphs"], c["nodes"], c["perturbations"], c["skipped_keys"]) == (0, 0, 4, 5)
    check_imported(root)


def test_import_from_another_root_copies_the_records_and_can_remove_the_old_files(tmp_path):
    old = str(tmp_path / "old")
    legacy_store(old)
    new = str(tmp_path / "new")
    st = Store(new)
    c = import_legacy(st, old, remove_old=True)
    assert c["graphs"] == 5
    check_imported(new)
    assert json.loads((tmp_path / "new" / "_sweeps" / "s1" / "plan.json").read_text())["sweep_id"] == "s1"
    assert json.loads((tmp_path / "new" / "_features" / "clt1" / "job.json").read_text())["job"] == "J2"
    for d in ("graphs/sweep_id=s1", "nodes/sweep_id=007", "perturbations/sweep_id=s1", "features/clt_id=clt2",
              "tables/train_metrics/run=r1"):
        assert not os.path.exists(os.path.join(old, d)), d
    assert os.path.exists(os.path.join(old, "_features", "clt1", "job.json"))  # records are kept
    assert import_legacy(Store(new), old)["graphs"] == 0  # nothing left to import


def test_import_of_an_empty_or_missing_store(tmp_path):
    c = import_legacy(Store(str(tmp_path / "nothing")))
    assert {t: c[t] for t in LEGACY_TABLES} == dict.fromkeys(LEGACY_TABLES, 0) and c["sweeps"] == []
    with pytest.raises(ValueError):
        import_legacy(Store(str(tmp_path / "nothing")), batch_prompts=0)
