"""Nightly retraining on a tiny model, on the session's local Ray: the first night promotes, a re-run of a night is a
no-op, a crash between "registered" and "promoted" leaves a consistent registry and a re-run finishes the decision
without retraining, a worse candidate is not promoted, rollback restores the previous pointer."""

import json
import shutil

import pytest
import torch

from ct_ray import load_clt, random_clt, save_clt
from ct_ray.cli import main
from ct_ray.harvest.corpus import iter_documents
from ct_ray.models import load_model
from ct_ray.ops.registry import Registry
from ct_ray.ops.retrain import FAULT_ENV, RetrainSpec, run_retrain
from ct_ray.store.tables import Store

D1, D2, D3 = "2025-01-01", "2025-01-02", "2025-01-03"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ct_ray.models.tiny import save_tiny

    d = tmp_path_factory.mktemp("retrain")
    model = save_tiny("llama", d / "model", n_layers=2, d_model=32, d_mlp=64, max_pos=64)
    docs = list(iter_documents("bbc-news"))
    (d / "corpus").mkdir()
    for i, day in enumerate((D1, D2, D3)):  # a fresh corpus file each night
        (d / "corpus" / f"{day}.txt").write_text("\n\n".join(docs[i * 4:(i + 1) * 4]))
    (d / "eval.txt").write_text("\n\n".join(docs[100:104]))  # held out
    return d, str(model)


def make_spec(d, model, optim=None, **promote):
    return RetrainSpec.model_validate({
        "registry": str(d / "registry"), "work": str(d / "work"), "corpus": [str(d / "corpus" / "{date}.txt")],
        "train": {"harvest": {"model": model, "context_len": 16, "n_tokens": 1200, "batch_contexts": 16,
                              "num_cpus": 0.5},
                  "clt": {"n_features": 32}, "optim": optim or {"steps": 12, "batch_tokens": 128, "lr": 1e-3,
                                                                "shuffle_buffer_tokens": 512},
                  "checkpoint_every": 12, "metrics_every": 4, "eval_tokens": 0, "metrics": None},
        "eval": {"corpus": [str(d / "eval.txt")], "context_len": 16, "n_contexts": 8},
        "canary": {"prompts": ["The cat sat on", {"prompt": "hello world", "target": "!"}],
                   "attribution": {"max_n_logits": 5, "batch_size": 64}, "resources": {"workers": 1, "num_cpus": 1},
                   "storage": str(d / "tables")},
        "promote": promote})


