"""Graph diffs between sweeps (`ct-ray diff`, ct_ray/analysis/diff.py) on the tiny model: a sweep against itself and
against a second sweep of the same CLT (exactly no change), CLTs matched by decoder (a feature-permuted copy of the
CLT: every feature found again, no change; a CLT of another seed), the table's idempotence, one-line errors."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from ct_ray import load_clt, load_model, random_clt, save_clt
from ct_ray.analysis.diff import DecoderMatcher, compare_graphs, diff_id_of, diff_sweeps, load_decoders
from ct_ray.cli import main as cli_main
from ct_ray.errors import CTRayError
from ct_ray.store.commit import Committer
from ct_ray.store.tables import Store
from ct_ray.sweep import parse_sweep_spec, read_prompts, run_sweep
from ct_ray.sweep.driver import _item_dict
from ct_ray.sweep.worker import SweepWorker, worker_config

PROMPTS = ["The cat sat on", "Once upon a time", "1 2 3 4"]
RANDOM = {"features": 24, "seed": 3, "firing_rate": 0.15}


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return load_model(tiny_dir)


def _permuted(clt, seed: int = 0):
    """The same CLT with each layer's features in another order: new feature i is old feature perm[l][i]."""
    g = torch.Generator().manual_seed(seed)
    perms = []
    with torch.no_grad():
        for l in range(clt.n_layers):
            p = torch.randperm(clt.d_tc[l], generator=g)
            perms.append(p)
            for plist in (clt.W_enc, clt.b_enc, clt.threshold, clt.W_dec):
                plist[l].copy_(plist[l][p].clone())
    return clt, perms


