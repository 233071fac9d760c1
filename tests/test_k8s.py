"""k8s/: every kustomization renders, every manifest validates (KubeRay CRDs made strict, core kinds with
kubernetes-validate), and the deployment rules hold (pinned images, resources, non-root, head does no work,
GPU from zero, every Ray container on the shared table catalog)."""

import copy
import filecmp
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ct_ray.deploy import kustomize
from ct_ray.deploy.kustomize import KustomizeError, render
from ct_ray.deploy.policy import containers, embedded_manifests, image_pinned, ray_cluster_specs, violations
from ct_ray.deploy.schema_check import CRD_FILES, SCHEMA_DIR, validate, validate_crd

from ._deploy_helpers import pinned_ray, project_version

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUSTOMIZATIONS = sorted(p.parent.relative_to(K8S).as_posix() for p in K8S.rglob(kustomize.KUSTOMIZATION))
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
MANIFESTS = sorted(p.relative_to(K8S).as_posix() for p in K8S.rglob("*.yaml")
                   if p.name != kustomize.KUSTOMIZATION and "schemas" not in p.parts)
SHARED_SCHEMAS = ROOT.parent / "shared" / "schemas" / SCHEMA_DIR.name


def _all_docs(directory: str) -> list[dict]:
    docs = render(K8S / directory)
    return docs + [e for d in docs for e in embedded_manifests(d)]


def _cluster_specs(doc: dict) -> list[dict]:
    return [spec for _, spec in ray_cluster_specs(doc)]


def test_layout():
    assert {"base", "overlays/dev", "overlays/prod", "sweep", "schedule/cronjob", "schedule/raycronjob"} <= set(KUSTOMIZATIONS)
    assert set(CRD_FILES.values()) == {p.name for p in SCHEMA_DIR.glob("*.yaml")}


@pytest.mark.skipif(not SHARED_SCHEMAS.is_dir(), reason="no ../shared/schemas beside this checkout")
def test_vendored_schemas_match_shared():
    for name in CRD_FILES.values():
        assert filecmp.cmp(SCHEMA_DIR / name, SHARED_SCHEMAS / name, shallow=False), name


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_rendered_documents_validate(directory):
    docs = _all_docs(directory)
    assert docs
    for doc in docs:
        assert validate(doc) == [], (doc["kind"], doc["metadata"])


@pytest.mark.parametrize("path", MANIFESTS)
def test_every_manifest_file_validates(path):
    docs = kustomize.load_documents(K8S / path)
    if isinstance(docs[0], list):  # a JSON 6902 patch, checked through the overlay that applies it
        return
    for doc in docs + [e for d in docs for e in embedded_manifests(d)]:
        assert validate(doc) == [], (path, doc["kind"])


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_deployment_rules(directory):
    for doc in _all_docs(directory):
        assert violations(doc) == [], doc["kind"]


def test_rules_catch_root_unpinned_and_unbounded():
    bad = yaml.safe_load("""
        apiVersion: batch/v1
        kind: Job
        metadata: {name: bad}
        spec:
          template:
            spec:
              securityContext: {runAsUser: 0}
              containers:
                - {name: a, image: "ct-ray:latest", resources: {requests: {cpu: "1", memory: 1Gi}}}
                - {name: b, image: "localhost:5000/ct-ray"}
    """)
    text = "\n".join(violations(bad))
    for expected in ("'ct-ray:latest' is not pinned", "'localhost:5000/ct-ray' is not pinned", "resources.limits",
                     "runAsNonRoot is not true", "runAsUser is 0", "allowPrivilegeEscalation", "drop ALL"):
        assert expected in text
    assert image_pinned("registry.k8s.io/kubectl:v1.32.4") and image_pinned("a/b@sha256:" + "0" * 64)


def test_ray_clusters_head_idle_gpu_from_zero_autoscaling():
    seen_gpu = 0
    for directory in KUSTOMIZATIONS:
        for doc in _all_docs(directory):
            for cluster in _cluster_specs(doc):
                assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
                assert cluster["enableInTreeAutoscaling"] is True and "autoscalerOptions" in cluster
                assert cluster["rayVersion"] == pinned_ray()
                for group in cluster["workerGroupSpecs"]:
                    limits = [c["resources"]["limits"] for c in group["template"]["spec"]["containers"]]
                    if any("nvidia.com/gpu" in lim for lim in limits):
                        seen_gpu += 1
                        assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0, directory
                        assert group["maxReplicas"] >= 1
    assert seen_gpu >= 2  # the long-running cluster and the sweep cluster


