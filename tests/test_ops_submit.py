"""`ct-ray submit` / `ct-ray jobs`: kind detection and submission ids of the shipped workflows, one-line errors, and a
real Ray head (`ray start --head`, token auth on) that runs a tiny sweep job to completion and refuses its id twice.

The head runs in its own process group (never `ray stop`, which would also stop other Ray instances on the
machine) and its own temp dir; the client runs in a subprocess, since token auth is process-wide in Ray and this
test session's Ray has it off."""

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from ct_ray.cli import main
from ct_ray.ops.submit import (
    EXCLUDES,
    JOB_SPEC,
    entrypoint,
    read_spec,
    relative_paths,
    runtime_env,
    stage_working_dir,
    submission_id,
)
from tests._helpers import free_ports

ROOT = Path(__file__).resolve().parents[1]


def test_kinds_and_ids_of_the_workflows(tmp_path):
    kinds = {p.name: read_spec(str(p)) for p in sorted((ROOT / "workflows").glob("*.yaml"))}
    assert {n: k for n, (k, _) in kinds.items()} == {
        "nightly_retrain.yaml": "retrain", "quickstart.yaml": "demo", "sweep_quickstart.yaml": "sweep",
        "sweep_s3_cluster.yaml": "sweep", "train_smollm2.yaml": "train", "features_smollm2.yaml": "features",
        "train_smollm2_quality.yaml": "train"}
    k, s = kinds["sweep_quickstart.yaml"]
    assert submission_id(k, s) == "sweep-quickstart-sweep"
    k, s = kinds["nightly_retrain.yaml"]
    assert submission_id(k, s, "2025-01-02") == "retrain-nightly-2025-01-02"
    k, s = kinds["train_smollm2.yaml"]
    tid = submission_id(k, s)
    assert tid.startswith("train-smollm2-plt-") and tid == submission_id(*read_spec(str(ROOT / "workflows/train_smollm2.yaml")))
    # formatting does not change the id, content does; an explicit kind: is accepted by the plain commands too
    p = tmp_path / "t.yaml"
    p.write_text("kind: train\n" + (ROOT / "workflows/train_smollm2.yaml").read_text().replace("steps: 300", "steps:   300"))
    assert submission_id(*read_spec(str(p))) == tid
    p.write_text("kind: train\nname: x\nharvest: {out: y}\n")
    assert read_spec(str(p))[0] == "train" and submission_id(*read_spec(str(p))) != tid
    p.write_text("n_tokens: 100\nout: x\n")
    assert read_spec(str(p))[0] == "harvest"
    assert entrypoint("retrain", "python", "2025-01-02").endswith(f"retrain {JOB_SPEC} --address auto --date 2025-01-02")


def test_staged_working_dir(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("sweep_id: x\n")
    proj = tmp_path / "proj"
    for f in ("pyproject.toml", "ct_ray/cli.py", "ct_ray/__pycache__/x.pyc", ".git/HEAD", ".venv/bin/python",
              "ct_ray_data/t.parquet", "benchmarks/_work/big.bin", "benchmarks/run.py", "workflows/a.yaml"):
        (proj / f).parent.mkdir(parents=True, exist_ok=True)
        (proj / f).write_text("x")
    d = Path(stage_working_dir(str(spec), "project", str(proj)))
    try:
        assert sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()) == [
            JOB_SPEC, "benchmarks/run.py", "ct_ray/cli.py", "pyproject.toml", "workflows/a.yaml"]
    finally:
        shutil.rmtree(d)
    d = Path(stage_working_dir(str(spec), "project"))  # this checkout
    try:
        assert (d / JOB_SPEC).read_text() == "sweep_id: x\n" and (d / "ct_ray" / "ops" / "submit.py").is_file()
        assert not any((d / x).exists() for x in (".venv", ".git", "ct_ray_data"))
    finally:
        shutil.rmtree(d)
    d = Path(stage_working_dir(str(spec), "image"))
    assert sorted(str(p.relative_to(d)) for p in d.rglob("*")) == ["_job", JOB_SPEC]
    shutil.rmtree(d)
    assert ".git" in EXCLUDES and ".venv" in EXCLUDES


