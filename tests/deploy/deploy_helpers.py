"""Reading the deployment files offline: YAML, the kustomize subset the manifests use, MALORA_* settings."""

from __future__ import annotations

import copy
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
