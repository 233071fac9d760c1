"""The subset of kustomize that k8s/ uses, in Python, so manifests can be rendered and validated without
downloading the kustomize binary (tests cross-check it against `kubectl kustomize` where kubectl exists).

Supported kustomization fields: apiVersion, kind, resources (files and directories), namespace,
labels (pairs only, no selectors or templates), images (name, newName, newTag) and patches that are JSON 6902
operation lists (add / replace / remove) with a target kind and name. Anything else raises KustomizeError, so a
kustomization cannot silently mean more than this renders.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from ..errors import CTRayError

KUSTOMIZATION = "kustomization.yaml"
_FIELDS = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}
_LABEL_FIELDS = {"pairs"}
_IMAGE_FIELDS = {"name", "newName", "newTag"}
_PATCH_FIELDS = {"path", "target"}
_TARGET_FIELDS = {"kind", "name"}
# kinds that live outside namespaces (only those k8s/ could plausibly use)
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass"}


class KustomizeError(CTRayError):
    """A kustomization this renderer does not support, or one that is wrong."""


def render(directory: str | Path) -> list[dict]:
    """The documents `kustomize build DIRECTORY` would print (in resource order, not kustomize's kind order)."""
    directory = Path(directory)
    path = directory / KUSTOMIZATION
    if not path.is_file():
        raise KustomizeError(f"no {KUSTOMIZATION} in {directory}")
    k = yaml.safe_load(path.read_text()) or {}
    _check_keys(k, _FIELDS, str(path))
    if k.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{path}: only kind Kustomization is supported, not {k['kind']}")
    docs: list[dict] = []
    for entry in k.get("resources", []):
        target = directory / entry
        docs.extend(render(target) if target.is_dir() else load_documents(target))
    for patch in k.get("patches", []):
        _apply_patch(docs, patch, directory, str(path))
    for image in k.get("images", []):
        _check_keys(image, _IMAGE_FIELDS, f"{path}: images")
        for doc in docs:
            _set_images(doc, image)
    for label in k.get("labels", []):
        _check_keys(label, _LABEL_FIELDS, f"{path}: labels (only pairs: no selectors or templates)")
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    if "namespace" in k:
        for doc in docs:
            _set_namespace(doc, k["namespace"])
    return docs


def load_documents(path: str | Path) -> list[dict]:
    """The non-empty YAML documents of one manifest file."""
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _check_keys(obj: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise KustomizeError(f"{where}: unsupported field(s) {unknown}; this renderer supports {sorted(allowed)}")


def _set_images(node, image: dict) -> None:
    # like kustomize: every containers[] / initContainers[] image anywhere in the document, whatever its kind
    if isinstance(node, list):
        for item in node:
            _set_images(item, image)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    if isinstance(c, dict) and "image" in c:
                        c["image"] = _new_image(c["image"], image)
            _set_images(value, image)


def _new_image(ref: str, image: dict) -> str:
    if "@" in ref:
        raise KustomizeError(f"image digests are not supported: {ref}")
    name, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:  # no tag (the colon belonged to a registry port)
        name, tag = ref, ""
    if name != image["name"]:
        return ref
    name = image.get("newName", name)
    tag = image.get("newTag", tag)
    return f"{name}:{tag}" if tag else name


def _set_namespace(doc: dict, namespace: str) -> None:
    if doc.get("kind") in _CLUSTER_SCOPED:
        return
    doc.setdefault("metadata", {})["namespace"] = namespace
    if doc.get("kind") in ("RoleBinding", "ClusterRoleBinding"):
        for s in doc.get("subjects", []):
            if s.get("kind") == "ServiceAccount" and s.get("namespace") in (None, "default"):
                s["namespace"] = namespace


def _apply_patch(docs: list[dict], patch: dict, directory: Path, where: str) -> None:
    _check_keys(patch, _PATCH_FIELDS, f"{where}: patches (path + target only)")
    target = patch.get("target") or {}
    _check_keys(target, _TARGET_FIELDS, f"{where}: patch target")
    if "path" not in patch or set(target) != _TARGET_FIELDS:
        raise KustomizeError(f"{where}: a patch needs a path and a target with kind and name")
    ops = yaml.safe_load((directory / patch["path"]).read_text())
    if not isinstance(ops, list):
        raise KustomizeError(f"{where}: {patch['path']} is not a JSON 6902 operation list (strategic merge "
                             "patches are not supported)")
    matches = [d for d in docs if d.get("kind") == target["kind"] and d.get("metadata", {}).get("name") == target["name"]]
    if not matches:
        raise KustomizeError(f"{where}: patch target {target['kind']}/{target['name']} not found")
    for doc in matches:
        for op in ops:
            json6902(doc, op)


def json6902(doc: dict, op: dict) -> None:
    """Apply one JSON patch operation (add, replace, remove) in place."""
    kind = op.get("op")
    if kind not in ("add", "replace", "remove"):
        raise KustomizeError(f"unsupported JSON patch op {kind!r} (add, replace, remove only)")
    keys = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    parent = doc
    for key in keys[:-1]:
        parent = parent[int(key)] if isinstance(parent, list) else parent[key]
    last = keys[-1]
    if isinstance(parent, list):
        if kind == "add":
            parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
            return
        idx = int(last)
        if not 0 <= idx < len(parent):
            raise KustomizeError(f"JSON patch path {op['path']} is out of range")
        if kind == "remove":
            del parent[idx]
        else:
            parent[idx] = copy.deepcopy(op["value"])
        return
    if kind != "add" and last not in parent:
        raise KustomizeError(f"JSON patch path {op['path']} does not exist")
    if kind == "remove":
        del parent[last]
    else:
        parent[last] = copy.deepcopy(op["value"])
