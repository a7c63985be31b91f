"""The Ray Serve application on a local Ray cluster: 2 replicas of the full server on the default model, 6 adapters.

Requests go through the OpenAI routes of the ingress; each replica's own `/metrics` shows where they landed.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import time
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY, ADMIN_KEY = "user-key", "admin-key-of-the-ray-test"  # an admin key has 16+ characters
ADAPTERS = [f"a{i}" for i in range(6)]
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
USER = {"Authorization": f"Bearer {API_KEY}"}  # /metrics needs a key when keys are set


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def adapter_root(default_model, tmp_path_factory) -> Path:
    """Six small random adapters, plus `a0-v2` (new weights for a reload of a0), all under one adapter root."""
    from malora_runtime.adapters import save_adapter
    from malora_runtime.adapters.init import random_adapter
    from malora_runtime.patching import linear_shapes

    model, _, source = default_model
    shapes = linear_shapes(model)
    root = tmp_path_factory.mktemp("ray-adapters")
    for seed, name in enumerate([*ADAPTERS, "a0-v2"]):
        adapter = random_adapter(shapes, source.name, ["q_proj", "v_proj"], 2, 4, 8, 1, seed, dtype="float32")
        save_adapter(adapter, root / name)
    return root


@pytest.fixture(scope="module")
def ingress(adapter_root):
    """The application's URL; Serve and Ray are shut down afterwards whatever happened."""
    from deploy.ray.app import build_app

    port = _free_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", str(REPO_ROOT))  # the replicas import `deploy.ray.app` and `server`
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        server_args = ["--adapter-root", str(adapter_root), "--api-key", API_KEY, "--admin-key", ADMIN_KEY,
                       "--kv-cache-memory", str(256 << 20), "--max-loaded-adapters", "8", "--log-level", "warning"]
        app = build_app({"replicas": 2, "num_cpus": 0.5, "max_adapters_per_replica": 6, "server_args": server_args})
        serve.run(app, name="malora", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _replicas(url: str) -> list[dict]:
    replicas = httpx.get(f"{url}/v1/replicas", headers=ADMIN, timeout=30).json()["data"]
    assert len(replicas) == 2
    return replicas


def _requests_by_adapter(replica_url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, float] = {}
    response = httpx.get(f"{replica_url}/metrics", headers=USER, timeout=30)
    assert response.status_code == 200, response.text
    for family in text_string_to_metric_families(response.text):
        if family.name == "malora_requests":
            for sample in family.samples:
                if sample.name == "malora_requests_total":
                    counts[sample.labels["adapter"]] = counts.get(sample.labels["adapter"], 0) + sample.value
    return counts


def test_requests_for_an_adapter_land_on_the_replica_that_holds_it(ingress):
    import openai

    client = openai.OpenAI(base_url=f"{ingress}/v1", api_key=API_KEY, max_retries=0, timeout=120)

    def ask(i_name: tuple[int, str]) -> str:
        i, name = i_name
        if i % 2:
            answer = client.chat.completions.create(model=name, messages=[{"role": "user", "content": f"Hi {i}"}],
                                                    max_tokens=4)
            return answer.choices[0].finish_reason
        return client.completions.create(model=name, prompt=f"Count: {i},", max_tokens=4).choices[0].finish_reason

    plan = list(enumerate(ADAPTERS + [ADAPTERS[i % len(ADAPTERS)] for i in range(26)]))  # 32 requests
    for step in plan[:len(ADAPTERS)]:  # the first of each adapter alone, so Ray learns where each was loaded
        assert ask(step) in ("length", "stop")
        time.sleep(0.3)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert set(pool.map(ask, plan[len(ADAPTERS):])) <= {"length", "stop"}

    stream = client.completions.create(model=ADAPTERS[0], prompt="Hello", max_tokens=4, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices)  # SSE passes through the ingress
    sent = {name: sum(n == name for _, n in plan) for name in ADAPTERS}
    sent[ADAPTERS[0]] += 1

    replicas = _replicas(ingress)
    counts = [_requests_by_adapter(r["url"]) for r in replicas]
    for name in ADAPTERS:
        served = [c.get(name, 0) for c in counts]
        assert sum(served) == sent[name], (name, served)
        assert min(served) == 0, f"{name} was served by both replicas: {served}"
        holder = replicas[served.index(max(served))]
        other = replicas[1 - served.index(max(served))]
        card = httpx.get(f"{holder['url']}/v1/adapters/{name}", headers=ADMIN, timeout=30).json()
        assert card["state"] in ("loaded", "cpu")
        assert httpx.get(f"{other['url']}/v1/adapters/{name}", headers=ADMIN, timeout=30).json()["state"] == "disk"
    assert all(any(c.get(name) for name in ADAPTERS) for c in counts), f"one replica served nothing: {counts}"


def test_adapter_changes_reach_every_replica(ingress, adapter_root):
    new_path = str(adapter_root / "a0-v2")
    replicas = _replicas(ingress)

    def cards(name: str) -> list[httpx.Response]:
        return [httpx.get(f"{r['url']}/v1/adapters/{name}", headers=ADMIN, timeout=30) for r in replicas]

    before = [c.json().get("version") or 0 for c in cards("a0")]
    reload = httpx.post(f"{ingress}/v1/load_lora_adapter", headers=ADMIN, timeout=60,
                        json={"lora_name": "a0", "lora_path": new_path, "load_inplace": True})
    assert reload.status_code == 200, reload.text
    assert reload.headers["x-malora-replicas"] == "2"
    after = [c.json() for c in cards("a0")]
    assert [a["path"] for a in after] == [new_path, new_path]
    assert all(a["version"] > b for a, b in zip(after, before, strict=True))

    load = httpx.post(f"{ingress}/v1/load_lora_adapter", headers=ADMIN, timeout=60,
                      json={"lora_name": "extra", "lora_path": new_path})
    assert load.status_code == 200, load.text
    assert [c.json()["state"] for c in cards("extra")] == ["loaded", "loaded"]
    again = httpx.post(f"{ingress}/v1/load_lora_adapter", headers=ADMIN, timeout=60,
                       json={"lora_name": "extra", "lora_path": new_path})
    assert again.status_code == 409  # every replica refuses alike: their error, as one server gives it

    unload = httpx.post(f"{ingress}/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": "extra"}, timeout=60)
    assert unload.status_code == 200, unload.text
    assert [c.status_code for c in cards("extra")] == [404, 404]
    auth = {"Authorization": f"Bearer {API_KEY}"}
    gone = httpx.post(f"{ingress}/v1/completions", headers=auth, timeout=60,
                      json={"model": "extra", "prompt": "Hi", "max_tokens": 4})
    assert gone.status_code == 404
    refused = httpx.post(f"{ingress}/v1/unload_lora_adapter", headers=auth, json={"lora_name": "a1"}, timeout=60)
    assert refused.status_code == 401


