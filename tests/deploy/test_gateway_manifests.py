"""deploy/k8s/gateway: the inference gateway overlay, validated offline like the other manifests.

Core objects validate against the Kubernetes schemas (kubernetes-validate). The CRDs' own OpenAPI schemas
(InferencePool, HTTPRoute, the picker's EndpointPickerConfig) ship in no PyPI package, so the fields these files use
are checked against the structural schemas below, written from the v1 APIs (closed objects: a misspelt or v1alpha2
field fails). Then the objects must fit together: pool -> server pods and port, pool -> picker Service -> picker
container, route -> pool, picker -> pool and config file, and the metric names the picker reads must be ones the
server exports.
"""

from __future__ import annotations

import re

import jsonschema
import pytest
import yaml
from deploy_helpers import DEPLOY, REPO_ROOT, check_malora_env, container_env, containers, kustomize

kubernetes_validate = pytest.importorskip("kubernetes_validate")

GATEWAY = DEPLOY / "k8s" / "gateway"
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]  # grpc probes are GA from 1.27
NAME = {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {"type": "object", "required": ["name"], "properties": {"name": NAME, "labels": LABELS}}
INFERENCE_POOL_SCHEMA = {  # inference.networking.k8s.io/v1 InferencePool, the fields used here
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "inference.networking.k8s.io/v1"},
        "kind": {"const": "InferencePool"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "required": ["selector", "targetPorts", "endpointPickerRef"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"], "additionalProperties": False,
                             "properties": {"matchLabels": {**LABELS, "minProperties": 1, "maxProperties": 64}}},
                "targetPorts": {"type": "array", "minItems": 1, "maxItems": 8, "items": {
                    "type": "object", "required": ["number"], "additionalProperties": False,
                    "properties": {"number": PORT}}},
                "endpointPickerRef": {
                    "type": "object", "required": ["name", "port"], "additionalProperties": False,
                    "properties": {"group": {"type": "string"}, "kind": {"const": "Service"}, "name": NAME,
                                   "port": {"type": "object", "required": ["number"], "additionalProperties": False,
                                            "properties": {"number": PORT}},
                                   "failureMode": {"enum": ["FailOpen", "FailClose"]}}},
            },
        },
    },
}
HTTP_ROUTE_SCHEMA = {  # gateway.networking.k8s.io/v1 HTTPRoute, the fields used here
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "gateway.networking.k8s.io/v1"},
        "kind": {"const": "HTTPRoute"},
        "metadata": METADATA,
        "spec": {
            "type": "object", "required": ["parentRefs", "rules"], "additionalProperties": False,
            "properties": {
                "parentRefs": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["name"], "additionalProperties": False,
                    "properties": {"group": {"type": "string"}, "kind": {"type": "string"}, "name": NAME,
                                   "namespace": NAME, "sectionName": {"type": "string"}}}},
                "rules": {"type": "array", "minItems": 1, "maxItems": 16, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "matches": {"type": "array", "maxItems": 64, "items": {
                            "type": "object", "additionalProperties": False,
                            "properties": {"path": {
                                "type": "object", "additionalProperties": False,
                                "properties": {"type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                                               "value": {"type": "string", "pattern": "^/"}}}}}},
                        "backendRefs": {"type": "array", "minItems": 1, "maxItems": 16, "items": {
                            "type": "object", "required": ["name"], "additionalProperties": False,
                            "properties": {"group": {"type": "string"}, "kind": {"type": "string"}, "name": NAME,
                                           "port": PORT, "weight": {"type": "integer", "minimum": 0}}}},
                        "timeouts": {"type": "object", "additionalProperties": False, "properties": {
                            key: {"type": "string", "pattern": "^([0-9]{1,5}(h|m|s|ms)){1,4}$"}
                            for key in ("request", "backendRequest")}},
                    }}},
            },
        },
    },
}
SCORERS = {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer"}
PICKER_CONFIG_SCHEMA = {  # inference.networking.x-k8s.io/v1alpha1 EndpointPickerConfig (the picker's config file)
    "type": "object",
    "required": ["apiVersion", "kind", "plugins", "schedulingProfiles"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "inference.networking.x-k8s.io/v1alpha1"},
        "kind": {"const": "EndpointPickerConfig"},
        "plugins": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["type"], "additionalProperties": False,
            "properties": {"type": {"enum": [*sorted(SCORERS), "single-profile-handler", "max-score-picker"]},
                           "name": {"type": "string"}, "parameters": {"type": "object"}}}},
        "schedulingProfiles": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "plugins"], "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "plugins": {"type": "array", "items": {
                "type": "object", "required": ["pluginRef"], "additionalProperties": False,
                "properties": {"pluginRef": {"type": "string"}, "weight": {"type": "number", "minimum": 0}}}}}}},
    },
}
CRD_SCHEMAS = {"InferencePool": INFERENCE_POOL_SCHEMA, "HTTPRoute": HTTP_ROUTE_SCHEMA}


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return kustomize(GATEWAY)