def files(root):
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_nightly_retraining(ray_local, setup, monkeypatch, capsys):
    d, model = setup
    spec = make_spec(d, model)
    reg = Registry(spec.registry)

    # --- night 1: no production yet -> promoted, canary sweep written -------------------------------------
    s1 = run_retrain(spec, D1)
    assert s1["status"] == "done" and not s1["noop"]
    assert list(s1["stages"]) == ["harvested", "trained", "registered", "evaluated", "decided", "promoted", "canary"]
    v1 = s1["stages"]["registered"]["version"]
    assert reg.production()["version"] == v1 and v1.startswith("20250101-")
    m = reg.meta(v1)
    prov = m["provenance"]
    assert prov["parent"] is None and prov["date"] == D1 and len(prov["spec_hash"]) == 16
    assert prov["data"]["corpus"] == [str(d / "corpus" / f"{D1}.txt")] and prov["data"]["n_tokens"] > 0
    assert prov["git_commit"] and m["metrics"]["train"]["step"] == 12
    ev = reg.evals(v1)
    assert len(ev) == 1 and 0 < next(iter(ev.values()))["fvu"] < 2
    graphs = Store(str(d / "tables")).read("graphs", f"canary-{D1}")
    assert graphs.num_rows == 2 and set(graphs.column("status").to_pylist()) == {"ok"}
    assert set(graphs.column("clt").to_pylist()) == {reg.version_url(v1)}

    # --- the same night again: nothing happens ---------------------------------------------------------------
    before = files(d / "registry") | files(d / "work") | files(d / "tables")
    assert run_retrain(spec, D1)["noop"]
    assert files(d / "registry") | files(d / "work") | files(d / "tables") == before

    # --- night 2: warm start on Ray Train, crash right after "registered" ---------------------------------
    # Night 1's activations stand in for a new harvest; one step at a negligible learning rate, so the candidate must
    # come out equal to production: the warm start survives the export's scale folding end to end.
    import ct_ray.harvest.pipeline
    import ct_ray.train.run

    def copy_harvest(hspec, url, progress=True):
        shutil.copytree(d / "work" / D1 / "activations", url)
        return json.loads((d / "work" / D1 / "activations" / "manifest.json").read_text())

    def boom(*a, **k):
        raise AssertionError("must not run again")

    monkeypatch.setattr(ct_ray.harvest.pipeline, "harvest_to_store", copy_harvest)
    lenient = make_spec(d, model, optim={"steps": 1, "batch_tokens": 128, "lr": 1e-9, "shuffle_buffer_tokens": 512},
                        fvu=None, kl=None, top1_agreement=None)  # promote anything
    monkeypatch.setenv(FAULT_ENV, "registered")
    with pytest.raises(RuntimeError, match="injected fault"):
        run_retrain(lenient, D2)
    v2 = reg.store.read_json(f"runs/{D2}.json")["stages"]["registered"]["version"]
    a, b = load_clt(reg.version_url(v1)), load_clt(reg.version_url(v2))
    assert v2 != v1 and b.meta["spec"]["init_from"] == reg.version_url(v1)
    for name in ("W_enc", "b_enc", "threshold", "W_dec", "b_dec"):
        for x, y in zip(getattr(a, name), getattr(b, name)):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6)
    assert reg.production()["version"] == v1  # consistent: candidate registered, production untouched
    assert [x["version"] for x in reg.versions()] == [v1, v2] and reg.meta(v2)["provenance"]["parent"] == v1
    assert main(["clt", "list", "--registry", spec.registry]) == 0

    # re-runs finish the decision without harvesting or training again (a crash after "decided" too)
    monkeypatch.setattr(ct_ray.train.run, "train", boom)
    monkeypatch.setattr(ct_ray.harvest.pipeline, "harvest_to_store", boom)
    monkeypatch.setenv(FAULT_ENV, "decided")
    with pytest.raises(RuntimeError, match="injected fault"):
        run_retrain(lenient, D2)
    assert reg.production()["version"] == v1
    monkeypatch.delenv(FAULT_ENV)
    s2 = run_retrain(lenient, D2)
    assert s2["stages"]["decided"]["promote"] and s2["stages"]["decided"]["against"] == v1
    assert reg.production()["version"] == v2 and reg.production()["previous"] == v1
    assert Store(str(d / "tables")).read("graphs", f"canary-{D2}").num_rows == 2
    # the second canary records its diff against the first (graph_diffs rows too): another CLT, decoder matching
    diff = s2["stages"]["canary"]["diff"]
    assert diff["against"] == f"canary-{D1}" and diff["n_prompts"] == 2 and diff["match"] == "decoder", diff
    assert Store(str(d / "tables")).read("graph_diffs", diff["diff_id"]).num_rows == 3  # 2 prompts + the aggregate

    # --- rollback restores the previous pointer ------------------------------------------------------------
    assert main(["clt", "rollback", "--registry", spec.registry]) == 0
    assert reg.production()["version"] == v1
    assert [h["version"] for h in reg.history()] == [v1, v2, v1]

    # --- night 3: a worse candidate is not promoted (stand-ins: no harvest, an untrained random CLT) -------------
    def random_candidate(ts, progress=True):
        save_clt(random_clt(load_model(model), 32, seed=9), ts.out, extra={"spec": ts.model_dump()})
        return {"final": {}}

    monkeypatch.setattr(ct_ray.harvest.pipeline, "harvest_to_store", lambda hspec, url, progress=True: {"n_tokens": 0})
    monkeypatch.setattr(ct_ray.train.run, "train", random_candidate)
    s3 = run_retrain(spec, D3)
    dec = s3["stages"]["decided"]
    assert not dec["promote"] and dec["against"] == v1 and any("FAILED" in r for r in dec["reasons"])
    assert "promoted" not in s3["stages"] and "canary" not in s3["stages"] and s3["status"] == "done"
    assert reg.production()["version"] == v1 and len(reg.versions()) == 3
    assert Store(str(d / "tables")).read("graphs", f"canary-{D3}").num_rows == 0
    capsys.readouterr()
    assert run_retrain(spec, D3)["noop"]
    assert "not promoted" in capsys.readouterr().out
    assert main(["clt", "runs", "--registry", spec.registry]) == 0
    runs = capsys.readouterr().out.splitlines()
    assert [r.split()[:3] for r in runs] == [[D1, "done", "canary"], [D2, "done", "canary"], [D3, "done", "decided"]]
    assert f"promoted {v1}" in runs[0] and "not promoted" in runs[2]
    assert json.loads((d / "registry" / "runs" / f"{D3}.json").read_text())["status"] == "done"