def test_runtime_env_carries_no_secrets(tmp_path, monkeypatch):
    for k in ("RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
        monkeypatch.setenv(k, "s3cr3t")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    req = tmp_path / "req.txt"
    req.write_text("# pinned\nct-ray==0.1.0\n\nray[default]==2.60.0  # the cluster's\n")
    env = runtime_env(str(tmp_path), pip=str(req))
    assert env["pip"]["packages"] == ["ct-ray==0.1.0", "ray[default]==2.60.0"]
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", env["env_vars"].get("CT_RAY_GIT_COMMIT", "0" * 40))
    assert "s3cr3t" not in json.dumps(env)
    assert relative_paths({"storage": {"url": "./d"}, "model": "m", "clt": "s3://b/c", "out": "/abs"}) == \
        ["storage.url=./d"]


@pytest.mark.parametrize("argv,message", [
    (["submit", "{spec}", "--address", "http://127.0.0.1:9"], "cannot reach the Ray dashboard at http://127.0.0.1:9"),
    (["submit", "{bad}", "--address", "http://127.0.0.1:9"], "not valid YAML"),
    (["submit", "{unknown}", "--address", "http://127.0.0.1:9"], "cannot tell which kind"),
    (["submit", "{invalid}", "--address", "http://127.0.0.1:9"], "invalid"),
    (["submit", "{missing}", "--address", "http://127.0.0.1:9"], "spec file not found"),
    (["jobs", "status", "x", "--address", "http://127.0.0.1:9"], "cannot reach the Ray dashboard"),
    (["jobs", "status", "x"], "give --address"),
    (["submit", "{spec}", "--date", "2025-01-01", "--address", "http://127.0.0.1:9"], "--date is for retrain specs"),
])
def test_bad_input_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "s.yaml").write_text(f"sweep_id: x\nmodel: m\nrandom_clt: {{features: 4}}\nprompts: [a]\n"
                                     f"storage: {tmp_path}\n")
    (tmp_path / "bad.yaml").write_text("a: [\n")
    (tmp_path / "unknown.yaml").write_text("colour: blue\n")
    (tmp_path / "invalid.yaml").write_text("sweep_id: x\nmodel: m\nprompts: [a]\n")
    argv = [a.format(spec=tmp_path / "s.yaml", bad=tmp_path / "bad.yaml", unknown=tmp_path / "unknown.yaml",
                     invalid=tmp_path / "invalid.yaml", missing=tmp_path / "nope.yaml") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_token_required_when_token_mode(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["jobs", "list", "--address", "http://127.0.0.1:9"]) == 2
    assert "no token" in capsys.readouterr().err


# --- a real head -----------------------------------------------------------------------------------------------
@pytest.fixture
def ray_head():
    """`ray start --head --block` with token auth, in its own process group and temp dir; killed afterwards."""
    token = secrets.token_hex(16)
    gcs, dash, agent, client = free_ports(4)
    tmp = tempfile.mkdtemp(prefix="ctr")  # short: Ray's socket paths must fit in 107 characters
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}  # the job ships its code
    bindir = os.path.dirname(sys.executable)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{bindir}:{env.get('PATH', '')}")
    proc = subprocess.Popen(
        [os.path.join(bindir, "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
         f"--ray-client-server-port={client}", "--num-cpus=3", f"--temp-dir={tmp}", "--disable-usage-stats",
         f"--object-store-memory={256 * 2**20}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, "ray start --head exited"
            try:
                req = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "the Ray dashboard did not come up in 90 s"
            time.sleep(1)
        # token auth is on: a request without the token is refused
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(f"{address}/api/version", timeout=5)
        yield {"address": address, "token": token, "temp_dir": tmp}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=3)  # `ray start --block` does not always exit on SIGTERM alone
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the head's group is still there
        except ProcessLookupError:
            pass
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


CLIENT = """
import contextlib, io, json, sys
from ct_ray.cli import main
res = []
for argv in json.loads(sys.argv[1]):
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        rc = main(argv)
    res.append({"rc": rc, "out": o.getvalue(), "err": e.getvalue()})
# the job's driver and its workers import the shipped copy of ct_ray, not the one installed on the head
import time
from ct_ray.ops.submit import connect, runtime_env, stage_working_dir
client = connect(sys.argv[2])
probe = ("import ray, ct_ray; ray.init(); f = ray.remote(lambda: __import__('ct_ray').__file__); "
         "print('DRIVER', ct_ray.__file__); print('WORKER', ray.get(f.remote()))")
import shutil
wd = stage_working_dir(sys.argv[3], "project")
sid = client.submit_job(entrypoint=f'python -c "{probe}"', runtime_env=runtime_env(wd))
shutil.rmtree(wd)
while str(client.get_job_status(sid)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
    time.sleep(0.5)
res.append({"probe": [ln for ln in client.get_job_logs(sid).splitlines() if ln.startswith(("DRIVER", "WORKER"))]})
print("===RESULT===" + json.dumps(res))
"""


def test_submit_sweep_job_to_a_token_auth_head(ray_head, tiny_dir, tmp_path):
    from ct_ray import load_model, random_clt, save_clt
    from ct_ray.store.tables import Store

    clt = str(tmp_path / "clt")
    save_clt(random_clt(load_model(str(tiny_dir)), 16, seed=1, firing_rate=0.2), clt)
    store = tmp_path / "store"
    spec = tmp_path / "sweep.yaml"
    spec.write_text(json.dumps({"sweep_id": "remote", "model": str(tiny_dir), "clt": clt,
                                "prompts": ["The cat sat on", "hello world"],
                                "attribution": {"max_n_logits": 5, "batch_size": 64},
                                "resources": {"workers": 1, "num_cpus": 1}, "storage": str(store)}))
    a = ray_head["address"]
    argvs = [["submit", str(spec), "--address", a, "--wait"],
             ["submit", str(spec), "--address", a],
             ["jobs", "status", "sweep-remote", "--address", a, "--json"],
             ["jobs", "logs", "sweep-remote", "--address", a],
             ["jobs", "stop", "sweep-remote", "--address", a],
             ["jobs", "status", "no-such-job", "--address", a]]
    # sentinel keys in the submitter's environment: neither Ray's files on the head nor the store may ever hold them
    sentinel = f"ctraysubmitsentinel{secrets.token_hex(8)}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_head["token"],
           "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
           "AWS_ACCESS_KEY_ID": sentinel.upper(), "AWS_SECRET_ACCESS_KEY": sentinel}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-c", CLIENT, json.dumps(argvs), a, str(spec)], env=env, capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert "===RESULT===" in r.stdout, (r.stdout[-3000:], r.stderr[-3000:])
    res = json.loads(r.stdout.split("===RESULT===", 1)[1])
    probe = res.pop()["probe"]
    assert [x["rc"] for x in res] == [0, 2, 0, 0, 0, 2], res
    assert len(probe) == 2 and all("working_dir_files" in ln for ln in probe), probe
    out = [x["out"] for x in res]
    err = [x["err"] for x in res]

    # the job ran to completion on the head and its tables are in storage
    assert "submitted sweep-remote" in out[0] and "job sweep-remote SUCCEEDED" in out[0]
    assert "2 attributed, 0 failed" in out[0]
    graphs = Store(str(store)).read("graphs", "remote")
    assert graphs.num_rows == 2 and set(graphs.column("status").to_pylist()) == {"ok"}
    for root in (ray_head["temp_dir"], str(store)):
        leaked = [str(f) for f in Path(root).rglob("*") if f.is_file() and not f.is_symlink()
                  and (sentinel.encode() in f.read_bytes() or sentinel.upper().encode() in f.read_bytes())]
        assert leaked == [], f"credentials written to {leaked}"
    # the same submission id is refused, in one line
    assert err[1].count("\n") == 1 and "already submitted (status SUCCEEDED)" in err[1]
    status = json.loads(out[2])
    assert status["status"] == "SUCCEEDED" and status["metadata"]["ct_ray_kind"] == "sweep"
    assert status["entrypoint"] == entrypoint("sweep")
    assert "sweep remote: 2 prompts" in out[3]
    assert "nothing to stop" in out[4]
    assert "no job 'no-such-job'" in err[5] and err[5].count("\n") == 1
    assert ray_head["token"] not in r.stdout + r.stderr  # never logged


def test_staging_never_follows_symlinks_out_of_the_project(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("sweep_id: x\n")
    proj = tmp_path / "proj"
    (proj / "ct_ray").mkdir(parents=True)
    (proj / "pyproject.toml").write_text("x")
    (proj / "ct_ray" / "cli.py").write_text("x")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "key").write_text("SENTINEL-SECRET")
    (proj / "creds").symlink_to(tmp_path / "secrets")  # a folder link out
    (proj / "ct_ray" / "key").symlink_to(tmp_path / "secrets" / "key")  # a file link out
    (proj / "ct_ray" / "alias.py").symlink_to(proj / "ct_ray" / "cli.py")  # inside: shipped
    d = Path(stage_working_dir(str(spec), "project", str(proj)))
    try:
        assert sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()) == [
            JOB_SPEC, "ct_ray/alias.py", "ct_ray/cli.py", "pyproject.toml"]
        assert not any("SENTINEL" in p.read_text() for p in d.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(d)
