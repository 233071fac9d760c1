"""The environment a driver passes to its Ray workers, without secrets.

Ray writes a task's or actor's `runtime_env` (env vars included) in plain text to its runtime_env agent log and shows
it in the dashboard, so credentials never go there. Workers get credentials the way any AWS client does:
- a local Ray started by this process inherits the driver's environment (keys included) from the start;
- on a cluster, from the nodes' own chain: IRSA / instance role / a mounted profile (docs/deploy.md);
- a Ray on this machine that was started before the keys were set (a notebook's, the tests') gets them through a
  private credentials file (mode 0600, outside Ray's session directory, removed at exit, or by the next ct_ray
  process when this one was killed) named by AWS_SHARED_CREDENTIALS_FILE: a path, not a secret.
Non-secret settings (endpoint, region, profile, config files, caches) are forwarded as they are.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
SETTINGS_ENV = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE",
                "AWS_CONFIG_FILE")
OTHER_ENV = ("HF_HUB_OFFLINE", "CT_RAY_CACHE", "HF_HOME", "TOKENIZERS_PARALLELISM", "CT_RAY_FAULT_CRASH_PROMPT")
_PROFILE = "ct-ray-driver"
_PREFIX = "ct_ray-aws-"  # + the writing process's pid
_cred_dir: str | None = None


def _remove_stale() -> None:
    """Credentials folders of ct_ray processes that were killed (atexit never ran): removed by the next one."""
    base = tempfile.gettempdir()
    try:
        names = os.listdir(base)
    except OSError:
        return
    for n in names:
        pid = n[len(_PREFIX):].split("-", 1)[0] if n.startswith(_PREFIX) else ""
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # its process still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # another user's: not ours to remove
        path = os.path.join(base, n)
        if os.path.isdir(path) and not os.path.islink(path) and os.stat(path).st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)


def _same_machine(ray) -> bool:
    """Every alive node of the cluster is this machine (a file written here is readable by all workers)."""
    try:
        from ray.util import get_node_ip_address

        me = get_node_ip_address()
        return all(n["NodeManagerAddress"] == me for n in ray.nodes() if n.get("Alive"))
    except Exception:  # cannot tell: assume a real cluster, where credentials come from the nodes themselves
        return False


def _credentials_file() -> str:
    """A private copy of the driver's AWS keys as a shared-credentials profile (written once per process)."""
    global _cred_dir
    if _cred_dir is None:
        _remove_stale()
        _cred_dir = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")  # 0700
        atexit.register(shutil.rmtree, _cred_dir, True)
    path = os.path.join(_cred_dir, "credentials")
    lines = [f"[{_PROFILE}]"]
    for k in SECRET_ENV:
        if os.environ.get(k):
            lines.append(f"{k.lower()} = {os.environ[k]}")
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    return path


def worker_env(ray, forward_aws: bool = True) -> dict[str, str]:
    """env_vars for the workers' runtime_env: settings only, never a credential (see the module docstring)."""
    env = {k: os.environ[k] for k in OTHER_ENV if k in os.environ}
    if not forward_aws:
        return env
    env.update({k: os.environ[k] for k in SETTINGS_ENV if k in os.environ})
    has_keys = os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")
    if has_keys and _same_machine(ray):
        env["AWS_SHARED_CREDENTIALS_FILE"] = _credentials_file()
        env["AWS_PROFILE"] = _PROFILE
    return env
