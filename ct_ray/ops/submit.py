"""`ct-ray submit SPEC.yaml --address http://HEAD:8265`: run a spec on a Ray cluster as a Ray Job.

The job's driver runs `python -m ct_ray.cli <kind> _job/spec.yaml --address auto` on the cluster, in a working dir
that holds the spec and (default `--code project`) a copy of this project, so the cluster runs exactly this code;
`--code image` ships only the spec and uses the ct_ray installed in the cluster's image. Submission ids are
deterministic (`sweep-<sweep_id>`, `train-<name>-<spec hash>`, `harvest-<spec hash>`, `retrain-<name>-<date>`),
and Ray refuses a second job with the same id: submitting the same spec twice runs it once.

Authentication: Ray's own client reads RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) from the
environment and sends the token as a header; ct_ray never reads, logs or forwards the token. Nor does it put
credentials (AWS_*) in the job: the cluster's nodes get them from their own environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import CTRayError, one_line
from ..specs import SPEC_KINDS, HarvestSpec, TrainSpec

# never shipped: environments, data, VCS metadata, caches (Ray also honours the project's .gitignore)
EXCLUDES = [".venv", "ct_ray_data", ".git", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", ".ruff_cache",
            "build", "dist", "out", "benchmarks/_work"]
JOB_SPEC = "_job/spec.yaml"
# harmless settings worth carrying into the job; secrets stay out on purpose (see the module docstring)
_FORWARD_ENV = ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "CT_RAY_CACHE", "CT_RAY_CATALOG", "CT_RAY_CATALOG_DIR")


def detect_kind(data: dict, where: str) -> str:
    """What a spec file is, from an explicit `kind:` or from its keys (spec files written before `kind:` existed
    keep working)."""
    if "kind" in data:
        if data["kind"] not in SPEC_KINDS:
            raise CTRayError(f"{where}: unknown kind {data['kind']!r} (one of: {', '.join(SPEC_KINDS)})")
        return data["kind"]
    keys = set(data)
    train_f, harvest_f = set(TrainSpec.model_fields), set(HarvestSpec.model_fields)
    if "sweep_id" in keys:
        return "sweep"
    if "registry" in keys:
        return "retrain"
    if {"train", "sweep"} <= keys:
        return "demo"
    if "window" in keys or "n_contexts" in keys:  # only the feature-dashboards spec has these
        return "features"
    if keys and keys <= train_f and keys - harvest_f:
        return "train"
    if keys and keys <= harvest_f and keys - train_f:
        return "harvest"
    raise CTRayError(f"{where}: cannot tell which kind of spec this is; add `kind: <{'|'.join(SPEC_KINDS)}>`")


def read_spec(path: str):
    """(kind, validated spec) of a spec file; every problem is a one-line CTRayError."""
    from ..specs import load_yaml, read_yaml

    kind = detect_kind(read_yaml(path), str(path))
    return kind, load_yaml(path, SPEC_KINDS[kind])


def spec_hash(spec) -> str:
    return hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


def submission_id(kind: str, spec, date: str | None = None) -> str:
    if kind == "sweep":
        return f"sweep-{spec.sweep_id}"
    if kind == "retrain":
        from .retrain import check_date

        return f"retrain-{spec.name}-{check_date(date)}"
    if kind == "train":
        return f"train-{spec.name}-{spec_hash(spec)}"
    return f"{kind}-{spec_hash(spec)}"


_PATH_KEYS = {"registry", "work", "url", "out", "checkpoint", "activations", "metrics", "storage", "clt", "init_from"}


def relative_paths(obj, where: str = "") -> list[str]:
    """Spec fields holding relative local paths: on a cluster they resolve inside the job's temporary working dir
    (and on whichever node runs the code), so results written there are effectively lost."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            at = f"{where}.{k}" if where else str(k)
            if k in _PATH_KEYS and isinstance(v, str) and v and "://" not in v and not os.path.isabs(v):
                found.append(f"{at}={v}")
            else:
                found += relative_paths(v, at)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += relative_paths(v, f"{where}[{i}]")
    return found


def entrypoint(kind: str, python: str = "python", date: str | None = None) -> str:
    if kind == "demo":
        return f"{python} -m ct_ray.cli demo --spec {JOB_SPEC} --address auto"
    extra = f" --date {date}" if kind == "retrain" and date else ""
    return f"{python} -m ct_ray.cli {kind} {JOB_SPEC} --address auto{extra}"


