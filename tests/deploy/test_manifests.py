"""Kubernetes manifests, the compose file and the Ray Serve config, validated offline (no cluster, no engine)."""

from __future__ import annotations

import re
import subprocess
import sys

import jsonschema
import pytest
from deploy_helpers import DEPLOY, REPO_ROOT, check_malora_env, containers, kustomize, load_all, one

kubernetes_validate = pytest.importorskip("kubernetes_validate")

OVERLAYS = ["cpu", "gpu"]
K8S_VERSIONS = ["1.27.0", kubernetes_validate.latest_version()]
# The fields of the prometheus-operator ServiceMonitor CRD (monitoring.coreos.com/v1) these manifests use.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}},
                             "additionalProperties": False},
                "namespaceSelector": {"type": "object"},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "interval": {"type": "string", "pattern": "^(0|(([0-9]+)(ms|s|m|h))+)$"},
                                   "scrapeTimeout": {"type": "string"}, "scheme": {"enum": ["http", "https"]}}}},
            },
        },
    },
}


def test_every_yaml_file_under_deploy_passes_yamllint():
    result = subprocess.run([sys.executable, "-m", "yamllint", "-c", str(DEPLOY / ".yamllint.yaml"), "-f", "parsable",
                             str(DEPLOY)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, kustomize(DEPLOY / "k8s" / "overlays" / request.param)


def test_overlay_objects_validate_against_the_kubernetes_schemas(overlay):
    _, objects = overlay
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "PodDisruptionBudget",
                            "HorizontalPodAutoscaler", "ServiceMonitor"])
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":
            jsonschema.validate(obj, SERVICE_MONITOR_SCHEMA)
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_probes_ports_and_selectors_fit_together(overlay):
    _, objects = overlay
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    (container,) = containers(objects)
    settings = check_malora_env(one(objects, "ConfigMap")["data"])
    assert {"name": "http", "containerPort": settings.port} in container["ports"]
    assert settings.host == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["envFrom"][0]["configMapRef"]["name"] == one(objects, "ConfigMap")["metadata"]["name"]

    for selector in (deployment["spec"]["selector"]["matchLabels"], one(objects, "Service")["spec"]["selector"],
                     one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    service = one(objects, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0] == {"port": "http", "path": "/metrics", "interval": "15s"}

    # Adapters: a volume at the adapter root; the pod runs as the image's unprivileged user.
    (root,) = settings.adapter_roots
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(root))
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == one(objects, "PersistentVolumeClaim")["metadata"]["name"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["terminationGracePeriodSeconds"] > settings.shutdown_timeout


def test_autoscaler_scales_the_deployment_on_a_queue_metric_the_server_exports(overlay):
    _, objects = overlay
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(objects, "Deployment")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name == "malora_requests_waiting"
    assert f'"{name}"' in (REPO_ROOT / "server" / "telemetry.py").read_text()
    adapter = load_all(DEPLOY / "k8s" / "prometheus-adapter" / "values.yaml")[0]
    assert [rule["name"]["as"] for rule in adapter["rules"]["custom"]] == [name]
    assert one(objects, "PodDisruptionBudget")["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_resources_match_the_measured_memory(overlay):
    """Requests cover the resident memory measured under load (docs/deploy.md), limits leave headroom above it."""
    kind, objects = overlay
    (container,) = containers(objects)
    resources = container["resources"]
    measured = re.search(r"under load: ([0-9.]+) GiB", (REPO_ROOT / "docs" / "deploy.md").read_text())
    assert measured, "docs/deploy.md states the measured resident memory under load"
    request, limit = (_bytes(resources[k]["memory"]) for k in ("requests", "limits"))
    assert float(measured.group(1)) * 2**30 <= request < limit
    if kind == "gpu":
        assert resources["limits"]["nvidia.com/gpu"] == 1
        assert container["image"] == "malora-serve:cuda"
        assert check_malora_env(one(objects, "ConfigMap")["data"]).engine.device == "cuda"
    else:
        assert container["image"] == "malora-serve:cpu"
        assert "nvidia.com/gpu" not in resources["limits"]


def _bytes(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 1e3, "M": 1e6, "G": 1e9}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity).groups()
    return float(number) * units.get(unit, 1)


def test_compose_runs_the_server_prometheus_and_grafana():
    (compose,) = load_all(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"malora", "prometheus", "grafana"}
    malora = services["malora"]
    assert (DEPLOY / malora["build"]["context"]).resolve() == REPO_ROOT
    assert (REPO_ROOT / malora["build"]["dockerfile"]).is_file()
    settings = check_malora_env(malora["environment"])
    assert any(v.endswith(f":{settings.adapter_roots[0]}:ro") for v in malora["volumes"])
    assert "/ready" in " ".join(malora["healthcheck"]["test"])
    (scrape,) = load_all(DEPLOY / "prometheus" / "prometheus.yml")[0]["scrape_configs"]
    assert scrape["static_configs"][0]["targets"] == [f"malora:{settings.port}"]
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            assert (DEPLOY / volume.split(":")[0]).exists(), volume
    assert any(v.startswith("./grafana/dashboards:") for v in services["grafana"]["volumes"])


def test_ray_serve_config_is_a_valid_serve_deploy_config():
    pytest.importorskip("ray.serve")
    from ray.serve.schema import ServeDeploySchema

    from server.settings import parse_settings

    (config,) = load_all(DEPLOY / "ray" / "serve.yaml")
    (app,) = ServeDeploySchema.model_validate(config).applications
    assert app.import_path == "deploy.ray.app:build_app"
    parse_settings(app.args["server_args"], env={})
