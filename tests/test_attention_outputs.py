"""Attention attribution as outputs: `ct-ray attribute --heads --qk` files, the sweep's edge_heads and
qk_attributions tables (queried with SQL), and the exported JSON (Neuronpedia's qk_tracing_results)."""

import json

import pyarrow.parquet as pq

from ct_ray.cli import main as cli_main
from ct_ray.specs import parse_sweep_spec
from ct_ray.store.sql import query
from ct_ray.sweep import run_sweep
from tests.test_export import check_graph


def test_attribute_heads_qk_files(tiny_dir, clt_dir, tmp_path, capsys):
    out = tmp_path / "att"
    rc = cli_main(["attribute", "The cat sat on", "--model", str(tiny_dir), "--clt", clt_dir, "--out", str(out),
                   "--quiet", "--max-n-logits", "5", "--qk", "--qk-topk", "3", "--heads-top", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "heads:" in printed and "QK L" in printed
    heads = pq.read_table(out / "edge_heads.parquet").to_pandas()
    edges = pq.read_table(out / "pruned_edges.parquet").to_pandas().set_index(["source", "target"])["weight"]
    sums = heads.groupby(["source", "target"])["weight"].sum()
    assert len(sums) == len(edges)
    assert (sums.loc[edges.index] - edges).abs().max() <= 1e-5 * edges.abs().max() + 1e-6
    assert heads.groupby(["source", "target"]).size().max() <= 4  # residual path, 2 heads, the rest
    qk = pq.read_table(out / "qk_attributions.parquet").to_pandas()
    assert set(qk["role"]) == {"pair", "query", "key"}
    data = json.loads((out / "graph.json").read_text())
    check_graph(data)
    assert any("heads" in link for link in data["links"])
    with_qk = [n for n in data["nodes"] if "qk_tracing_results" in n]
    assert with_qk and all(n["qk_heads"] for n in with_qk)


def test_sweep_tables_sql_and_export(ray_local, tiny_dir, clt_dir, tmp_path, capsys):
    store = tmp_path / "store"
    base = {"model": str(tiny_dir), "clt": clt_dir, "prompts": ["The cat sat on", "Once upon a time"],
            "storage": str(store), "resources": {"workers": 1, "num_cpus": 1}}
    spec = parse_sweep_spec({**base, "sweep_id": "att", "attribution": {"max_n_logits": 5, "qk": True, "qk_topk": 2}})
    plain = parse_sweep_spec({**base, "sweep_id": "plain", "attribution": {"max_n_logits": 5}})
    # the attention options are part of a sweep's identity only when they are on
    assert "qk" in spec.params()["attribution"] and "qk" not in plain.params()["attribution"]
    r = run_sweep(spec)
    assert r.ok == 2
    bad = query("""
        SELECT count(*) FROM (
          SELECT h.key, h.source, h.target, sum(h.weight) AS s, any_value(e.weight) AS w
          FROM edge_heads h JOIN edges e USING (sweep_id, key, source, target)
          WHERE sweep_id = 'att' GROUP BY ALL) WHERE abs(s - w) > 1e-5 * abs(w) + 1e-6""", str(store)).column(0)[0].as_py()
    assert bad == 0
    n = query("SELECT count(DISTINCT key) AS k, count(*) AS n FROM qk_attributions", str(store)).to_pylist()[0]
    assert n["k"] == 2 and n["n"] > 0
    assert cli_main(["export", "--no-progress", "--store", str(store), "--sweep", "att", "--all",
                     "--out", str(tmp_path / "json")]) == 0
    capsys.readouterr()
    files = sorted((tmp_path / "json").glob("att-*.json"))
    assert len(files) == 2
    for f in files:
        data = json.loads(f.read_text())
        check_graph(data)
        assert any("qk_tracing_results" in n for n in data["nodes"])
        assert any("heads" in link for link in data["links"])
