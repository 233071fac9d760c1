"""Deployment rules the schemas cannot express: pinned images, resource requests and limits on every container,
nothing running as root or able to gain privileges. Each check returns human-readable violations."""

from __future__ import annotations

from collections.abc import Iterator

import yaml

ROOT_UID = 0


def pod_specs(node, where: str = "") -> Iterator[tuple[str, dict]]:
    """Every pod spec in a document, wherever a kind nests it (Job / CronJob templates, Ray groups, ...)."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield where or "/", node
        for key, value in node.items():
            yield from pod_specs(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from pod_specs(value, f"{where}/{i}")


def containers(doc: dict) -> Iterator[tuple[str, dict, dict]]:
    """(where, container, its pod spec) for every container, the KubeRay autoscaler sidecar included."""
    for where, spec in pod_specs(doc):
        for field in ("initContainers", "containers"):
            for c in spec.get(field, []):
                yield f"{where}/{field}/{c.get('name')}", c, spec
    for where, cluster in ray_cluster_specs(doc):
        opts = cluster.get("autoscalerOptions")
        if cluster.get("enableInTreeAutoscaling") and opts is not None:
            # the sidecar runs in the head pod, so it inherits that pod's security context
            head_pod = cluster["headGroupSpec"]["template"].get("spec", {})
            yield f"{where}/autoscalerOptions", opts, head_pod


def ray_cluster_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    """(where, RayCluster spec) of a RayCluster, or of the cluster a RayJob / RayCronJob creates."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayCluster":
        yield "/spec", spec
    for key, job in (("/spec", spec if doc.get("kind") == "RayJob" else None),
                     ("/spec/jobTemplate", spec.get("jobTemplate") if doc.get("kind") == "RayCronJob" else None)):
        if job and job.get("rayClusterSpec"):
            yield f"{key}/rayClusterSpec", job["rayClusterSpec"]


def image_pinned(ref: str) -> bool:
    """A digest, or a tag other than latest (a colon in the last path segment, not a registry port)."""
    if "@sha256:" in ref:
        return True
    last = ref.rsplit("/", 1)[-1]
    return ":" in last and last.rsplit(":", 1)[1] not in ("", "latest")


def violations(doc: dict) -> list[str]:
    """Everything in one document that breaks the deployment rules."""
    out = []
    for where, c, pod in containers(doc):
        image = c.get("image")
        # the autoscaler sidecar may leave image out: KubeRay then runs it from the (pinned) head image
        if image is not None and not image_pinned(image):
            out.append(f"{where}: image {image!r} is not pinned to a tag other than latest")
        if image is None and not where.endswith("autoscalerOptions"):
            out.append(f"{where}: no image")
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(res.get(part) or {})
            if missing:
                out.append(f"{where}: resources.{part} lacks {sorted(missing)}")
        out.extend(f"{where}: {v}" for v in _security_violations(c.get("securityContext") or {},
                                                                 pod.get("securityContext") or {}))
    return out


def _security_violations(ctx: dict, pod_ctx: dict) -> list[str]:
    out = []
    non_root = ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot"))
    uid = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
    if non_root is not True:
        out.append("runAsNonRoot is not true")
    if uid is None or uid == ROOT_UID:
        out.append(f"runAsUser is {uid!r}: set a non-zero uid (the image's user may be root)")
    if ctx.get("allowPrivilegeEscalation") is not False:
        out.append("allowPrivilegeEscalation is not false")
    if ctx.get("privileged"):
        out.append("privileged")
    if "ALL" not in ((ctx.get("capabilities") or {}).get("drop") or []):
        out.append("capabilities do not drop ALL")
    if (ctx.get("capabilities") or {}).get("add"):
        out.append("capabilities are added")
    return out


def embedded_manifests(doc: dict) -> list[dict]:
    """Kubernetes objects carried as text in a ConfigMap (e.g. the RayJob the nightly CronJob creates)."""
    if doc.get("kind") != "ConfigMap":
        return []
    found = []
    for text in (doc.get("data") or {}).values():
        try:
            parsed = list(yaml.safe_load_all(text))
        except yaml.YAMLError:
            continue
        found.extend(d for d in parsed if isinstance(d, dict) and "apiVersion" in d and "kind" in d)
    return found