def test_bad_input(setup, tmp_path, capsys):
    d, model = setup
    p = tmp_path / "r.yaml"
    p.write_text("registry: x\n")
    assert main(["retrain", str(p)]) == 2
    assert "invalid" in capsys.readouterr().err
    assert main(["retrain", "workflows/nightly_retrain.yaml", "--date", "2025-13-01"]) == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err


def test_warm_start_reproduces_the_exported_clt():
    """Shards initialised from an exported CLT compute what it computes, whatever this run's activation scales."""
    import torch

    from ct_ray.clt.transcoder import CrossLayerTranscoder
    from ct_ray.specs import OptimSpec
    from ct_ray.train.shard import Layout, Shard

    g = torch.Generator().manual_seed(0)
    clt = CrossLayerTranscoder(3, 8, 6, span=2)
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    sx, sy = torch.rand(3, generator=g) + 0.5, torch.rand(3, generator=g) + 0.5
    x = torch.randn(5, 3, 8, generator=g)
    want = clt.forward([x[:, l] for l in range(3)])
    parts = []
    for idx in range(2):
        sh = Shard(Layout(3, 8, 6, 2, "jumprelu", "resid_mid", 2, idx), OptimSpec())
        sh.init_from_clt(clt, sx, sy)
        parts.append(sh)
    acts = [torch.cat([sh.clt.encode(l, x[:, l] * sx[l]) for sh in parts], -1) for l in range(3)]
    full = CrossLayerTranscoder(3, 8, 6, span=2)
    with torch.no_grad():
        for l in range(3):
            full.W_dec[l].copy_(torch.cat([sh.clt.W_dec[l] for sh in parts]))
            full.b_dec[l].copy_(parts[0].clt.b_dec[l])
    got = full.decode(acts)
    for l in range(3):
        torch.testing.assert_close(got[l] / sy[l], want[l], rtol=1e-5, atol=1e-5)


def test_retrain_on_s3_with_stand_ins(ray_local, s3, setup, monkeypatch):
    """Registry, work dir and canary tables on S3 (moto); harvest and training are stand-ins (tested above)."""
    import ct_ray.harvest.pipeline
    import ct_ray.train.run

    d, model = setup
    root = f"s3://{s3['bucket']}/nightly"

    def candidate(ts, progress=True):
        assert ts.out == f"{root}/work/{D1}/candidate" and ts.init_from is None
        save_clt(random_clt(load_model(model), 16, seed=4), ts.out, extra={"spec": ts.model_dump()})
        return {"final": {"fvu": 0.5}}

    monkeypatch.setattr(ct_ray.harvest.pipeline, "harvest_to_store", lambda hspec, url, progress=True: {"n_tokens": 0})
    monkeypatch.setattr(ct_ray.train.run, "train", candidate)
    data = make_spec(d, model).model_dump()
    data.update(registry=f"{root}/registry", work=f"{root}/work")
    data["canary"]["storage"] = {"url": f"{root}/tables"}
    spec = RetrainSpec.model_validate(data)
    s = run_retrain(spec, D1)
    vid = s["stages"]["promoted"]["version"]
    reg = Registry(spec.registry)
    assert reg.production()["version"] == vid and reg.meta(vid)["metrics"]["train"] == {"fvu": 0.5}
    assert load_clt(reg.version_url(vid)).d_tc == [16, 16]
    assert Store(f"{root}/tables").read("graphs", f"canary-{D1}").num_rows == 2
    assert run_retrain(spec, D1)["noop"]


def test_warm_start_only_from_the_same_shape():
    from ct_ray.ops.retrain import same_shape
    from ct_ray.specs import CLTShapeSpec

    meta = {"n_layers": 3, "features_per_layer": 8, "spans": [3, 2, 1], "activation": "jumprelu"}
    assert same_shape(meta, CLTShapeSpec(n_features=8))
    assert not same_shape(meta, CLTShapeSpec(n_features=16))
    assert not same_shape(meta, CLTShapeSpec(n_features=8, span=1))
    assert same_shape({**meta, "spans": [1, 1, 1]}, CLTShapeSpec(n_features=8, span=1))
    assert not same_shape(meta, CLTShapeSpec(n_features=8, activation="relu"))