def named(objects: list[dict], kind: str, name: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def test_objects_validate(objects):
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["ConfigMap", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Deployment", "Service",
                            "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor",
                            "InferencePool", "HTTPRoute", "ServiceAccount", "Role", "RoleBinding"])
    for obj in objects:
        if obj["kind"] in CRD_SCHEMAS:
            jsonschema.validate(obj, CRD_SCHEMAS[obj["kind"]])
        elif obj["kind"] != "ServiceMonitor":  # test_manifests.py checks it
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(obj, version, strict=True)
    jsonschema.validate(picker_config(objects), PICKER_CONFIG_SCHEMA)


def test_the_structural_schemas_refuse_the_old_api():
    """The v1alpha2 shape (targetPortNumber, extensionRef, a bare selector map) fails: the checks can fail."""
    old = {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool", "metadata": {"name": "p"},
           "spec": {"selector": {"app": "x"}, "targetPortNumber": 8000, "extensionRef": {"name": "epp"}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(old, INFERENCE_POOL_SCHEMA)


def picker_config(objects: list[dict]) -> dict:
    (container,) = [c for c in containers(objects) if c["name"] == "epp"]
    path = flags(container)["--config-file"]
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    pod = named(objects, "Deployment", "malora-epp")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    config = named(objects, "ConfigMap", volume["configMap"]["name"])
    return yaml.safe_load(config["data"][path.removeprefix(mount["mountPath"] + "/")])


def flags(container: dict) -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in container["args"])


def test_pool_route_and_picker_fit_together(objects):
    pool = named(objects, "InferencePool", "malora-serve")
    server = named(objects, "Deployment", "malora-serve")
    pod_labels = server["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (server_container,) = server["spec"]["template"]["spec"]["containers"]
    settings = check_malora_env(container_env(objects, server_container))
    assert pool["spec"]["targetPorts"] == [{"number": settings.port}]
    # No other pod carries the pool's labels (the picker must not pick itself).
    picker = named(objects, "Deployment", "malora-epp")
    picker_labels = picker["spec"]["template"]["metadata"]["labels"]
    assert not pool["spec"]["selector"]["matchLabels"].items() <= picker_labels.items()

    ref = pool["spec"]["endpointPickerRef"]
    service = named(objects, "Service", ref["name"])
    assert service["spec"]["selector"].items() <= picker_labels.items()
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    (container,) = picker["spec"]["template"]["spec"]["containers"]
    (target,) = [p for p in container["ports"] if p["name"] == port["targetPort"]]
    args = flags(container)
    assert str(target["containerPort"]) == args["--grpc-port"]
    assert args["--pool-name"] == pool["metadata"]["name"]
    health = int(args["--grpc-health-port"])
    assert container["livenessProbe"]["grpc"]["port"] == container["readinessProbe"]["grpc"]["port"] == health
    assert picker["spec"]["template"]["spec"]["serviceAccountName"] == named(objects, "ServiceAccount",
                                                                             "malora-epp")["metadata"]["name"]
    role = named(objects, "Role", "malora-epp")
    granted = {(group, resource) for rule in role["rules"] if {"get", "list", "watch"} <= set(rule["verbs"])
               for group in rule["apiGroups"] for resource in rule["resources"]}
    assert {("", "pods"), ("inference.networking.k8s.io", "inferencepools")} <= granted
    binding = named(objects, "RoleBinding", "malora-epp")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "malora-epp"}]

    route = named(objects, "HTTPRoute", "malora-serve")
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                    "name": pool["metadata"]["name"]}]
    timeout = int(re.fullmatch(r"([0-9]+)s", rule["timeouts"]["request"]).group(1))
    assert timeout >= settings.request_timeout


def test_the_picker_reads_metrics_the_replicas_export(objects):
    """The metric names in the picker's flags are exported, the replicas export them (the flag is on) without a key
    (the picker sends none), and every profile plugin is declared."""
    (container,) = [c for c in containers(objects) if c["name"] == "epp"]
    exported = (REPO_ROOT / "server" / "vllm_metrics.py").read_text()
    read = {v for k, v in flags(container).items() if k.endswith("-metric")}
    assert read == {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:lora_requests_info"}
    for name in read:
        assert f'"{name}"' in exported
    (server,) = [c for c in containers(objects) if c["name"] == "server"]
    settings = check_malora_env(container_env(objects, server))
    assert settings.vllm_compatible_metrics and settings.public_metrics and settings.api_keys
    config = picker_config(objects)
    declared = {p.get("name", p["type"]) for p in config["plugins"]}
    (profile,) = config["schedulingProfiles"]
    assert {p["pluginRef"] for p in profile["plugins"]} <= declared
    assert "lora-affinity-scorer" in declared


def test_every_replica_shares_the_adapter_sources(objects):
    """The picker may send any adapter to any replica: all replicas (one Deployment, one ConfigMap) read the same
    adapter root on a shared volume and the same object-storage source."""
    (server,) = [c for c in containers(objects) if c["name"] == "server"]
    settings = check_malora_env(container_env(objects, server))
    assert settings.adapter_roots and settings.adapter_sources
    claim = named(objects, "PersistentVolumeClaim", "malora-adapters")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
