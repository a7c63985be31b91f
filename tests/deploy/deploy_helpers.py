"""Reading the deployment files offline: YAML, the kustomize subset the manifests use, MALORA_* settings."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
KUSTOMIZE_KEYS = {"apiVersion", "kind", "resources", "images", "patches"}


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomize(directory: Path) -> list[dict]:
    """`kubectl kustomize DIR` for the subset used here: resources (files or bases), images, strategic-merge patches
    from files. Any other kustomization field fails, so nothing is silently left out."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - KUSTOMIZE_KEYS
    assert not unknown, f"{directory}: kustomization fields this renderer does not know: {unknown}"
    objects: list[dict] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        objects += kustomize(path) if path.is_dir() else load_all(path)
    for patch_entry in spec.get("patches", []):
        assert set(patch_entry) == {"path"}, f"only file patches are rendered: {patch_entry}"
        for patch in load_all(directory / patch_entry["path"]):
            matches = [o for o in objects if (o["kind"], o["metadata"]["name"]) ==
                       (patch["kind"], patch["metadata"]["name"])]
            assert len(matches) == 1, f"patch {patch_entry['path']} matches {len(matches)} objects"
            merged = strategic_merge(matches[0], patch)
            objects = [merged if o is matches[0] else o for o in objects]
    for image in spec.get("images", []):
        for container in containers(objects):
            name, _, _ = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    return objects


def strategic_merge(base, patch):
    """Maps merge key by key; lists of maps with a `name` merge by name (containers, ports, volumes); others replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if (isinstance(base, list) and isinstance(patch, list) and base and patch
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        by_name = {x["name"]: x for x in base}
        merged = [strategic_merge(by_name[x["name"]], x) if x["name"] in by_name else copy.deepcopy(x) for x in patch]
        patched = {x["name"] for x in patch}
        return [copy.deepcopy(x) for x in base if x["name"] not in patched] + merged
    return copy.deepcopy(patch)


def containers(objects: list[dict]) -> list[dict]:
    return [c for o in objects if o["kind"] == "Deployment" for c in o["spec"]["template"]["spec"]["containers"]]


def one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}(s)"
    return found[0]


def check_malora_env(env: dict[str, str]):
    """Every MALORA_* variable names a `malora-serve` flag, and together they parse; returns the settings."""
    from server.settings import ENV_PREFIX, _env_name, build_parser, parse_settings

    flags = {_env_name(opt) for action in build_parser({})._actions for opt in action.option_strings
             if opt.startswith("--")}
    names = {k for k in env if k.startswith(ENV_PREFIX)}
    assert names - {"MALORA_CACHE"} <= flags, f"not malora-serve settings: {sorted(names - flags)}"
    return parse_settings([], env={k: str(v) for k, v in env.items()})


def secret_value(name: str, key: str) -> str:
    """What a pod reads from key `key` of Secret `name`, in these tests: a stand-in long enough for an admin key."""
    return f"<secret {name}/{key}>"


def container_env(objects: list[dict], container: dict) -> dict[str, str]:
    """The container's environment as the kubelet builds it: `envFrom` ConfigMaps, then `env` in order, with
    `secretKeyRef`s read by `secret_value` and `$(VAR)` references expanded (an unknown one stays as written)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert set(source) == {"configMapRef"}, f"env sources these tests read: ConfigMaps only, not {source}"
        config = next(o for o in objects if o["kind"] == "ConfigMap"
                      and o["metadata"]["name"] == source["configMapRef"]["name"])
        env.update({k: str(v) for k, v in config["data"].items()})
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]),
                                        str(entry["value"]))
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = secret_value(ref["name"], ref["key"])
    return env


class MissingVariable(Exception):
    """A `${VAR:?message}` of a compose file whose variable is unset or empty: `docker compose` stops with it."""


def compose_interpolate(value, env: dict[str, str]):
    """Compose's interpolation of `${VAR}`, `${VAR:-default}` and `${VAR:?message}` (and `$$`) in every string."""
    if isinstance(value, dict):
        return {k: compose_interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [compose_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match[0] == "$$":
            return "$"
        name, operator, argument = match["name"], match["op"], match["arg"]
        assert operator in (None, ":-", ":?"), f"interpolation these tests do not read: {match[0]}"
        if env.get(name):
            return env[name]
        if operator == ":?":
            raise MissingVariable(f"required variable {name} is missing a value: {argument}")
        return argument if operator == ":-" else ""

    return re.sub(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}", substitute, value)