@pytest.fixture(scope="module")
def clts(lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("diff_clts")
    a = random_clt(lm, RANDOM["features"], seed=RANDOM["seed"], firing_rate=RANDOM["firing_rate"])
    save_clt(a, str(root / "a"))
    perm, perms = _permuted(random_clt(lm, RANDOM["features"], seed=RANDOM["seed"], firing_rate=RANDOM["firing_rate"]))
    save_clt(perm, str(root / "perm"))
    save_clt(random_clt(lm, RANDOM["features"], seed=4, firing_rate=RANDOM["firing_rate"]), str(root / "b"))
    return {"a": str(root / "a"), "perm": str(root / "perm"), "b": str(root / "b"), "perms": perms}


def _spec(tiny_dir, store, sweep_id, prompts, **clt):
    return parse_sweep_spec({"sweep_id": sweep_id, "model": str(tiny_dir), "prompts": prompts, "storage": str(store),
                             "resources": {"workers": 1, "num_cpus": 1},
                             "attribution": {"max_n_logits": 5, "batch_size": 64}, **clt})


def _in_process(spec) -> None:
    """A sweep run in this process (the sweep's own worker and committer, no Ray: seconds instead of an actor
    start); the same rows as run_sweep writes."""
    store = spec.storage.store()
    w = SweepWorker(worker_config(spec, store))
    assert w.init_error is None, w.init_error
    for it in read_prompts(spec)[0]:
        assert w.run_prompt(_item_dict(it))["status"] == "ok"
    c = Committer(store, spec.sweep_id)
    assert c.add(w.flush())
    c.commit()


@pytest.fixture(scope="module")
def sweeps(ray_local, tiny_dir, clts, tmp_path_factory):
    store = tmp_path_factory.mktemp("diff_store") / "store"
    # two sweeps through Ray (run_sweep), of CLTs with different seeds
    for sid in ("a", "b"):
        r = run_sweep(_spec(tiny_dir, store, sid, PROMPTS, clt=clts[sid]))
        assert r.ok == len(PROMPTS), (sid, r.errors)
    _in_process(_spec(tiny_dir, store, "a2", ["Hello there", *PROMPTS[::-1]], clt=clts["a"]))  # same CLT, other order
    _in_process(_spec(tiny_dir, store, "rand", PROMPTS, random_clt=RANDOM))  # the CLT of `a`, by id: random(...)
    _in_process(_spec(tiny_dir, store, "perm", PROMPTS, clt=clts["perm"]))  # `a` with its features reordered
    _in_process(_spec(tiny_dir, store, "full", PROMPTS, clt=clts["a"], graph_rows="full"))  # `a`, full-graph rows
    return str(store)


def _per_prompt(r) -> list[dict]:
    return [x for x in r["table"].to_pylist() if x["prompt"] is not None]


ZERO = ("replacement_delta", "completeness_delta", "top_prob_delta", "logit_prob_l1", "edge_change_l1",
        "edge_change_rel")


def test_self_and_same_clt_diffs_are_exactly_zero(sweeps):
    st = Store(sweeps)
    for b in ("a", "a2", "full"):  # itself; the same CLT in another sweep; its full-graph rows (kept part compared)
        r = diff_sweeps(st, "a", b, write=False)
        assert r["n_prompts"] == 3 and r["match"] == "feature" and r["features"] is None
        assert (r["only_a"], r["only_b"]) == (0, 1 if b == "a2" else 0)
        rows = _per_prompt(r)
        assert [x["prompt"] for x in rows] == PROMPTS  # A's order, matched by text whatever B's order
        for x in [*rows, r["aggregate"]]:
            assert all(x[c] == 0.0 for c in ZERO), x
            assert x["n_matched"] == x["n_features_a"] == x["n_features_b"] > 0
            assert x["influence_a"] == x["influence_b"] == x["matched_influence_a"] == x["matched_influence_b"] > 0
            assert x["top_changed_edges"] == []
        assert all(x["top_token_a"] == x["top_token_b"] and (x["key_a"] == x["key_b"]) == (b != "full") for x in rows)
        assert r["aggregate"]["n_prompts"] == 3 and r["aggregate"]["key_a"] is None


def test_decoder_matching_finds_a_permuted_clt_and_a_rebuilt_random_one(sweeps, clts, tiny_dir):
    st = Store(sweeps)
    r = diff_sweeps(st, "rand", "perm", write=False)  # A: random(...) rebuilt from its id; B: the permuted copy
    assert r["match"] == "decoder" and r["features"]["matched"] == r["features"]["queried"] > 0
    assert r["features"]["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    for x in [*_per_prompt(r), r["aggregate"]]:
        assert x["n_matched"] == x["n_features_a"] == x["n_features_b"] > 0
        assert x["matched_influence_a"] == pytest.approx(x["influence_a"], rel=1e-5)
        assert x["edge_change_l1"] == pytest.approx(0.0, abs=1e-3)  # only float summation order differs
        assert abs(x["replacement_delta"]) < 1e-5 and x["logit_prob_l1"] == 0.0
    # the matching is the permutation itself: A's feature f is B's feature i with perm[i] == f
    rand_id = st.read("graphs", "rand", columns=["clt"]).column("clt")[0].as_py()
    m = DecoderMatcher(load_decoders(rand_id, tiny_dir), load_clt(clts["perm"]))
    for l, p in enumerate(clts["perms"]):
        assert (m.map(l, np.arange(len(p))) == torch.argsort(p).numpy()).all()


def test_decoder_matching_of_another_seed_changes_the_graphs(sweeps):
    r = diff_sweeps(Store(sweeps), "a", "b", write=False)
    agg = r["aggregate"]
    assert r["match"] == "decoder" and r["features"]["matched"] < r["features"]["queried"]
    assert agg["edge_change_l1"] > 0 and agg["n_matched"] < agg["n_features_a"]
    assert agg["matched_influence_a"] < agg["influence_a"]
    rows = _per_prompt(r)
    assert all(x["logit_prob_l1"] == 0.0 and x["top_prob_delta"] == 0.0 for x in rows)  # one model: same logits
    assert any(x["top_changed_edges"] for x in rows) and " > " in rows[0]["top_changed_edges"][0]
    assert len(agg["top_changed_edges"]) <= 10 and agg["top_changed_edges"][0].startswith('"')
    one = diff_sweeps(Store(sweeps), "a", "b", write=False, batch=1)  # batches of one prompt: the same rows
    assert one["table"].equals(r["table"])


def test_decoder_matcher_rule():
    """Mutual best over the whole dictionaries, and the threshold: a near copy matches, an unrelated row does not."""
    from ct_ray.clt.transcoder import CrossLayerTranscoder

    g = torch.Generator().manual_seed(0)
    a, b = CrossLayerTranscoder(2, 8, 6), CrossLayerTranscoder(2, 8, 6)
    with torch.no_grad():
        for l in range(2):
            a.W_dec[l].copy_(torch.randn(6, 2 - l, 8, generator=g))
            b.W_dec[l].copy_(torch.randn(6, 2 - l, 8, generator=g))
            b.W_dec[l][5] = a.W_dec[l][2] + 0.05 * torch.randn(2 - l, 8, generator=g)  # a close copy of A's 2
            b.W_dec[l][4] = 3.0 * a.W_dec[l][1]  # the same direction, another norm: cosine 1
    m = DecoderMatcher(a, b, threshold=0.9)
    for l in range(2):
        got = m.map(l, np.array([2, 1, 0]))
        assert got[0] == 5 and got[1] == 4
        assert got[2] == -1 or m.cosine[l][0] >= 0.9
    assert DecoderMatcher(a, b, threshold=1.0).map(0, np.array([2]))[0] == -1  # a close copy is not an exact one
    with pytest.raises(CTRayError, match="different shapes"):
        DecoderMatcher(a, CrossLayerTranscoder(3, 8, 6))


def test_compare_graphs_edge_l1_counts_unmatched_edges():
    def nodes(feats):
        n = len(feats) + 1
        return pa.table({"key": ["k"] * n, "node": list(range(n)), "kind": ["feature"] * len(feats) + ["logit"],
                         "layer": [0] * len(feats) + [1], "position": [1] * n, "feature": [*feats, -1],
                         "token": [7] * n, "token_str": ["x"] * n, "influence": [0.5] * len(feats) + [np.nan],
                         "kept": [True] * n})

    def edges(src, w, kept=None):
        return pa.table({"key": ["k"] * len(src), "source": src, "target": [len(src)] * len(src), "weight": w,
                         "kept": kept or [True] * len(src)})

    from ct_ray.analysis.diff import SameFeatures

    row = {"key": "k", "prompt": "p", "top_token": 7, "top_token_str": "x", "top_prob": 0.9, "logit_tokens": [7, 8],
           "logit_probs": [0.9, 0.05], "replacement_score_pruned": 0.5, "completeness_score_pruned": 0.8}
    row_b = {**row, "top_prob": 0.6, "logit_tokens": [7, 9], "logit_probs": [0.6, 0.3],
             "replacement_score_pruned": 0.75}
    # A: features 3, 4 -> logit; B: features 3, 5 -> logit; B's 4 is an unkept edge (a full-graph row)
    na, nb = nodes([3, 4]), nodes([3, 5])
    ea, eb = edges([0, 1], [1.0, 2.0]), edges([0, 1], [1.5, -1.0])
    out, top = compare_graphs(row, na, ea, row_b, nb, eb, SameFeatures())
    assert out["edge_change_l1"] == pytest.approx(0.5 + 2.0 + 1.0)
    assert out["edge_change_rel"] == pytest.approx(3.5 / (3.0 + 2.5))  # over both graphs' edge mass
    assert out["n_matched"] == 1 and out["matched_influence_a"] == 0.5 and out["influence_a"] == 1.0
    assert out["replacement_delta"] == 0.25 and out["top_prob_delta"] == pytest.approx(-0.3)
    assert out["logit_prob_l1"] == pytest.approx(0.3 + 0.05 + 0.3)
    assert out["top_changed_edges"][0] == 'L0/F4@1 > "x": 2 -> none' and len(top) == 3
    eb_unkept = edges([0, 1], [1.5, -1.0], kept=[True, False])
    out2, _ = compare_graphs(row, na, ea, row_b, nb, eb_unkept, SameFeatures())
    assert out2["edge_change_l1"] == pytest.approx(0.5 + 2.0)


def _diff(capsys, *args):
    rc = cli_main(["diff", "--no-progress", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_writes_the_table_idempotently(sweeps, capsys):
    for _ in range(2):
        rc, out, err = _diff(capsys, "a", "b", "--store", sweeps)
        assert rc == 0, err
        assert "3 prompt(s) compared, match by decoder" in out and "wrote 4 row(s)" in out
    rc, out, _ = _diff(capsys, "a", "a", "--store", sweeps)
    assert rc == 0 and "mean edge change L1 0" in out
    t = Store(sweeps).read("graph_diffs")
    assert sorted(set(t.column("diff_id").to_pylist())) == ["a..a", "a..b"]
    ab = Store(sweeps).read("graph_diffs", "a..b")
    assert ab.num_rows == 4 and ab.column("prompt").null_count == 1  # re-running replaced, never duplicated
    assert ab.column("n_prompts").to_pylist()[-1] == 3
    rc, out, _ = _diff(capsys, "a", "perm", "--store", sweeps, "--no-write")
    assert rc == 0 and "not written" in out and "a..perm" not in Store(sweeps).partitions("graph_diffs")


def test_cli_one_line_errors(sweeps, tmp_path, capsys):
    cases = [
        (["a", "nope", "--store", sweeps], "no committed graphs in sweep 'nope'"),
        (["a", "../x", "--store", sweeps], "not a safe name"),
        (["a", "b", "--store", str(tmp_path / "missing")], "no store at"),
        (["a", "b", "--store", sweeps, "--threshold", "1.5"], "--threshold 1.5"),
        (["a", "b", "--store", sweeps, "--threshold", "nan"], "--threshold"),
        (["a", "b", "--store", sweeps, "--catalog-b", "sqlite:///x.db"], "--store-b"),
    ]
    for args, msg in cases:
        rc, out, err = _diff(capsys, *args)
        assert rc == 2 and msg in err and err.count("\n") == 1, (args, err)
    # a store whose sweeps share no prompt, and an unreadable CLT
    other = tmp_path / "other"
    st = Store(sweeps)
    g = st.read("graphs", "b")
    from ct_ray.store.commit import replace_partition

    moved = g.set_column(g.schema.get_field_index("prompt"), "prompt", pa.array(["zz"] * g.num_rows))
    replace_partition(Store(str(other)), "graphs", "c", moved)
    rc, _, err = _diff(capsys, "a", "c", "--store", sweeps, "--store-b", str(other))
    assert rc == 2 and "no prompt in common" in err and err.count("\n") == 1
    lost = g.set_column(g.schema.get_field_index("clt"), "clt", pa.array([str(tmp_path / "gone")] * g.num_rows))
    replace_partition(Store(str(other)), "graphs", "d", lost)
    replace_partition(Store(str(other)), "nodes", "d", st.read("nodes", "b"))
    rc, _, err = _diff(capsys, "a", "d", "--store", sweeps, "--store-b", str(other))
    assert rc == 2 and "cannot load CLT" in err and err.count("\n") == 1


def test_diff_id():
    assert diff_id_of("a", "b") == "a..b"
    long = diff_id_of("x" * 100, "y" * 100)
    assert len(long) <= 128 and long.startswith("x" * 50 + "..") and long != diff_id_of("x" * 100, "y" * 99)
    assert diff_id_of("a..b", "c") != diff_id_of("a", "b..c")  # '..' inside an id: hashed, never ambiguous
