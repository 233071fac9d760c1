"""deploy/: the image definition, the cluster launcher config and the runtime_env examples agree with the
project's pins, and the image runs as a non-root user. No Docker engine or cluster is used: files are parsed."""

import importlib.util
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from ct_ray.deploy.policy import image_pinned

from ._deploy_helpers import ROOT, constraints, normalise, offline_packages, pinned_ray, project_version

DEPLOY = ROOT / "deploy"


def _dockerfile() -> tuple[dict[str, str], list[tuple[str, str]]]:
    """(ARG defaults, [(instruction, arguments)]) with line continuations joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    steps = [tuple(line.strip().split(None, 1)) for line in text.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    args = {}
    for op, rest in steps:
        if op.upper() == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args.setdefault(name, value)
    return args, [(op.upper(), rest) for op, rest in steps]


def test_dockerfile_from_is_the_pinned_official_ray_image():
    args, steps = _dockerfile()
    froms = [rest for op, rest in steps if op == "FROM"]
    assert len(froms) == 1
    for variant in (args["VARIANT"], "cu128"):  # the CPU default and the documented CUDA build
        image = froms[0].replace("${VARIANT}", variant)
        assert image == f"rayproject/ray:{pinned_ray()}-py311-{variant}"
        assert image_pinned(image)
    assert args["VARIANT"] == "cpu"
    assert args["TORCH_VERSION"] == re.search(r"TORCH_VERSION \?= (\S+)", (ROOT / "Makefile").read_text()).group(1)


def test_dockerfile_runs_as_non_root_and_installs_the_pins():
    _, steps = _dockerfile()
    users = [rest.split(":")[0] for op, rest in steps if op == "USER"]
    assert users and users[-1] not in ("0", "root"), "the image must end as a non-root user"
    assert users[-1] == "1000", "numeric uid, so Kubernetes can verify runAsNonRoot"
    runs = " ".join(rest for op, rest in steps if op == "RUN")
    assert "-c constraints.txt ." in runs
    assert f"--no-deps {' '.join(offline_packages())}" in runs
    assert all(op != "ADD" for op, _ in steps), "COPY only: no remote downloads into the image"


def test_dockerignore_keeps_local_state_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "ct_ray_data"} <= set(ignored)


def _ray_package_file(relative: str) -> Path:
    # find_spec on a top-level package locates it without importing Ray
    return Path(importlib.util.find_spec("ray").submodule_search_locations[0]) / relative


def test_cluster_launcher_config():
    config = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    schema = json.loads(_ray_package_file("autoscaler/ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert any("--num-cpus=0" in c for c in config["head_start_ray_commands"])
    gpu = [t for t in types.values() if "gpus" in " ".join(t.get("docker", {}).get("worker_run_options", []))]
    assert gpu and all(t["min_workers"] == 0 for t in gpu)
    images = [config["docker"]["image"]] + [t["docker"]["worker_image"] for t in types.values() if "docker" in t]
    for image in images:
        assert image_pinned(image) and image.rsplit(":", 1)[1].startswith(project_version())
    assert "aws_access_key" not in json.dumps(config).lower()


@pytest.mark.parametrize("path", sorted(p.name for p in (DEPLOY / "runtime_env").glob("*.yaml")))
def test_runtime_env_examples(path):
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((DEPLOY / "runtime_env" / path).read_text())
    assert set(env) <= RuntimeEnv.known_fields - {"container"}, "unknown (or deprecated container) field"
    RuntimeEnv(**env)  # Ray's own validation of each field
    pins = constraints()
    packages = (env.get("pip") or {}).get("packages", [])
    for requirement in packages:
        name, sep, version = requirement.partition("==")
        assert sep, f"{requirement} is not pinned"
        assert pins[normalise(name)] == version, f"{requirement} differs from constraints.txt"
    assert not {"ray", "torch"} & {normalise(r.split("==")[0]) for r in packages}, "the cluster image provides those"
    if "image_uri" in env:
        assert image_pinned(env["image_uri"])
    assert not any("SECRET" in k or "TOKEN" in k for k in env.get("env_vars", {})), "credentials never in specs"
