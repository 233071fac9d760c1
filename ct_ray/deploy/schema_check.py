"""Offline validation of Kubernetes manifests: KubeRay kinds against the CRD schemas kept in
k8s/schemas/kuberay-v1.7.0 (made strict), core kinds with `kubernetes-validate`."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

import jsonschema
import yaml

KUBERAY_VERSION = "v1.7.0"
# the Kubernetes minor the core kinds are checked against (CronJob timeZone is GA since 1.27)
KUBERNETES_VERSION = "1.32.0"
SCHEMA_DIR = Path(__file__).resolve().parents[2] / "k8s" / "schemas" / f"kuberay-{KUBERAY_VERSION}"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}


def strict(schema):
    """A copy of an OpenAPI v3 CRD schema in which every object that lists its properties rejects any other.

    Why: controller-gen leaves `additionalProperties` out, so plain JSON Schema accepts a typo'd field (say
    `minReplica`) that the API server would silently prune, and the manifest would not mean what it says.
    Objects marked x-kubernetes-preserve-unknown-fields, maps (an additionalProperties schema) and free-form
    objects (no properties) stay open, as the API server treats them. int-or-string fields are already an
    anyOf of integer and string in these files, and the other x-kubernetes-* keys are annotations that a JSON
    Schema validator ignores (CEL x-kubernetes-validations are not evaluated here).
    """
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k != "enum" else copy.deepcopy(v) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@cache
def crd_validator(kind: str, version: str = "v1", schema_dir: str = str(SCHEMA_DIR)) -> jsonschema.Draft7Validator:
    with open(Path(schema_dir) / CRD_FILES[kind]) as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    served = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in served:
        raise ValueError(f"{kind} CRD serves {sorted(served)}, not {version}")
    return jsonschema.Draft7Validator(strict(served[version]["schema"]["openAPIV3Schema"]))


def _where(err) -> str:
    return "/".join(str(p) for p in err.absolute_path) or "(root)"


def validate_crd(doc: dict, schema_dir: Path = SCHEMA_DIR) -> list[str]:
    """Schema errors of one ray.io document (empty when it is valid)."""
    group, _, version = doc.get("apiVersion", "").partition("/")
    if group != "ray.io" or doc.get("kind") not in CRD_FILES:
        return [f"not a KubeRay {KUBERAY_VERSION} kind: {doc.get('apiVersion')} {doc.get('kind')}"]
    validator = crd_validator(doc["kind"], version, str(schema_dir))
    return [f"{_where(e)}: {e.message}" for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.path))]


def validate_core(doc: dict, k8s_version: str = KUBERNETES_VERSION) -> list[str]:
    """Schema errors of one core Kubernetes document, unknown fields included (empty when it is valid)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{_where(e)}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"no schema for {doc.get('apiVersion')} {doc.get('kind')} in Kubernetes {k8s_version}: {e}"]
    return []


def validate(doc: dict) -> list[str]:
    """Errors of any document: KubeRay kinds against the CRDs, everything else as a core kind."""
    if doc.get("apiVersion", "").startswith("ray.io/"):
        return validate_crd(doc)
    return validate_core(doc)