def test_prod_has_gpu_and_dev_is_cpu_only():
    def gpu_groups(overlay):
        (cluster,) = [d for d in render(K8S / "overlays" / overlay) if d["kind"] == "RayCluster"]
        return [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]

    assert gpu_groups("prod") and not gpu_groups("dev")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_nightly_schedule_on_an_existing_cluster(overlay):
    docs = render(K8S / "overlays" / overlay)
    schedules = [d for d in docs if d["kind"] in ("RayCronJob", "CronJob")]
    assert len(schedules) == 1, "exactly one nightly schedule, or retraining is submitted twice"
    clusters = {d["metadata"]["name"] for d in docs if d["kind"] == "RayCluster"}
    jobs = [d["spec"]["jobTemplate"] for d in docs if d["kind"] == "RayCronJob"]
    jobs += [e["spec"] for d in docs for e in embedded_manifests(d) if e["kind"] == "RayJob"]
    assert len(jobs) == 1
    assert jobs[0]["clusterSelector"]["ray.io/cluster"] in clusters
    assert "ct-ray retrain" in jobs[0]["entrypoint"] and "--address auto" in jobs[0]["entrypoint"]
    assert len({d["metadata"].get("namespace") for d in docs}) == 1


def test_cronjob_fallback_submits_the_raycronjob_template():
    (cron,) = render(K8S / "schedule" / "raycronjob")
    (rayjob,) = [e for d in render(K8S / "schedule" / "cronjob") for e in embedded_manifests(d)]
    assert rayjob["spec"] == cron["spec"]["jobTemplate"]
    assert "generateName" in rayjob["metadata"] and "name" not in rayjob["metadata"]