def test_a_replica_started_later_replays_the_changes(ingress, adapter_root):
    """Kill a replica: the one Serve starts in its place applies the reload and the unload above before it serves."""
    url = ingress
    before = {r["url"] for r in _replicas(url)}
    (victim, *_) = [a for a in ray.util.list_named_actors(all_namespaces=True) if "MaloraServer" in a["name"]]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    deadline = time.monotonic() + 120
    while True:
        replicas = httpx.get(f"{url}/v1/replicas", headers=ADMIN, timeout=30).json()["data"]
        new = [r for r in replicas if r["url"] not in before]
        if len(replicas) == 2 and new:
            break
        assert time.monotonic() < deadline, f"no replacement replica: {replicas}"
        time.sleep(1)
    (replica,) = new
    card = httpx.get(f"{replica['url']}/v1/adapters/a0", headers=ADMIN, timeout=30).json()
    assert card["path"] == str(adapter_root / "a0-v2")
    assert httpx.get(f"{replica['url']}/v1/adapters/extra", headers=ADMIN, timeout=30).status_code == 404
    assert httpx.get(f"{url}/v1/replicas", timeout=30).status_code == 401  # the list needs the admin key


def test_adapter_change_names_the_adapter_of_admin_requests_only():
    from deploy.ray.app import adapter_change

    assert adapter_change("POST", "/v1/load_lora_adapter", b'{"lora_name": "x", "lora_path": "/a"}') == "x"
    assert adapter_change("POST", "/v1/unload_lora_adapter", b'{"lora_name": "x"}') == "x"
    assert adapter_change("POST", "/v1/adapters", b'{"name": "y", "path": "/a"}') == "y"
    assert adapter_change("PUT", "/v1/adapters/z", b"{}") == "z"
    assert adapter_change("DELETE", "/v1/adapters/z", b"") == "z"
    assert adapter_change("POST", "/v1/load_lora_adapter", b"not json") == ""
    assert adapter_change("GET", "/v1/adapters/z", b"") is None
    assert adapter_change("POST", "/v1/completions", b'{"model": "x"}') is None


def test_build_app_refuses_public_replicas_without_a_key(monkeypatch):
    from deploy.ray.app import build_app

    for name in [k for k in os.environ if k.startswith("MALORA_")]:
        monkeypatch.delenv(name)
    # `malora-serve`'s own rules, refused before any replica starts, with argparse's message (and no key in it)
    with pytest.raises(ValueError, match="api-key"):
        build_app({"server_args": "--host 0.0.0.0"})
    with pytest.raises(ValueError, match="16") as refused:
        build_app({"server_args": "--api-key some-key --admin-key short-key"})
    assert "short-key" not in str(refused.value) and "some-key" not in str(refused.value)
    build_app({"server_args": "--host 0.0.0.0 --api-key some-key"})  # builds the graph only, starts nothing
    build_app({"server_args": "--host 0.0.0.0 --allow-unauthenticated"})


def test_the_directory_lists_a_replica_only_after_it_replayed_every_change():
    from deploy.ray.app import Directory

    directory = Directory.func_or_class()
    directory.register("r1", "http://a", ["base"], 0)
    directory.record("a0", {"method": "PUT", "path": "/v1/adapters/a0", "body": "{}"}, ["r1"])
    pending, seq = directory.register("r2", "http://b", ["base"], 0)
    assert [c["path"] for c in pending] == ["/v1/adapters/a0"] and seq == 1
    assert [r["replica"] for r in directory.list()] == ["r1"]  # not listed while it has changes to replay
    directory.record("x", {"method": "DELETE", "path": "/v1/adapters/x", "body": ""}, ["r1"])  # while r2 replays
    pending, seq = directory.register("r2", "http://b", ["base"], seq)
    assert [c["path"] for c in pending] == ["/v1/adapters/x"] and seq == 2
    assert directory.register("r2", "http://b", ["base"], seq) == ([], 2)
    assert [r["replica"] for r in directory.list()] == ["r1", "r2"]
    # a broadcast that listed the replicas before r3 registered records without it: r3 replays it at its health check
    directory.register("r3", "http://c", ["base"], 2)
    directory.record("a1", {"method": "PUT", "path": "/v1/adapters/a1", "body": "{}"}, ["r1", "r2"])
    assert [c["path"] for c in directory.take_missed("r3")] == ["/v1/adapters/a1"]
    assert directory.take_missed("r3") == [] and directory.take_missed("r1") == []
    directory.unregister("r3")
    assert directory.take_missed("r3") == []
