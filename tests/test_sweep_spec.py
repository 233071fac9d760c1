"""Sweep spec validation, prompt sources and task keys (no Ray)."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ct_ray.errors import CTRayError
from ct_ray.specs import PLUGINS_ENV
from ct_ray.store.schemas import SCHEMAS, TABLES_SCHEMA_VERSION, conform
from ct_ray.sweep import PromptFile, load_sweep_spec, parse_sweep_spec, read_prompts, task_key

BASE = {"sweep_id": "s1", "model": "tiny", "random_clt": {"features": 8}, "prompts": ["a b", "c"]}


def spec(**kw):
    return parse_sweep_spec({**BASE, **kw})


@pytest.mark.parametrize("bad,msg", [
    ({"unknown": 1}, "unknown: Extra inputs are not permitted"),
    ({"sweep_id": "no spaces"}, "sweep_id"),
    ({"sweep_id": "../up"}, "sweep_id"),
    ({"clt": "/some/clt"}, "exactly one of clt"),
    ({"random_clt": None}, "exactly one of clt"),
    ({"prompts": []}, "at least one prompt"),
    ({"resources": {"workers": 0}}, "resources.workers"),
    ({"resources": {"gpus": 1}}, "resources.gpus"),
    ({"attribution": {"desired_logit_prob": 2}}, "attribution.desired_logit_prob"),
    ({"pruning": {"node_threshold": -1}}, "pruning.node_threshold"),
    ({"perturbation": {"interventions": [{"op": "zap"}]}}, "perturbation.interventions.0.op"),
    ({"perturbation": {"function": "not a function"}}, "perturbation.function"),
    ({"storage": {"url": "s3://b/p", "options": {"secret": "x"}}}, "credentials must come from the AWS"),
    ({"storage": {"url": "s3://b/p", "options": {"client_kwargs": {"aws_secret_access_key": "x"}}}}, "credentials"),
    ({"graph_rows": "some"}, "graph_rows"),
    ({"retries": -1}, "retries"),
])
def test_bad_specs_rejected_with_one_line(bad, msg):
    with pytest.raises(CTRayError, match="invalid sweep spec") as e:
        spec(**bad)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_spec_yaml_defaults_and_storage_shorthand(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("sweep_id: demo\nmodel: smollm2-135m\nclt: s3://bucket/clt\nprompts: [\"x\"]\nstorage: s3://b/tables\n"
                 "perturbation: {top_k: 3, interventions: [{op: scale, value: -1}]}\n")
    s = load_sweep_spec(p)
    assert s.storage.url == "s3://b/tables" and s.resources.workers == 1 and s.retries == 2
    assert s.perturbation.top_k == 3 and not s.perturbation.empty
    assert spec().perturbation.empty  # default: no perturbations


def test_shipped_workflows_parse():
    from pathlib import Path

    files = sorted((Path(__file__).parent.parent / "workflows").glob("sweep_*.yaml"))
    assert files
    for f in files:
        load_sweep_spec(f)


def test_task_keys_are_deterministic_and_cover_parameters():
    s = spec()
    k = task_key(s, "a b", None)
    assert k == task_key(spec(), "a b", None) and len(k) == 24
    assert k != task_key(s, "a b ", None)
    assert k != task_key(s, "a b", "c")
    assert k != task_key(spec(attribution={"max_n_logits": 3}), "a b", None)
    assert k != task_key(spec(pruning={"edge_threshold": 0.5}), "a b", None)
    assert k != task_key(spec(random_clt={"features": 8, "seed": 1}), "a b", None)
    assert k != task_key(spec(model="other"), "a b", None)
    # resources, storage and the sweep id do not change what a prompt's rows hold
    assert k == task_key(spec(resources={"workers": 8}, sweep_id="s2", storage="/elsewhere"), "a b", None)


def test_inline_prompts_dedupe_and_targets():
    items, dups = read_prompts(spec(prompts=["x", {"prompt": "y", "target": " z"}, "x", {"prompt": "x", "target": "q"}]))
    assert dups == 1 and [i.index for i in items] == [0, 1, 3]
    assert items[1].target == " z" and len({i.key for i in items}) == 3


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"first\r\nsecond \xff\xfe bad\n\nthird\n")
    items, _ = read_prompts(spec(prompts={"url": str(tmp_path / "p.txt")}))
    assert [i.prompt for i in items][0] == "first" and items[2].prompt == ""
    assert items[1].invalid and "not valid UTF-8" in items[1].invalid and items[1].raw == b"second \xff\xfe bad"
    assert [i.invalid for i in items[2:]] == [None, None]

    lines = [json.dumps({"text": "p1", "tgt": " a"}), json.dumps({"text": "p2"}), "{broken", json.dumps({"text": 3})]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    items, _ = read_prompts(spec(prompts={"url": str(tmp_path / "p.jsonl"), "column": "text", "target_column": "tgt"}))
    assert [(i.prompt, i.target) for i in items[:2]] == [("p1", " a"), ("p2", None)]
    assert "not JSON" in items[2].invalid and "not a string" in items[3].invalid

    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": pa.array([b"ok", b"\xc3\x28"], pa.binary()), "t": ["x", None]}), buf)
    (tmp_path / "p.parquet").write_bytes(buf.getvalue())
    items, _ = read_prompts(spec(prompts=PromptFile(url=str(tmp_path / "p.parquet"), target_column="t").model_dump()))
    assert items[0].prompt == "ok" and items[0].target == "x" and "UTF-8" in items[1].invalid

    with pytest.raises(CTRayError, match="no column 'nope'"):
        read_prompts(spec(prompts={"url": str(tmp_path / "p.parquet"), "column": "nope"}))
    with pytest.raises(CTRayError, match="prompt file not found"):
        read_prompts(spec(prompts={"url": str(tmp_path / "missing.txt")}))
    with pytest.raises(CTRayError, match="cannot tell the format"):
        read_prompts(spec(prompts={"url": str(tmp_path / "p.csv")}))
    items, _ = read_prompts(spec(prompts={"url": str(tmp_path / "p.txt"), "limit": 1}))
    assert len(items) == 1


def test_conform_rejects_unknown_columns_and_fills_nulls():
    t = conform([{"key": "k", "status": "ok"}], "graphs", "007")
    assert t.schema.equals(SCHEMAS["graphs"]) and t.column("n_nodes").null_count == 1
    assert t.column("sweep_id").to_pylist() == ["007"]  # the partition column: always a string
    assert t.schema.metadata[b"ct_ray.schema_version"] == str(TABLES_SCHEMA_VERSION).encode()
    with pytest.raises(ValueError, match="not in the graphs schema"):
        conform([{"key": "k", "bogus": 1}], "graphs")


@pytest.mark.parametrize("fn, ok", [("ct_ray.perturb:perturbation_rows", True),
                                    ("ct_ray.sweep.perturbation:predicted_only", True),
                                    ("os:system", False), ("subprocess:run", False),
                                    ("ct_ray.perturbx:f", False), ("myplug.rows:fn", False)])
def test_perturbation_function_allow_list(fn, ok, monkeypatch):
    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    data = {**BASE, "perturbation": {"top_k": 1, "interventions": [{}], "function": fn}}
    if ok:
        assert parse_sweep_spec(data).perturbation.function == fn
    else:
        with pytest.raises(CTRayError, match="not an allowed perturbation plugin"):
            parse_sweep_spec(data)
    monkeypatch.setenv(PLUGINS_ENV, "myplug")
    assert parse_sweep_spec({**data, "perturbation": {**data["perturbation"], "function": "myplug.rows:fn"}})


@pytest.mark.parametrize("text, msg", [("a: &x [1, 2]\nb: *x\n", "aliases"),
                                       ("!!python/object/apply:os.system ['true']\n", "not valid YAML"),
                                       ("[" * 5000, "nested too deeply|not valid YAML"),
                                       (b"\xff\xfe\x00", "not a UTF-8"),
                                       ("- 1\n- 2\n", "must hold a mapping")])
def test_hostile_yaml_specs(tmp_path, text, msg):
    from ct_ray.specs import read_yaml

    p = tmp_path / "s.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CTRayError, match=msg):
        read_yaml(p)


def test_alias_bomb_refused_before_expansion(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 12)]
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\n")

    with pytest.raises(CTRayError, match="aliases"):
        load_sweep_spec(str(p))