def test_submitter_rbac_is_least_privilege():
    docs = {d["kind"]: d for d in render(K8S / "overlays" / "dev")
            if d["metadata"]["name"] == "ct-ray-retrain-submitter"}
    assert docs["Role"]["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]}]
    (subject,) = docs["RoleBinding"]["subjects"]
    assert subject == {"kind": "ServiceAccount", "name": "ct-ray-retrain-submitter", "namespace": "ct-ray-dev"}
    assert docs["RoleBinding"]["roleRef"]["kind"] == "Role"  # namespaced, never a ClusterRole


def test_credentials_come_from_secrets_that_have_templates():
    templates = {}
    for path in (K8S / "secrets").glob("*.yaml"):
        for d in kustomize.load_documents(path):
            templates[d["metadata"]["name"]] = set(d["stringData"])
    refs = set()
    for directory in KUSTOMIZATIONS:
        for doc in _all_docs(directory):
            assert doc["kind"] != "Secret", "real Secrets are created out of band, never applied from git"
            for _, c, _ in containers(doc):
                for env in c.get("env", []):
                    ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                    if ref:
                        refs.add((ref["name"], ref["key"], ref.get("optional", False)))
                    assert not any(w in env["name"] for w in ("SECRET", "PASSWORD", "TOKEN", "CT_RAY_CATALOG")) \
                        or ref, f"{env['name']} set literally"
            for cluster in _cluster_specs(doc):
                if cluster.get("authOptions", {}).get("secretName"):
                    refs.add((cluster["authOptions"]["secretName"], "auth_token", False))
    assert ("ct-ray-object-store", "AWS_ACCESS_KEY_ID", False) in refs
    assert ("ct-ray-object-store", "AWS_SECRET_ACCESS_KEY", False) in refs
    assert (CATALOG_SECRET, "CT_RAY_CATALOG", False) in refs and (CATALOG_SECRET, "PGPASSWORD", True) in refs
    for name, key, optional in refs:
        assert optional or key in templates.get(name, set()), f"no template for Secret {name} key {key}"


def test_sweep_spec_in_configmap_parses():
    from ct_ray.sweep import parse_sweep_spec

    (cm,) = [d for d in render(K8S / "sweep") if d["kind"] == "ConfigMap"]
    spec = parse_sweep_spec(yaml.safe_load(cm["data"]["sweep.yaml"]))
    assert spec.storage.url.startswith("s3://")
    assert spec.storage.catalog is None, "the catalog comes from CT_RAY_CATALOG (the Secret), not the spec"


CATALOG_SECRET = "ct-ray-catalog"


def _secret_ref(container: dict, name: str) -> dict | None:
    for env in container.get("env", []):
        if env["name"] == name:
            return (env.get("valueFrom") or {}).get("secretKeyRef") or {"literal": env.get("value")}
    return None


def _catalog_env_problems(container: dict) -> list[str]:
    """Why a Ray container would not reach the shared catalog: CT_RAY_CATALOG must come from the Secret, and not
    optionally (a pod without it would commit to a SQLite catalog on its own ephemeral disk); PGPASSWORD from the
    same Secret, optionally (REST and Glue catalogs have none)."""
    out = []
    if _secret_ref(container, "CT_RAY_CATALOG") != {"name": CATALOG_SECRET, "key": "CT_RAY_CATALOG"}:
        out.append(f"CT_RAY_CATALOG is {_secret_ref(container, 'CT_RAY_CATALOG')}, not required from {CATALOG_SECRET}")
    if _secret_ref(container, "PGPASSWORD") != {"name": CATALOG_SECRET, "key": "PGPASSWORD", "optional": True}:
        out.append(f"PGPASSWORD is {_secret_ref(container, 'PGPASSWORD')}, not optional from {CATALOG_SECRET}")
    return out


def _ray_containers(cluster: dict) -> list[tuple[str, dict]]:
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    return [(f"{group}/{c['name']}", c) for group, spec in groups for c in spec["template"]["spec"]["containers"]]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_every_ray_container_gets_the_catalog_from_the_secret(directory):
    """Drivers (a RayJob's entrypoint, `ct-ray submit` jobs, the nightly retraining) run on a head and commit to
    the catalog; workers may read tables. Each one of them names the shared catalog."""
    for doc in _all_docs(directory):
        for where, cluster in ray_cluster_specs(doc):
            for name, c in _ray_containers(cluster):
                assert _catalog_env_problems(c) == [], (directory, doc["kind"], where, name)


def test_catalog_reaches_the_drivers_of_every_kind_of_job():
    clusters = [(d["kind"], d["metadata"]["name"], c) for directory in KUSTOMIZATIONS for d in _all_docs(directory)
                for _, c in ray_cluster_specs(d)]
    assert {kind for kind, _, _ in clusters} >= {"RayCluster", "RayJob"}  # long-running and a sweep's own
    assert sum(len(_ray_containers(c)) for _, _, c in clusters) >= 5
    for overlay in OVERLAYS:
        docs = render(K8S / "overlays" / overlay)
        heads = {d["metadata"]["name"]: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
                 for d in docs if d["kind"] == "RayCluster"}
        jobs = [d["spec"]["jobTemplate"] for d in docs if d["kind"] == "RayCronJob"]
        jobs += [e["spec"] for d in docs for e in embedded_manifests(d) if e["kind"] == "RayJob"]
        assert jobs
        for job in jobs:
            # a job on an existing cluster: its driver inherits the env of that cluster's head
            (head,) = heads[job["clusterSelector"]["ray.io/cluster"]]
            assert _catalog_env_problems(head) == [], overlay
            assert "CT_RAY_CATALOG" not in job.get("runtimeEnvYAML", ""), "a literal would override the Secret"


def test_catalog_check_catches_a_missing_or_literal_catalog():
    (cluster,) = [d for d in render(K8S / "base") if d["kind"] == "RayCluster"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert _catalog_env_problems(head) == []
    missing = copy.deepcopy(head)
    missing["env"] = [e for e in missing["env"] if e["name"] != "CT_RAY_CATALOG"]
    assert "CT_RAY_CATALOG is None" in _catalog_env_problems(missing)[0]
    literal = copy.deepcopy(head)
    for e in literal["env"]:
        if e["name"] == "CT_RAY_CATALOG":
            e.pop("valueFrom")
            e["value"] = "sqlite:////tmp/catalog.db"
    assert "literal" in _catalog_env_problems(literal)[0]
    optional = copy.deepcopy(head)
    for e in optional["env"]:
        if e["name"] == "CT_RAY_CATALOG":
            e["valueFrom"]["secretKeyRef"]["optional"] = True
    assert _catalog_env_problems(optional)


def test_dev_overlay_runs_the_catalog_database_the_secret_template_names():
    from urllib.parse import urlsplit

    from ct_ray.store.catalog import catalog_properties, check_catalog_uri

    docs = {(d["kind"], d["metadata"]["name"]): d for d in render(K8S / "overlays" / "dev")}
    sts = docs[("StatefulSet", "ct-ray-catalog-db")]
    svc = docs[("Service", "ct-ray-catalog-db")]
    pod = sts["spec"]["template"]
    assert sts["spec"]["replicas"] == 1 and sts["spec"]["serviceName"] == "ct-ray-catalog-db"
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (db,) = pod["spec"]["containers"]
    assert db["image"] == "postgres:16"
    env = {e["name"]: e for e in db["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": CATALOG_SECRET, "key": "PGPASSWORD"}
    # the data directory lives on the claim, not on the pod's disk
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in db["volumeMounts"]}
    assert env["PGDATA"]["value"].startswith(mounts[claim["metadata"]["name"]] + "/")

    # the URI the Secret template holds for dev is this database, as the Ray pods reach it, with no password in it
    (template,) = kustomize.load_documents(K8S / "secrets" / "catalog.example.yaml")
    uri = check_catalog_uri(template["stringData"]["CT_RAY_CATALOG"])
    parts = urlsplit(uri)
    (port,) = svc["spec"]["ports"]
    assert (parts.scheme, parts.hostname, parts.port) == ("postgresql", svc["metadata"]["name"], port["port"])
    assert (parts.username, parts.path.lstrip("/")) == (env["POSTGRES_USER"]["value"], env["POSTGRES_DB"]["value"])
    assert port["targetPort"] in (db["ports"][0]["name"], db["ports"][0]["containerPort"])
    assert catalog_properties(uri, {})["uri"].startswith("postgresql+psycopg2://ct_ray@")

    # prod names a managed catalog: no database of its own
    prod = render(K8S / "overlays" / "prod")
    assert not [d for d in prod if d["kind"] in ("StatefulSet", "Deployment", "Service")]
    assert not [c for d in prod for _, c, _ in containers(d) if "postgres" in c.get("image", "")]


def test_images_match_the_project_version():
    version = project_version()
    for directory in KUSTOMIZATIONS:
        for doc in _all_docs(directory):
            for where, c, _ in containers(doc):
                if "ct-ray" in c.get("image", "").rsplit("/", 1)[-1]:
                    assert c["image"].rsplit(":", 1)[1].startswith(f"{version}-"), where


def test_strict_schema_rejects_typos_and_wrong_types():
    (cluster,) = [d for d in render(K8S / "base") if d["kind"] == "RayCluster"]
    assert validate_crd(cluster) == []
    typo = copy.deepcopy(cluster)
    group = typo["spec"]["workerGroupSpecs"][0]
    group["minReplica"] = group.pop("minReplicas")
    errors = "\n".join(validate_crd(typo))
    assert "'minReplica' was unexpected" in errors and "'minReplicas' is a required property" in errors
    nested = copy.deepcopy(cluster)
    nested["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resource"] = {}
    assert any("'resource' was unexpected" in e for e in validate_crd(nested))
    wrong_type = copy.deepcopy(cluster)
    wrong_type["spec"]["enableInTreeAutoscaling"] = "true"
    assert validate_crd(wrong_type)
    open_map = copy.deepcopy(cluster)  # maps stay open: any label or rayStartParams key is fine
    open_map["spec"]["headGroupSpec"]["rayStartParams"]["metrics-export-port"] = "8080"
    assert validate_crd(open_map) == []


def test_core_kinds_are_strict_too():
    (cron,) = [d for d in render(K8S / "schedule" / "cronjob") if d["kind"] == "CronJob"]
    cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    assert any("resourcez" in e for e in validate(cron))


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    (tmp_path / "smp.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: b}\n")
    cases = {"commonLabels: {a: b}": "commonLabels",
             "labels: [{pairs: {a: b}, includeSelectors: true}]": "includeSelectors",
             "patches: [{path: smp.yaml, target: {kind: ConfigMap, name: x}}]": "strategic merge",
             "patches: [{path: smp.yaml}]": "target"}
    for extra, message in cases.items():
        (tmp_path / "kustomization.yaml").write_text(f"resources: [cm.yaml]\n{extra}\n")
        with pytest.raises(KustomizeError, match=message):
            render(tmp_path)


def test_json6902_ops():
    doc = {"spec": {"a": [1, 2, 3], "m": {"k": "v"}}}
    for op in ({"op": "remove", "path": "/spec/a/0"}, {"op": "add", "path": "/spec/a/-", "value": 4},
               {"op": "replace", "path": "/spec/m/k", "value": "w"}, {"op": "add", "path": "/spec/m/a~1b", "value": 1}):
        kustomize.json6902(doc, op)
    assert doc == {"spec": {"a": [2, 3, 4], "m": {"k": "w", "a/b": 1}}}
    with pytest.raises(KustomizeError):
        kustomize.json6902(doc, {"op": "replace", "path": "/spec/missing", "value": 1})


def _kubectl_kustomize(directory: Path):
    if shutil.which("kubectl") is None:
        return None
    proc = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    return list(yaml.safe_load_all(proc.stdout)) if proc.returncode == 0 else None


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_renderer_matches_kubectl_kustomize(directory):
    """Where kubectl (with its built-in kustomize) is installed, the Python renderer must agree with it."""
    expected = _kubectl_kustomize(K8S / directory)
    if expected is None:
        pytest.skip("no working `kubectl kustomize` here")

    def key(d):
        return d["kind"], d["metadata"]["name"]

    assert sorted(render(K8S / directory), key=key) == sorted(filter(None, expected), key=key)
