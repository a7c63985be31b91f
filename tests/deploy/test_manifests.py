"""Kubernetes manifests, the compose file and the Ray Serve config, validated offline (no cluster, no engine)."""

from __future__ import annotations

import re
import subprocess
import sys

import jsonschema
import pytest
from deploy_helpers import (
    DEPLOY,
    REPO_ROOT,
    MissingVariable,
    check_malora_env,
    compose_interpolate,
    container_env,
    containers,
    kustomize,
    load_all,
    one,
    secret_value,
)

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
                                   "scrapeTimeout": {"type": "string"}, "scheme": {"enum": ["http", "https"]},
                                   "authorization": {
                                       "type": "object", "required": ["credentials"], "additionalProperties": False,
                                       "properties": {"type": {"type": "string"}, "credentials": {
                                           "type": "object", "required": ["name", "key"],
                                           "additionalProperties": False,
                                           "properties": {"name": {"type": "string"}, "key": {"type": "string"},
                                                          "optional": {"type": "boolean"}}}}}}}},
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
    settings = check_malora_env(container_env(objects, container))
    assert {"name": "http", "containerPort": settings.port} in container["ports"]
    assert settings.host == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["envFrom"][0]["configMapRef"]["name"] == one(objects, "ConfigMap")["metadata"]["name"]

    for selector in (deployment["spec"]["selector"]["matchLabels"], one(objects, "Service")["spec"]["selector"],
                     one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    service = one(objects, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    endpoint = {k: v for k, v in monitor["spec"]["endpoints"][0].items() if k != "authorization"}
    assert endpoint == {"port": "http", "path": "/metrics", "interval": "15s"}

    # Adapters: a volume at the adapter root; the pod runs as the image's unprivileged user.
    (root,) = settings.adapter_roots
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(root))
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == one(objects, "PersistentVolumeClaim")["metadata"]["name"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["terminationGracePeriodSeconds"] > settings.shutdown_timeout


def test_probe_timing_lets_the_model_load_and_restarts_a_stalled_engine(overlay):
    """The startup probe waits at least as long as the image's own health check start period (the model loads
    first); then liveness restarts a pod whose /health keeps failing, without flapping on one slow answer."""
    kind, objects = overlay
    (container,) = containers(objects)
    startup, liveness, readiness = (container[p] for p in ("startupProbe", "livenessProbe", "readinessProbe"))
    dockerfile = (DEPLOY / "docker" / ("Dockerfile.cuda" if kind == "gpu" else "Dockerfile")).read_text()
    start_period = int(re.search(r"--start-period=([0-9]+)s", dockerfile).group(1))
    window = startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
    assert window >= max(start_period, 120)
    assert "initialDelaySeconds" not in liveness  # the startup probe holds it back
    assert liveness["failureThreshold"] >= 3 and liveness["periodSeconds"] * liveness["failureThreshold"] >= 20
    for probe in (startup, liveness, readiness):
        assert probe.get("timeoutSeconds", 1) < probe["periodSeconds"]
    assert readiness["periodSeconds"] <= liveness["periodSeconds"]


def test_keys_come_from_a_required_secret_and_prometheus_scrapes_with_one(overlay):
    """The pod listens on 0.0.0.0, so it needs an API key: its keys come from Secret references that are not
    optional (without the Secret the pod does not start, rather than serving without keys), never from the ConfigMap
    or an optional `secretRef`. The ServiceMonitor sends, as its bearer token, a Secret value the server takes as an
    API key; an admin key, if any, comes from the Secret too and is no API key."""
    _, objects = overlay
    (container,) = containers(objects)
    assert all("secretRef" not in source for source in container.get("envFrom", []))
    assert not {k for k in one(objects, "ConfigMap")["data"] if k.endswith("_KEY")}
    settings = check_malora_env(container_env(objects, container))
    assert settings.api_keys
    refs = {secret_value(ref["name"], ref["key"]): ref for entry in container.get("env", [])
            if (ref := entry.get("valueFrom", {}).get("secretKeyRef"))}
    assert set(settings.api_keys) <= set(refs), "every API key comes from the Secret"
    for key in settings.api_keys:
        assert refs[key].get("optional", False) is False, f"the API key's secretKeyRef is optional: {refs[key]}"
    if settings.admin_key is not None:
        assert settings.admin_key in refs and settings.admin_key not in settings.api_keys

    (endpoint,) = one(objects, "ServiceMonitor")["spec"]["endpoints"]
    authorization = endpoint["authorization"]
    assert authorization["type"] == "Bearer"
    credentials = authorization["credentials"]
    assert credentials.get("optional", False) is False
    assert secret_value(credentials["name"], credentials["key"]) in settings.api_keys


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
        assert check_malora_env(container_env(objects, container)).engine.device == "cuda"
    else:
        assert container["image"] == "malora-serve:cpu"
        assert "nvidia.com/gpu" not in resources["limits"]


def _bytes(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 1e3, "M": 1e6, "G": 1e9}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity).groups()
    return float(number) * units.get(unit, 1)


COMPOSE_ENV = {"MALORA_API_KEY": "compose-client-key", "GF_SECURITY_ADMIN_PASSWORD": "grafana-password"}


def test_compose_runs_the_server_prometheus_and_grafana():
    (raw,) = load_all(DEPLOY / "docker-compose.yml")
    compose = compose_interpolate(raw, COMPOSE_ENV)
    services = compose["services"]
    assert set(services) == {"malora", "prometheus", "grafana"}
    malora = services["malora"]
    assert (DEPLOY / malora["build"]["context"]).resolve() == REPO_ROOT
    assert (REPO_ROOT / malora["build"]["dockerfile"]).is_file()
    settings = check_malora_env(malora["environment"])
    assert any(v.endswith(f":{settings.adapter_roots[0]}:ro") for v in malora["volumes"])
    assert "/ready" in " ".join(malora["healthcheck"]["test"])
    (scrape,) = load_all(DEPLOY / "prometheus" / "prometheus.yml")[0]["scrape_configs"]
    assert scrape["job_name"] == "malora"
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
    env_vars = app.runtime_env["env_vars"]
    # Keys are the nodes' own variables, which Ray substitutes for ${VAR} (an unset one becomes empty).
    assert not {k: v for k, v in env_vars.items() if k.endswith("_KEY") and v != f"${{{k}}}"}

    def replica_settings(node_env: dict[str, str]):
        env = {k: re.sub(r"\$\{([A-Z0-9_]+)\}", lambda m: node_env.get(m[1], ""), v) for k, v in env_vars.items()}
        return parse_settings(app.args["server_args"], env=env)

    settings = replica_settings({"MALORA_API_KEY": "node-api-key"})
    assert settings.host == "0.0.0.0" and settings.api_keys == ["node-api-key"]
    with pytest.raises(SystemExit):  # replicas on 0.0.0.0 and no key on the node: refused
        replica_settings({})


def test_compose_requires_the_api_key_and_the_grafana_password():
    """`docker compose up` stops with a message when either is missing, instead of serving without a key (which
    the server refuses on 0.0.0.0) or starting Grafana with its default password."""
    (raw,) = load_all(DEPLOY / "docker-compose.yml")
    assert raw["services"]["malora"]["environment"]["MALORA_API_KEY"].startswith("${MALORA_API_KEY:?")
    password = raw["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert password.startswith("${GF_SECURITY_ADMIN_PASSWORD:?")
    for missing in COMPOSE_ENV:
        for value in (None, ""):
            env = {k: v for k, v in COMPOSE_ENV.items() if k != missing} | ({missing: value} if value == "" else {})
            with pytest.raises(MissingVariable, match=missing):
                compose_interpolate(raw, env)
    settings = check_malora_env(compose_interpolate(raw, COMPOSE_ENV)["services"]["malora"]["environment"])
    assert settings.host == "0.0.0.0" and settings.api_keys == [COMPOSE_ENV["MALORA_API_KEY"]]
    assert not {k for k in raw["services"]["malora"]["environment"] if k in
                ("MALORA_ALLOW_UNAUTHENTICATED", "MALORA_PUBLIC_METRICS", "MALORA_OPEN_HEALTH")}


def test_compose_grafana_has_no_anonymous_access():
    (raw,) = load_all(DEPLOY / "docker-compose.yml")
    env = {k: str(v).lower() for k, v in compose_interpolate(raw, COMPOSE_ENV)["services"]["grafana"]["environment"]
           .items()}
    assert env.get("GF_AUTH_ANONYMOUS_ENABLED", "false") == "false"
    assert "GF_AUTH_ANONYMOUS_ORG_ROLE" not in env
    for setting in ("GF_AUTH_DISABLE_LOGIN_FORM", "GF_AUTH_DISABLE_SIGNOUT_MENU", "GF_AUTH_PROXY_ENABLED",
                    "GF_USERS_ALLOW_SIGN_UP"):
        assert env.get(setting, "false") == "false", setting
    assert env.get("GF_AUTH_BASIC_ENABLED", "true") == "true"


def test_compose_prometheus_scrapes_with_the_api_key_from_a_secret():
    """Prometheus does not expand variables in its configuration: the key reaches it as a compose secret made from
    MALORA_API_KEY, read through `credentials_file`; its own port is on the loopback only (it has no login)."""
    (raw,) = load_all(DEPLOY / "docker-compose.yml")
    compose = compose_interpolate(raw, COMPOSE_ENV)
    prometheus = compose["services"]["prometheus"]
    settings = check_malora_env(compose["services"]["malora"]["environment"])
    config = load_all(DEPLOY / "prometheus" / "prometheus.yml")[0]
    (scrape,) = [job for job in config["scrape_configs"] if job["job_name"] == "malora"]
    authorization = scrape["authorization"]
    assert authorization.get("type", "Bearer") == "Bearer"
    assert "credentials" not in authorization  # no key written in the file
    secret_file = authorization["credentials_file"]
    (secret,) = [name for name in prometheus["secrets"] if secret_file == f"/run/secrets/{name}"]
    source = compose["secrets"][secret]
    assert source == {"environment": "MALORA_API_KEY"}
    assert COMPOSE_ENV[source["environment"]] in settings.api_keys
    assert all(str(port).startswith("127.0.0.1:") for port in prometheus["ports"])
