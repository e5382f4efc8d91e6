"""The Kubernetes manifests: each rendered kustomization validates against the Kubernetes OpenAPI
schemas of a pinned version, and ports, paths, probes, drain time and environment agree with the
service, as the compose tests check for docker-compose.yml."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.__main__ import GRACEFUL_SHUTDOWN_S
from service.app import create_app
from service.auth import OPEN_PATHS
from service.healthcheck import LIVE_PATH, READY_PATH
from service.metrics import Metrics
from service.settings import Settings
from tests.service_helpers import REPO

K8S_VERSION = "1.33.0"  # the schemas every manifest is validated against (strict: no unknown fields)
KUBE = REPO / "deploy" / "kubernetes"
CUSTOM_KINDS = {"ServiceMonitor", "InferenceService"}  # CRDs: their containers are checked as core Containers
ROUTES = set(create_app(Settings()).openapi()["paths"])  # every documented path


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pointer(doc: Any, path: str) -> tuple[Any, str | int]:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    for part in parts[:-1]:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    last = parts[-1]
    return doc, (int(last) if isinstance(doc, list) and last != "-" else last)


def json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 add / remove / replace: what the overlays use."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parent, key = _pointer(doc, op["path"])
        if op["op"] == "remove":
            del parent[key]
        elif op["op"] == "replace":
            assert (key in parent) if isinstance(parent, dict) else (key < len(parent)), op["path"]
            parent[key] = op["value"]
        elif op["op"] == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if key == "-" else int(key), op["value"])
            else:
                parent[key] = op["value"]
        else:
            raise AssertionError(f"patch op {op['op']} is not used here")
    return doc


def render(folder: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` for what these kustomizations use: resources, patches, images, labels."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    out: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (folder / resource).resolve()
        assert path.exists(), f"{folder}: resource {resource} does not exist"
        out += render(path) if path.is_dir() else documents(path)
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        matched = [d for d in out if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        assert matched, f"{folder}: patch target {target} matches nothing"
        for d in matched:
            out[out.index(d)] = json_patch(d, yaml.safe_load(patch["patch"]))
    for image in kustomization.get("images", []):
        for d in out:
            for c in pod_containers(d):
                if c["image"] == image["name"]:
                    c["image"] = f"{image['name']}:{image['newTag']}"
    for label in kustomization.get("labels", []):
        for d in out:
            d["metadata"].setdefault("labels", {}).update(label["pairs"])
    return out


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] == "Deployment":
        return doc["spec"]["template"]["spec"]
    if doc["kind"] == "InferenceService":
        return doc["spec"]["predictor"]
    return None


def pod_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return [] if spec is None else spec.get("initContainers", []) + spec.get("containers", [])


BUILDS = {"base": KUBE / "base", "overlays/models-pvc": KUBE / "overlays" / "models-pvc",
          "overlays/tls": KUBE / "overlays" / "tls"}
LOOSE = {"kserve": KUBE / "kserve" / "inferenceservice.yaml",
         "examples/hpa-queue-depth": KUBE / "examples" / "hpa-queue-depth.yaml",
         "examples/prometheus-adapter-rules": KUBE / "examples" / "prometheus-adapter-rules.yaml"}


def all_resources() -> list[tuple[str, dict[str, Any]]]:
    out = [(name, d) for name, folder in BUILDS.items() for d in render(folder)]
    return out + [(name, d) for name, path in LOOSE.items() for d in documents(path)]


def test_every_yaml_file_is_rendered_or_listed():
    used = {p.resolve() for p in LOOSE.values()}
    for folder in BUILDS.values():
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        used |= {(folder / r).resolve() for r in kustomization.get("resources", [])} | {folder / "kustomization.yaml"}
    on_disk = {p.resolve() for p in KUBE.rglob("*.yaml")}
    assert on_disk <= used | {(KUBE / "base" / "kustomization.yaml").resolve()}, on_disk - used


@pytest.mark.parametrize(("source", "doc"), all_resources(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_validates_against_the_pinned_kubernetes_schemas(source, doc):
    if doc["kind"] in CUSTOM_KINDS:
        assert doc["apiVersion"] in ("monitoring.coreos.com/v1", "serving.kserve.io/v1beta1")
        spec = pod_spec(doc)
        if spec is not None:  # a KServe predictor is a PodSpec plus KServe's fields
            core = {k: v for k, v in spec.items() if k not in ("minReplicas", "maxReplicas")}
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": core}
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        return
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in docs}


@pytest.mark.parametrize("build", list(BUILDS))
def test_deployment_agrees_with_the_service(build):
    docs = by_kind(render(BUILDS[build]))
    deployment, service = docs["Deployment"], docs["Service"]
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert all(name.startswith("VAE_") and name[4:].lower() in Settings.model_fields for name in env)
    settings = Settings(**{k[4:].lower(): v for k, v in env.items()})  # every value is a valid setting
    assert settings.workers == 1  # batching is per process: scale with replicas
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.port, "grpc": settings.grpc_port}
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {"http": "http", "grpc": "grpc"}
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert set(deployment["spec"]["selector"]["matchLabels"].items()) <= set(pod["metadata"]["labels"].items())
    probed = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if settings.tls_client_ca is not None:  # kubelet cannot present a client certificate: the module probes
            command = container[probe]["exec"]["command"]
            assert command[:3] == ["python3", "-m", "service.healthcheck"], probe
            probed[probe] = {"ready": READY_PATH, "live": LIVE_PATH}[command[3]]
        elif "grpc" in container[probe]:  # grpc.health.v1: SERVING once the default model is loaded
            assert container[probe]["grpc"]["port"] == settings.grpc_port and settings.tls_cert is None, probe
            probed[probe] = "/health/ready"
        else:
            get = container[probe]["httpGet"]
            assert get["port"] == "http" and get.get("scheme", "HTTP") == settings.scheme.upper(), probe
            probed[probe] = get["path"]
        assert probed[probe] in ROUTES and probed[probe] in OPEN_PATHS, probe
        assert container[probe]["timeoutSeconds"] <= container[probe]["periodSeconds"]
    assert probed["readinessProbe"] == "/health/ready" and probed["livenessProbe"] == "/health/live"
    if settings.tls_cert is not None:  # the files the settings name are where the secret is mounted
        tls_mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
        secret = next(v for v in spec["volumes"] if v["name"] == "tls")["secret"]
        for path in (settings.tls_cert, settings.tls_key, settings.tls_client_ca):
            assert str(path.parent) == tls_mount["mountPath"] and tls_mount["readOnly"]
            assert path.name in ("tls.crt", "tls.key", "ca.crt") and secret["secretName"] == "vaeserve-tls"
        (endpoint,) = docs["ServiceMonitor"]["spec"]["endpoints"]
        assert endpoint["scheme"] == "https" and endpoint["tlsConfig"]["keySecret"]["name"] == "vaeserve-tls"
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + GRACEFUL_SHUTDOWN_S
    for key in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][key].keys()
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == 10001
    for c in spec.get("initContainers", []) + spec["containers"]:
        assert c["securityContext"]["readOnlyRootFilesystem"] and not c["securityContext"]["allowPrivilegeEscalation"]
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert c["image"] == "vaeserve:0.1.0"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    models = mounts[str(settings.model_dir)]
    assert models["readOnly"] and "/tmp" in mounts
    volume = next(v for v in spec["volumes"] if v["name"] == models["name"])
    if build != "overlays/models-pvc":  # the init container fills the models volume before the server starts
        (init,) = spec["initContainers"]
        assert any(m["name"] == models["name"] for m in init["volumeMounts"]) and "emptyDir" in volume
    else:
        assert "initContainers" not in spec and volume["persistentVolumeClaim"]["readOnly"]
        assert volume["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]


def test_autoscaler_budget_and_monitor_point_at_the_deployment():
    docs = by_kind(render(BUILDS["base"]))
    deployment = docs["Deployment"]
    name, labels = deployment["metadata"]["name"], deployment["spec"]["selector"]["matchLabels"]
    queue_hpa = documents(LOOSE["examples/hpa-queue-depth"])[0]
    for hpa in (docs["HorizontalPodAutoscaler"], queue_hpa):
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert hpa["spec"]["minReplicas"] >= 2  # with the budget below, a drain never takes the last pod
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    assert docs["PodDisruptionBudget"]["spec"]["minAvailable"] == 1
    monitor = docs["ServiceMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= docs["Service"]["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and "/metrics" in ROUTES
    assert endpoint["port"] == docs["Service"]["spec"]["ports"][0]["name"]
    metric = queue_hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    gauges = {f.name for f in Metrics().registry.collect()}
    assert metric in gauges
    rules = yaml.safe_load(documents(LOOSE["examples/prometheus-adapter-rules"])[0]["data"]["config.yaml"])
    assert rules["rules"][0]["name"]["as"] == metric and metric in rules["rules"][0]["seriesQuery"]


def test_kserve_predictor_speaks_v2_on_its_port():
    (isvc,) = documents(LOOSE["kserve"])
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container"
    env = {e["name"]: e["value"] for e in container["env"]}
    settings = Settings(**{k[4:].lower(): v for k, v in env.items()})
    assert container["ports"][0]["containerPort"] == settings.port
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["port"] == settings.port and get["path"] in ROUTES and get["path"] in OPEN_PATHS
        assert re.fullmatch(r"/v2/health/(ready|live)", get["path"])
    assert container["securityContext"]["readOnlyRootFilesystem"]