def project_root() -> Path | None:
    """The checkout this ct_ray was imported from (None when ct_ray is installed, not checked out)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "ct_ray" / "cli.py").is_file() else None


def _ignore(root: Path):
    """copytree filter for EXCLUDES: plain patterns match a name at any depth, patterns with a '/' a path from the
    project root (as in .gitignore)."""
    import fnmatch

    names_pat = [p for p in EXCLUDES if "/" not in p]
    paths_pat = [p for p in EXCLUDES if "/" in p]

    top = root.resolve()

    def ignore(directory: str, names: list[str]) -> set[str]:
        rel = Path(directory).resolve().relative_to(top)
        return {n for n in names if any(fnmatch.fnmatch(n, p) for p in names_pat)
                or any(fnmatch.fnmatch((rel / n).as_posix(), p) for p in paths_pat)
                or _outside(Path(directory) / n, top)}
    return ignore


def _outside(path: Path, top: Path) -> bool:
    """A symlink whose target is not inside the project: never shipped (copytree would copy the target's bytes)."""
    return path.is_symlink() and not path.resolve().is_relative_to(top)


def stage_working_dir(spec_path: str, code: str, project: str | None = None) -> str:
    """A temporary directory to ship as the job's working_dir: the project (code='project') plus the spec."""
    d = tempfile.mkdtemp(prefix="ct_ray_submit_")
    try:
        if code == "project":
            root = Path(project) if project else project_root()
            if root is None or not (root / "ct_ray").is_dir():
                raise CTRayError("cannot find the project to ship (ct_ray is installed, not checked out): "
                                 "pass --project DIR or --code image")
            shutil.copytree(root, d, dirs_exist_ok=True, ignore=_ignore(root))
        os.makedirs(os.path.join(d, "_job"), exist_ok=True)
        shutil.copyfile(spec_path, os.path.join(d, JOB_SPEC))
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    return d


def runtime_env(working_dir: str, pip: str | None = None) -> dict:
    from .retrain import git_commit

    env = {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ}
    commit = git_commit()
    if commit:
        env["CT_RAY_GIT_COMMIT"] = commit  # provenance for the registry: the job's working dir has no .git
    renv = {"working_dir": working_dir, "excludes": EXCLUDES, "env_vars": env}
    if pip:
        p = Path(pip)
        if not p.is_file():
            raise CTRayError(f"requirements file not found: {p}")
        pkgs = [ln.split("#", 1)[0].strip() for ln in p.read_text().splitlines()]
        renv["pip"] = {"packages": [x for x in pkgs if x], "pip_check": False}
    return renv


# --- the Jobs API ----------------------------------------------------------------------------------------------
def _check_auth_env() -> None:
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or \
            (Path.home() / ".ray" / "auth_token").is_file():
        return
    raise CTRayError("RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH)")


def _explain(e: BaseException) -> str:
    msg = one_line(e)
    if "401" in msg or "Authentication required" in msg or "403" in msg or "Authentication failed" in msg:
        return (f"{msg} (the cluster wants a token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN)"
                if "401" in msg or "required" in msg else f"{msg} (check RAY_AUTH_TOKEN)")
    return msg


def connect(address: str | None):
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise CTRayError("give --address http://HEAD:8265 (the Ray dashboard) or set RAY_ADDRESS")
    _check_auth_env()
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # connection refused, wrong port, auth: one line, never the token
        raise CTRayError(f"cannot reach the Ray dashboard at {address}: {_explain(e)}") from None


def job_info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            return None
        raise CTRayError(f"cannot read job {job_id}: {_explain(e)}") from None


def require_job(client, job_id: str):
    info = job_info(client, job_id)
    if info is None:
        raise CTRayError(f"no job {job_id!r} at {client.get_address()}")
    return info


def _refused(job_id: str, status) -> CTRayError:
    return CTRayError(f"job {job_id} was already submitted (status {status}); a spec runs once per submission id: "
                      f"see `ct-ray jobs status {job_id}`, or pass --submission-id to run it again")


def submit(spec_path: str, address: str | None, *, date: str | None = None, job_id: str | None = None,
           code: str = "project", project: str | None = None, pip: str | None = None, python: str = "python",
           entrypoint_num_cpus: float | None = None, note=None) -> str:
    kind, spec = read_spec(spec_path)
    rel = relative_paths(spec.model_dump(mode="json"))
    if rel and note:
        note(f"relative paths resolve inside the job's working dir on the cluster, where results are not kept; "
             f"prefer absolute or s3:// URLs: {', '.join(rel[:5])}")
    if date and kind != "retrain":
        raise CTRayError(f"--date is for retrain specs; {spec_path} is a {kind} spec")
    job_id = job_id or submission_id(kind, spec, date)
    if kind == "retrain":  # the job runs the night the submitter meant, even if it starts after midnight
        from .retrain import check_date

        date = check_date(date)
    client = connect(address)
    existing = job_info(client, job_id)
    if existing is not None:
        raise _refused(job_id, existing.status)
    wd = stage_working_dir(spec_path, code, project)
    try:
        client.submit_job(entrypoint=entrypoint(kind, python, date), submission_id=job_id,
                          runtime_env=runtime_env(wd, pip), entrypoint_num_cpus=entrypoint_num_cpus,
                          metadata={"ct_ray_kind": kind, "ct_ray_spec": Path(spec_path).name,
                                    "ct_ray_spec_sha": spec_hash(spec)})
    except RuntimeError as e:
        if "already exists" in str(e):  # lost a race with another submitter: same answer
            raise _refused(job_id, "unknown") from None
        raise CTRayError(f"submission of {job_id} failed: {_explain(e)}") from None
    finally:
        shutil.rmtree(wd, ignore_errors=True)
    return job_id


def follow(client, job_id: str, out=print) -> str:
    """Stream a job's logs until it ends; returns its final status."""
    import asyncio

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            out(chunk, end="", flush=True)

    asyncio.run(tail())
    return str(require_job(client, job_id).status)
