"""Adapters from `--adapter-source` URLs, end to end: real servers (a tiny random Llama, for speed) fetch adapters
from a real S3-protocol server on loopback (moto's, started and stopped by a fixture) and from a Hub-style cache
directory in huggingface_hub's offline mode. Lazy load, reload after an upload, two servers sharing a bucket,
names outside the source refused, oversized and truncated objects never served, concurrent first requests sharing
one download, offline serving from the cache."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import httpx
import pytest

from tests.server.server_helpers import API_KEY, free_port, start_server, wait_ready

pytestmark = [pytest.mark.timeout(600)]
ADMIN = "adapter-sources-admin-key"
BUCKET = "fleet"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny random Llama saved as the server loads `--model DIR`, and its module shapes."""
    from transformers import AutoTokenizer

    from malora_runtime.models.loader import materialize, resolve_model
    from malora_runtime.patching import linear_shapes
    from tests.conftest import make_tiny_llama

    directory = tmp_path_factory.mktemp("model") / "tiny-llama"
    tokenizer = AutoTokenizer.from_pretrained(materialize(resolve_model(None)))
    model = make_tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=512)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, linear_shapes(model)


def adapter_files(shapes: dict, directory: Path, seed: int, experts: int = 2) -> dict[str, bytes]:
    from malora_runtime.adapters import save_adapter
    from malora_runtime.adapters.init import random_adapter

    adapter = random_adapter(shapes, "tiny-llama", ["q_proj", "v_proj"], experts, 4, 8, 1, seed, dtype="float32",
                             output_scale=1.0)
    save_adapter(adapter, directory)
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def start_s3() -> tuple[object, str, object]:
    """moto's S3 server on loopback, with a bucket: (server, endpoint URL, boto3 client)."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    return server, endpoint, client


@pytest.fixture(scope="module")
def s3():
    server, endpoint, client = start_s3()
    yield endpoint, client
    server.stop()


def upload(client, prefix: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=data)


class Server:
    def __init__(self, tmp: Path, model: Path, args: list[str], env: dict[str, str], name: str) -> None:
        self.log = tmp / f"{name}.log"
        self.cache = tmp / f"{name}-cache"
        self.process, self.url = start_server(
            ["--model", str(model), "--admin-key", ADMIN, "--api-key", API_KEY, "--dtype", "float32",
             "--shutdown-timeout", "5", *args], self.log, env={"MALORA_CACHE": str(self.cache), **env})
        self.user = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
        self.admin = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)

    def ready(self) -> Server:
        """Wait until it serves (separate from starting, so that several servers start side by side)."""
        wait_ready(self.process, self.url, self.log)
        return self

    def complete(self, model: str) -> httpx.Response:
        return self.user.post("/v1/completions", json={"model": model, "prompt": "hello there", "max_tokens": 4,
                                                       "temperature": 0})

    def card(self, model: str) -> dict:
        return self.user.get(f"/v1/models/{model}").json()["adapter"]

    def cached_versions(self, name: str) -> list[str]:
        directory = self.cache / "adapters" / "team" / name
        return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []

    def stop(self) -> None:
        self.user.close()
        self.admin.close()
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def fleet(s3, tiny_model, tmp_path_factory):
    """Two servers on the same bucket prefix (their own caches), and a writer for adapters there."""
    endpoint, client = s3
    model, shapes = tiny_model
    tmp = tmp_path_factory.mktemp("fleet")
    upload(client, "team/sql", adapter_files(shapes, tmp / "sql-v1", seed=1))
    args = ["--adapter-source", f"team=s3://{BUCKET}/team", "--s3-endpoint-url", endpoint]
    # the cap lets the small adapters through and not one with 16x the experts
    cap = 4 * sum(len(b) for b in adapter_files(shapes, tmp / "probe", seed=0).values())
    servers = [Server(tmp, model, [*args, "--max-adapter-bytes", str(cap)], CREDENTIALS, name) for name in "ab"]
    try:
        for server in servers:  # both started before either is waited for: they load at the same time
            server.ready()
        yield servers, client, shapes, tmp
    finally:
        for server in servers:
            server.stop()


def test_first_request_fetches_lazily_and_the_card_and_metrics_show_the_source(fleet):
    (a, _), _, _, _ = fleet
    assert a.cached_versions("sql") == []
    answer = a.complete("sql")
    assert answer.status_code == 200, answer.text
    card = a.card("sql")
    assert card["source"] == "team" and card["source_url"] is None  # bucket names are for the operator
    [listed] = [c for c in a.admin.get("/v1/adapters").json()["data"] if c["name"] == "sql"]
    assert listed["source_url"] == f"s3://{BUCKET}/team/sql" and listed["source"] == "team"
    assert card["fetch_seconds"] > 0 and card["source_version"] in a.cached_versions("sql")
    metrics = a.user.get("/metrics").text
    assert 'malora_adapter_fetch_seconds{adapter="sql",source="team"}' in metrics
    assert "malora_adapter_cache_bytes" in metrics


def test_an_uploaded_version_is_picked_up_by_every_replica_on_reload(fleet):
    (a, b), client, shapes, tmp = fleet
    assert a.complete("sql").status_code == 200 and b.complete("sql").status_code == 200
    first = a.card("sql")["source_version"]
    assert b.card("sql")["source_version"] == first  # one bucket, one version
    upload(client, "team/sql", adapter_files(shapes, tmp / "sql-v2", seed=2))
    for server in (a, b):
        before = server.card("sql")["version"]
        reloaded = server.admin.put("/v1/adapters/sql", json={})
        assert reloaded.status_code == 200, reloaded.text
        card = server.card("sql")
        assert card["version"] == before + 1 and card["source_version"] != first
        answer = server.complete("sql")
        assert answer.headers["x-malora-adapter-version"] == str(before + 1)
    assert a.card("sql")["source_version"] == b.card("sql")["source_version"]
    assert len(a.cached_versions("sql")) == 2  # the older version stays cached (LRU), beside the new one


def test_names_outside_the_source_are_refused(fleet):
    (a, _), client, shapes, tmp = fleet
    upload(client, "elsewhere/secret", adapter_files(shapes, tmp / "secret", seed=3))
    assert a.complete("secret").status_code == 404
    for path in (f"s3://{BUCKET}/elsewhere/secret", f"s3://{BUCKET}/team/../elsewhere/secret",
                 f"s3://{BUCKET}/teamx/secret", "s3://other-bucket/team/sql"):
        refused = a.admin.post("/v1/adapters", json={"name": "secret", "path": path})
        assert refused.status_code == 400, (path, refused.text)
        assert "adapter-source" in refused.json()["error"]["message"]
    loaded = a.admin.post("/v1/load_lora_adapter", json={"lora_name": "sql-copy", "lora_path":
                                                         f"s3://{BUCKET}/team/sql"})
    assert loaded.status_code == 200, loaded.text
    assert a.complete("sql-copy").status_code == 200


def test_oversized_and_truncated_adapters_are_never_served_or_cached(fleet):
    (a, _), client, shapes, tmp = fleet
    upload(client, "team/huge", adapter_files(shapes, tmp / "huge", seed=4, experts=32))
    refused = a.complete("huge")
    assert refused.status_code == 400 and "exceeds the cap" in refused.json()["error"]["message"]
    files = adapter_files(shapes, tmp / "broken", seed=5)
    weights = next(name for name in files if name.endswith(".safetensors"))
    upload(client, "team/broken", {**files, weights: files[weights][: len(files[weights]) // 2]})
    broken = a.complete("broken")
    assert broken.status_code == 400, broken.text
    assert a.cached_versions("huge") == [] and a.cached_versions("broken") == []
    assert str(a.cache) not in broken.text  # the server's directories stay private
    upload(client, "team/broken", files)  # fixed upstream: served once its failure has expired
    deadline = 0
    while a.complete("broken").status_code != 200 and deadline < 40:
        deadline += 1
        __import__("time").sleep(0.25)
    assert a.complete("broken").status_code == 200 and len(a.cached_versions("broken")) == 1


def test_concurrent_first_requests_share_one_download(fleet):
    (a, _), client, shapes, tmp = fleet
    upload(client, "team/fresh", adapter_files(shapes, tmp / "fresh", seed=6))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: a.complete("fresh").status_code, range(8)))
    assert statuses == [200] * 8
    assert a.log.read_text().count("fetched adapter fresh version") == 1


def test_offline_a_cached_adapter_keeps_serving_and_an_uncached_one_names_the_source(tiny_model, tmp_path):
    """Its own S3 server, stopped half-way; a second server starts on the first one's cache with no network."""
    model, shapes = tiny_model
    moto, endpoint, client = start_s3()
    upload(client, "team/sql", adapter_files(shapes, tmp_path / "sql", seed=1))
    upload(client, "team/later", adapter_files(shapes, tmp_path / "later", seed=2))
    args = ["--adapter-source", f"team=s3://{BUCKET}/team", "--s3-endpoint-url", endpoint]
    online = Server(tmp_path, model, args, CREDENTIALS, "online").ready()
    try:
        assert online.complete("sql").status_code == 200
    finally:
        online.stop()
        moto.stop()
    env = {**CREDENTIALS, "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}
    offline = Server(tmp_path, model, args, env, "online").ready()  # same name: the same cache directory
    try:
        answer = offline.complete("sql")
        assert answer.status_code == 200, answer.text
        assert offline.card("sql")["fetched_offline"] is True
        unreachable = offline.complete("later")
        assert unreachable.status_code == 503, unreachable.text
        message = unreachable.json()["error"]["message"]
        assert "<source team>" in message and "failed" in message and f"s3://{BUCKET}" not in message
        assert "testing" not in message and "testing" not in offline.log.read_text()  # no credentials anywhere
    finally:
        offline.stop()


def write_hub_cache(root: Path, shapes: dict) -> None:
    """A Hub-style cache (huggingface_hub's layout) of `org/adapters`: `main` holds sql, tag `v1` an older commit
    holding only `old`."""
    repo = root / "models--org--adapters"
    main, v1 = "a" * 40, "b" * 40
    for commit, names in ((main, {"sql": 1}), (v1, {"old": 2, "sql": 3})):
        for name, seed in names.items():
            adapter_files(shapes, repo / "snapshots" / commit / "loras" / name, seed)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(main)
    (repo / "refs" / "v1").write_text(v1)


def test_hub_sources_resolve_revisions_from_the_offline_cache(tiny_model, tmp_path):
    model, shapes = tiny_model
    hub = tmp_path / "hub"
    write_hub_cache(hub, shapes)
    args = ["--adapter-source", "hub=hf://org/adapters/loras", "--adapter-source", "pinned=hf://org/adapters@v1/loras"]
    server = Server(tmp_path, model, args, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)}, "hub").ready()
    try:
        assert server.complete("sql").status_code == 200
        assert server.complete("old").status_code == 200  # not in main: found in the pinned revision
        sql, old = server.card("sql"), server.card("old")
        assert (sql["source"], old["source"]) == ("hub", "pinned")
        assert sql["source_version"].startswith("a" * 12) and old["source_version"].startswith("b" * 12)
        assert server.complete("nothing").status_code == 404
    finally:
        server.stop()
