"""Credentials never reach Ray's logs, runtime_envs or the store: a local sweep into S3 with sentinel keys, then a
grep of Ray's whole session directory and of every object written."""

import os
import uuid
from pathlib import Path

import boto3

from ct_ray.executor import worker_env
from ct_ray.sweep import parse_sweep_spec, run_sweep

from .test_sweep import PROMPTS


def _files_with(root: Path, needle: bytes) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
                hits.append(str(p))
        except OSError:  # sockets, files removed meanwhile
            pass
    return hits


def _probe():
    return os.environ["CT_RAY_PROBE"]


def test_sweep_keeps_credentials_out_of_ray_and_the_store(ray_local, s3, tiny_dir, tmp_path, monkeypatch):
    secret = f"ctraysentinel{uuid.uuid4().hex}"
    key_id = f"AKIASENTINEL{uuid.uuid4().hex[:8].upper()}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # moto accepts any keys
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SESSION_TOKEN", secret + "tok")

    env = worker_env(ray_local)
    assert not any(secret in v or key_id in v for v in env.values())
    # Ray here runs on this machine and started before the keys were set: a private 0600 file carries them
    cred = env["AWS_SHARED_CREDENTIALS_FILE"]
    assert os.stat(cred).st_mode & 0o077 == 0 and secret in Path(cred).read_text()
    session = Path(ray_local._private.worker._global_node.get_session_dir_path())
    assert not str(Path(cred).resolve()).startswith(str(session.resolve()))

    root = f"s3://{s3['bucket']}/secrets/tables"
    spec = parse_sweep_spec({
        "sweep_id": "secrets", "model": str(tiny_dir), "random_clt": {"features": 8, "seed": 1}, "prompts": PROMPTS[:3],
        "resources": {"workers": 1, "num_cpus": 1}, "storage": {"url": root, "endpoint_url": s3["endpoint"]}})
    r = run_sweep(spec, progress=False)
    assert (r.ok, r.failed) == (3, 0)

    # the control: a value put into a runtime_env does land in the session directory (the leak this test guards)
    control = f"ctraycontrol{uuid.uuid4().hex}"
    probe = ray_local.remote(_probe).options(runtime_env={"env_vars": {"CT_RAY_PROBE": control}})
    assert ray_local.get(probe.remote()) == control
    assert _files_with(session, control.encode())
    for needle in (secret, key_id):
        assert _files_with(session, needle.encode()) == [], "a credential in Ray's session directory"
        assert _files_with(Path(os.environ["CT_RAY_CATALOG_DIR"]), needle.encode()) == []
    s3c = boto3.client("s3", endpoint_url=s3["endpoint"])
    objs = s3c.list_objects_v2(Bucket=s3["bucket"], Prefix="secrets/")["Contents"]
    assert len(objs) > 10
    for o in objs:
        body = s3c.get_object(Bucket=s3["bucket"], Key=o["Key"])["Body"].read()
        assert secret.encode() not in body and key_id.encode() not in body, o["Key"]


def test_no_aws_keys_no_credentials_file(ray_local, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    env = worker_env(ray_local)
    assert env["AWS_REGION"] == "eu-west-3" and "AWS_PROFILE" not in env
    assert worker_env(ray_local, forward_aws=False).get("AWS_REGION") is None


def test_a_killed_drivers_credentials_folder_is_removed_by_the_next(tmp_path, monkeypatch):
    """Issue 21 item 7: the private credentials file of a process that was killed (no atexit) no longer stays in the
    temp folder: the next ct_ray process that writes one removes folders whose process is gone."""
    import importlib
    import os
    import tempfile

    we = importlib.import_module("ct_ray.executor.worker_env")  # the module (the package exports a function)

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(we, "_cred_dir", None)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    dead = tmp_path / "ct_ray-aws-999999-abc"  # a pid that does not run
    dead.mkdir()
    (dead / "credentials").write_text("[x]\naws_secret_access_key = secret\n")
    alive = tmp_path / f"ct_ray-aws-{os.getppid()}-abc"  # a running process's: kept
    alive.mkdir()
    path = we._credentials_file()
    assert not dead.exists() and alive.exists()
    assert os.path.dirname(path).startswith(str(tmp_path / f"ct_ray-aws-{os.getpid()}-"))
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
