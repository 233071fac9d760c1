"""One prompt's adjacency rows split over 2 Ray CPU workers (ct_ray/executor/split_rows.py): the same graph as one
process, on the selection path and with every feature kept; a worker killed mid-prompt is replaced, or (without
retries) fails the prompt with one line."""

import contextlib
import time

import pytest
import torch

from ct_ray import attribute, load_clt, load_model, random_clt, save_clt
from ct_ray.errors import CTRayError
from ct_ray.executor.split_rows import SplitRows

from ._attr_helpers import assert_exact

PROMPT = "The cat sat on the mat"


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    lm = load_model(tiny_dir)
    path = str(tmp_path_factory.mktemp("split_clt") / "clt")
    save_clt(random_clt(lm, 32, seed=5, firing_rate=0.2), path)
    return lm, load_clt(path), str(tiny_dir), path


@pytest.fixture(scope="module")
def split(ray_local, setup):
    _, _, model_dir, clt_dir = setup
    with SplitRows(model_dir, clt_dir, workers=2, num_cpus=1) as s:
        yield s


def assert_same_graph(g, ref):
    a, b = g.nodes.to_pandas(), ref.nodes.to_pandas()
    assert list(a.columns) == list(b.columns)
    for c in a.columns:  # NaN where a column does not apply to a node kind
        assert a[c].equals(b[c]) or torch.allclose(torch.tensor(a[c].to_numpy(float)), torch.tensor(b[c].to_numpy(float)),
                                                   rtol=1e-6, atol=0, equal_nan=True), c
    assert g.adjacency.shape == ref.adjacency.shape
    scale = ref.adjacency.abs().max()
    assert (g.adjacency - ref.adjacency).abs().max() <= 1e-6 * scale
    if g.n_features == g.meta["n_active_features"]:  # dropped features' edges are missing from a selected graph
        assert_exact(g)


@pytest.mark.parametrize("max_feature_nodes", [None, 40])
def test_split_rows_equal_one_process(setup, split, max_feature_nodes):
    lm, clt, _, _ = setup
    kw = {"batch_size": 16, "max_n_logits": 5, "max_feature_nodes": max_feature_nodes}
    t0 = time.perf_counter()
    ref = attribute(lm, clt, PROMPT, **kw)
    t1 = time.perf_counter()
    g = attribute(lm, clt, PROMPT, rows=split, **kw)
    t2 = time.perf_counter()
    n_active = ref.meta["n_active_features"]
    if max_feature_nodes is None:
        assert ref.n_features == n_active > 40
    else:
        assert ref.n_features == max_feature_nodes < n_active  # the selection path
    assert_same_graph(g, ref)
    # not bit-identical: a part's backward pass has other shapes than its whole batch (as another batch_size has)
    rel = float((g.adjacency - ref.adjacency).abs().max() / ref.adjacency.abs().max())
    print(f"max_feature_nodes={max_feature_nodes}: one process {t1 - t0:.2f} s, 2 workers {t2 - t1:.2f} s, "
          f"max relative difference {rel:.1e}")


def _killing(split, ray, on_call: int):
    """`split` as a row source that kills worker 0 just before row call number `on_call`."""

    @contextlib.contextmanager
    def source(engine, plan):
        with split(engine, plan) as rows:
            calls = [0]

            def fn(*a):
                calls[0] += 1
                if calls[0] == on_call:
                    ray.kill(split.actors[0])
                return rows(*a)

            yield fn

    return source


def test_killed_worker_is_replaced(ray_local, setup, split):
    lm, clt, _, _ = setup
    kw = {"batch_size": 8, "max_n_logits": 5, "max_feature_nodes": 30}
    ref = attribute(lm, clt, PROMPT, **kw)
    old = split.actors[0]
    g = attribute(lm, clt, PROMPT, rows=_killing(split, ray_local, 3), **kw)
    assert split.actors[0] is not old
    assert_same_graph(g, ref)


def test_killed_worker_without_retries_is_one_line_error(ray_local, setup, split):
    lm, clt, _, _ = setup
    split.retries = 0
    t0 = time.perf_counter()
    with pytest.raises(CTRayError, match="worker died") as e:
        attribute(lm, clt, PROMPT, rows=_killing(split, ray_local, 2), batch_size=8, max_feature_nodes=30)
    assert "\n" not in str(e.value)
    assert time.perf_counter() - t0 < 30  # an error, not a hang


def test_workers_with_another_clt_are_refused(ray_local, setup, tmp_path):
    lm, clt, model_dir, _ = setup
    other = str(tmp_path / "other")
    save_clt(random_clt(lm, 32, seed=6, firing_rate=0.2), other)
    with SplitRows(model_dir, other, workers=1) as s, pytest.raises(CTRayError, match="differs"):
        attribute(lm, clt, PROMPT, rows=s, max_feature_nodes=30)


def test_cli_workers(ray_local, setup, capsys):
    from ct_ray.cli import main

    _, _, model_dir, clt_dir = setup
    assert main(["attribute", PROMPT, "--model", model_dir, "--clt", clt_dir, "--workers", "2",
                 "--max-feature-nodes", "30", "--quiet"]) == 0
    assert "pruned:" in capsys.readouterr().out
