"""Feature dashboards: the mergeable statistics, and `ct-ray features` on Ray into the features table."""

import numpy as np
import pytest

from ct_ray.features import accumulate as acc
from ct_ray.features import features_id, parse_features_spec, run_features
from ct_ray.store.sql import query
from ct_ray.store.tables import Store


def _brute(acts, k):
    """Per feature: density, mean when active, top-k (ctx, max) by (-max, ctx)."""
    a = acts.copy()
    a[:, 0] = 0
    out = []
    for f in range(a.shape[2]):
        m = a[:, :, f].max(1)
        top = sorted((-m[c], c) for c in range(len(m)) if m[c] > 0)[:k]
        on = a[:, :, f] > 0
        out.append((on.sum(), a[:, :, f][on].mean() if on.any() else np.nan, [(c, -v) for v, c in top]))
    return out


def test_states_merge_in_any_split_like_one_pass():
    rng = np.random.default_rng(0)
    acts = np.maximum(rng.normal(size=(20, 12, 5)).astype(np.float32) - 1.0, 0)
    acts[:, :, 4] = 0  # a dead feature
    one = acc.batch_state(acts, np.arange(20), 3, 4, 6)
    parts = [acc.batch_state(acts[a:b], np.arange(a, b), 3, 4, 6) for a, b in ((0, 7), (7, 8), (8, 20))]
    split = acc.merge(acc.merge(acc.empty_state(5, 3, 4, 6), parts[2]), acc.merge(parts[1], parts[0]))
    for key in one:
        np.testing.assert_allclose(one[key], split[key], rtol=1e-6, err_msg=key)
    for f, (n_on, _mean, top) in enumerate(_brute(acts, 3)):
        assert one["n_active"][f] == n_on and one["n_tokens"] == 20 * 11
        assert [int(c) for c in one["top_ctx"][f][: len(top)]] == [c for c, _ in top]
        for j, (c, v) in enumerate(top):
            pos, st = one["top_pos"][f, j], one["top_start"][f, j]
            assert one["top_val"][f, j] == pytest.approx(v) and acts[c, pos, f] == pytest.approx(v)
            np.testing.assert_allclose(one["top_acts"][f, j], acts[c, st : st + 6, f])  # the window around the max
            assert st <= pos < st + 6
    assert not np.isfinite(one["top_val"][4]).any() and (one["smp_ctx"][4] == acc._NO_CTX).all()
    picks = acc.quantile_picks(np.array([3.0, 1.0, 2.0, 9.0]), np.array([True, True, True, False]), [0.0, 0.5, 1.0])
    assert picks == [(0.0, 1), (0.5, 2), (1.0, 0)]


def test_features_job_writes_table_and_reruns_skip(ray_local, tiny_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"doc {i}: the quick brown fox {i} jumps over the lazy dog again and again"
                                  for i in range(12)))
    spec = parse_features_spec({"model": str(tiny_dir), "random_clt": {"features": 16, "seed": 1, "firing_rate": 0.2},
                                "corpus": [str(corpus)], "context_len": 16, "n_contexts": 20, "top_k": 3,
                                "window": 8, "chunk_contexts": 6, "workers": 2, "num_cpus": 0.5,
                                "storage": str(tmp_path / "store")})
    r = run_features(spec)
    assert not r["skipped"] and r["n_features"] == 32 and r["n_tokens"] == 20 * 15
    cid = features_id(spec.clt_id())
    assert r["clt_id"] == cid and cid.startswith("random-")
    t = Store(str(tmp_path / "store")).read("features", cid)
    assert t.num_rows == 32 and sorted(set(t.column("layer").to_pylist())) == [0, 1]
    rows = t.to_pylist()
    live = [x for x in rows if x["n_active"] > 0]
    assert live, "a 20% firing rate must give active features"
    for x in live:
        assert x["density"] == pytest.approx(x["n_active"] / x["n_tokens"])
        assert 0 < len(x["top_contexts"]) <= 3 and x["quantile_samples"]
        acts = [c["activation"] for c in x["top_contexts"]]
        assert acts == sorted(acts, reverse=True) and acts[0] == pytest.approx(x["max_activation"])
        c = x["top_contexts"][0]
        assert len(c["tokens"]) == len(c["acts"]) == 8 and max(c["acts"]) == pytest.approx(c["activation"])
    # SQL view over the partition
    q = query(f"SELECT count(*) n FROM features WHERE clt_id = '{cid}'", str(tmp_path / "store"))
    assert q.column("n").to_pylist() == [32]
    # idempotent: the same job is found committed, nothing is rewritten
    files = sorted((tmp_path / "store" / "features").rglob("*.parquet"))
    mtimes = [p.stat().st_mtime_ns for p in files]
    assert run_features(spec)["skipped"]
    assert [p.stat().st_mtime_ns for p in files] == mtimes


def test_features_cli_bad_input_is_one_line(capsys):
    from ct_ray.cli import main

    assert main(["features"]) == 2
    assert main(["features", "--random-clt", "4", "--n-contexts", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("ct-ray: error:") for e in err)


def test_features_workflow_parses():
    from pathlib import Path

    from ct_ray.features import load_features_spec

    spec = load_features_spec(Path(__file__).resolve().parents[1] / "workflows" / "features_smollm2.yaml")
    assert spec.clt and features_id(spec.clt).startswith("smollm2-plt-")


def test_features_chunk_that_kills_workers_is_one_error_and_nothing_written(ray_local, tiny_dir, tmp_path,
                                                                           monkeypatch):
    """The features job runs on the sweep's actor pool (executor/pool.py): a chunk whose worker dies is re-run alone;
    one that kills every worker it meets ends the job with one line after `retries`, and writes nothing."""
    from ct_ray.errors import CTRayError

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"doc {i}: the quick brown fox {i} jumps over the lazy dog" for i in range(8)))
    monkeypatch.setenv("CT_RAY_FAULT_CRASH_PROMPT", "context:7")  # reaches the actors through worker_env
    spec = parse_features_spec({"model": str(tiny_dir), "random_clt": {"features": 8, "seed": 1},
                                "corpus": [str(corpus)], "context_len": 16, "n_contexts": 12, "chunk_contexts": 4,
                                "workers": 2, "num_cpus": 0.5, "storage": str(tmp_path / "store")})
    with pytest.raises(CTRayError, match=r"contexts 4-8 kill their worker \(3 time\(s\)\)"):
        run_features(spec)
    assert not list((tmp_path / "store").rglob("*.parquet"))
