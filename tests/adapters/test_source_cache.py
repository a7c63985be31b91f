"""The adapter source cache (adapters/source_cache.py) against an in-memory store whose listings can lie: one
download per version, shared by concurrent fetches; caps before and during the transfer; nothing partial, oversized
or invalid ever visible; offline serving from the cache; LRU eviction under the byte budget."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from malora_runtime.adapters.errors import AdapterError, UnknownAdapterError
from malora_runtime.adapters.source_cache import AdapterTooLargeForCacheError, SourceCache
from malora_runtime.adapters.sources import (
    AdapterSource,
    AdapterSourceError,
    AdapterTransferError,
    RemoteFile,
    RemoteVersion,
    copy_stream,
    parse_source,
)

SOURCE = AdapterSource("team", "s3://bucket/adapters")


class MemoryStore:
    """name -> {file: bytes}; `listed_size` overrides what the listing says; `offline` makes it unreachable."""

    def __init__(self) -> None:
        self.files: dict[str, dict[str, bytes]] = {}
        self.listed_size: dict[str, int] = {}
        self.offline = False
        self.downloads = 0
        self.slow = 0.0

    def put(self, name: str, weights: bytes) -> None:
        self.files[name] = {"adapter_config.json": json.dumps({"n": len(weights)}).encode(),
                            "weights.safetensors": weights}

    def latest(self, name: str) -> RemoteVersion:
        if self.offline:
            raise AdapterSourceError(f"source {SOURCE}: listing {name!r} failed: ConnectError: unreachable")
        if name not in self.files:
            raise UnknownAdapterError(f"adapter {name!r} does not exist in source {SOURCE}")
        return RemoteVersion.of([RemoteFile(f, self.listed_size.get(f, len(b)), str(hash(b)), f)
                                 for f, b in self.files[name].items()])

    def download(self, name: str, version: RemoteVersion, into: Path, max_bytes: int) -> None:
        self.downloads += 1
        time.sleep(self.slow)
        budget = max_bytes
        for f in version.files:
            data = self.files[name][f.name]
            chunks = iter([data[i:i + 7] for i in range(0, len(data), 7)])
            budget -= copy_stream(lambda _n, c=chunks: next(c, b""), into / f.name, budget, f.size, f.name)


def read_weights(directory: Path) -> bytes:
    weights = (directory / "weights.safetensors").read_bytes()
    if weights.startswith(b"bad"):
        raise AdapterError(f"{directory}: not an adapter")
    return weights


def visible(cache: SourceCache) -> list[Path]:
    return sorted(p.relative_to(cache.root) for p, _, _ in cache.versions())


def no_leftovers(cache: SourceCache) -> bool:
    return not any(p.name.startswith(".") for p in cache.root.rglob("*"))


def test_a_version_is_downloaded_once_and_a_new_one_beside_it(tmp_path):
    store, cache = MemoryStore(), SourceCache(tmp_path / "cache")
    store.put("sql", b"v1" * 100)
    first = cache.fetch(SOURCE, store, "sql", 1 << 20, read_weights)
    again = cache.fetch(SOURCE, store, "sql", 1 << 20, read_weights)
    assert first.downloaded and not again.downloaded and store.downloads == 1
    assert first.path == again.path and first.value == b"v1" * 100
    store.put("sql", b"v2" * 100)
    newer = cache.fetch(SOURCE, store, "sql", 1 << 20, read_weights)
    assert newer.downloaded and newer.version != first.version and newer.value == b"v2" * 100
    assert len(visible(cache)) == 2 and no_leftovers(cache)


def test_concurrent_first_fetches_share_one_download(tmp_path):
    store, cache = MemoryStore(), SourceCache(tmp_path / "cache")
    store.put("sql", b"x" * 1000)
    store.slow = 0.3
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.fetch(SOURCE, store, "sql", 1 << 20,
                                                                           read_weights))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.downloads == 1 and len({r.path for r in results}) == 1 and sum(r.downloaded for r in results) == 1


@pytest.mark.parametrize("case", ["listed_too_big", "grows_in_transfer", "cut_short", "invalid"])
def test_nothing_oversized_partial_or_invalid_becomes_visible(tmp_path, case):
    store, cache = MemoryStore(), SourceCache(tmp_path / "cache")
    store.put("sql", b"good" * 10)
    good = cache.fetch(SOURCE, store, "sql", 4096, read_weights)
    if case == "listed_too_big":
        store.put("sql", b"y" * 5000)
        error = AdapterTooLargeForCacheError
    elif case == "grows_in_transfer":  # the listing says small; the bytes keep coming
        store.put("sql", b"y" * 5000)
        store.listed_size["weights.safetensors"] = 10
        error = AdapterTransferError
    elif case == "cut_short":  # the listing says more than arrives
        store.put("sql", b"y" * 100)
        store.listed_size["weights.safetensors"] = 300
        error = AdapterTransferError
    else:
        store.put("sql", b"bad" * 10)
        error = AdapterError
    with pytest.raises(error):
        cache.fetch(SOURCE, store, "sql", 4096, read_weights)
    assert visible(cache) == [good.path.relative_to(cache.root)] and no_leftovers(cache)


def test_offline_the_cached_version_serves_and_an_uncached_one_names_the_source(tmp_path):
    store, cache = MemoryStore(), SourceCache(tmp_path / "cache")
    store.put("sql", b"v1" * 10)
    store.put("chat", b"c" * 10)
    cached = cache.fetch(SOURCE, store, "sql", 4096, read_weights)
    store.offline = True
    offline = cache.fetch(SOURCE, store, "sql", 4096, read_weights)
    assert offline.offline and offline.path == cached.path and offline.value == b"v1" * 10
    with pytest.raises(AdapterSourceError, match="team .*unreachable"):
        cache.fetch(SOURCE, store, "chat", 4096, read_weights)
    store.offline = False
    with pytest.raises(UnknownAdapterError, match="'nope' does not exist in source team"):
        cache.fetch(SOURCE, store, "nope", 4096, read_weights)


def test_least_recently_used_versions_leave_first_under_the_byte_budget(tmp_path):
    store = MemoryStore()
    cache = SourceCache(tmp_path / "cache", max_bytes=2500)
    for name in ("a", "b", "c"):
        store.put(name, name.encode() * 1000)
        cache.fetch(SOURCE, store, name, 1 << 20, read_weights)
        time.sleep(0.02)
    assert [p.parts[1] for p in visible(cache)] == ["b", "c"]  # a went first
    time.sleep(0.02)
    cache.fetch(SOURCE, store, "b", 1 << 20, read_weights)  # b used again: c is now the oldest
    store.put("d", b"d" * 1000)
    cache.fetch(SOURCE, store, "d", 1 << 20, read_weights)
    assert [p.parts[1] for p in visible(cache)] == ["b", "d"] and cache.num_bytes <= 2500 and no_leftovers(cache)


@pytest.mark.parametrize("spec,reason", [
    ("team=s3://bucket/prefix", None),
    ("hub=hf://org/repo@v1.2/adapters", None),
    ("web=https://example.com/adapters/", None),
    ("s3://bucket/prefix", "NAME=URL"),
    ("team=ftp://host/x", "must start with"),
    ("team=s3://KEY:SECRET@bucket/x", "no credentials"),
    ("team=https://host/x?token=abc", "no credentials"),
    ("team=hf://justone", "org/repo"),
    ("bad name=s3://b/x", "NAME=URL"),
])
def test_source_specs_parse_or_say_why(spec, reason):
    if reason is None:
        source = parse_source(spec)
        assert not source.url.endswith("/") and source.name == spec.split("=")[0]
    else:
        with pytest.raises(ValueError, match=reason):
            parse_source(spec)


def test_an_s3_object_replaced_after_its_listing_is_never_half_read(tmp_path):
    """Through s3fs against moto's S3 server on loopback: the download reads exactly the listed version (s3fs asks
    for the listed ETag); a replaced object fails the transfer, and the next fetch lists and takes the new one."""
    import boto3
    from moto.server import ThreadedMotoServer

    from malora_runtime.adapters.sources import FsspecStore
    from tests.server.server_helpers import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        keys = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys)
        client.create_bucket(Bucket="bucket-b")
        client.put_object(Bucket="bucket-b", Key="p/sql/adapter_config.json", Body=b"{}")
        client.put_object(Bucket="bucket-b", Key="p/sql/weights.safetensors", Body=b"w" * 1000)
        import s3fs

        fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint})
        store = FsspecStore(AdapterSource("team", "s3://bucket-b/p"), fs=fs)
        version = store.latest("sql")
        assert version.size == 1002
        capped = tmp_path / "capped"
        capped.mkdir()
        with pytest.raises(AdapterTransferError, match="more bytes than the cap"):  # stopped while it arrives
            store.download("sql", version, capped, 500)
        client.put_object(Bucket="bucket-b", Key="p/sql/weights.safetensors", Body=b"w" * (3 << 20))
        into = tmp_path / "into"
        into.mkdir()
        with pytest.raises(AdapterTransferError, match="changed during the transfer"):
            store.download("sql", version, into, 8 << 20)
        gone = store.latest("sql")
        client.delete_object(Bucket="bucket-b", Key="p/sql/weights.safetensors")
        with pytest.raises(AdapterTransferError, match="gone since it was listed"):
            store.download("sql", gone, tmp_path / "capped", 8 << 20)
        client.put_object(Bucket="bucket-b", Key="p/sql/weights.safetensors", Body=b"w" * (3 << 20))
        cache = SourceCache(tmp_path / "cache")
        assert cache.fetch(SOURCE, store, "sql", 8 << 20, lambda p: (p / "weights.safetensors").stat().st_size
                           ).value == 3 << 20  # listed afresh: the new version, whole
    finally:
        server.stop()


def test_an_https_style_directory_listing_is_a_source(tmp_path):
    """fsspec's HTTP file system against a plain directory listing (Python's http.server on loopback)."""
    import functools
    import http.server

    from malora_runtime.adapters.sources import FsspecStore

    served = tmp_path / "www" / "adapters" / "sql"
    served.mkdir(parents=True)
    (served / "adapter_config.json").write_bytes(b'{"r": 4}')
    (served / "weights.safetensors").write_bytes(b"w" * 5000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        source = parse_source(f"web=http://127.0.0.1:{httpd.server_address[1]}/adapters")
        store = FsspecStore(source)
        version = store.latest("sql")
        assert [(f.name, f.size) for f in version.files] == [("adapter_config.json", 8),
                                                            ("weights.safetensors", 5000)]
        fetched = SourceCache(tmp_path / "cache").fetch(source, store, "sql", 1 << 20, read_weights)
        assert fetched.value == b"w" * 5000 and fetched.downloaded
        with pytest.raises(UnknownAdapterError):
            store.latest("nope")
    finally:
        httpd.shutdown()


def test_a_hub_adapter_is_listed_and_capped_before_anything_is_downloaded(tmp_path, monkeypatch):
    """Online hf:// (the Hub is not reachable from the tests: its listing API is replaced by a stand-in answering
    as list_repo_tree does): only the files directly in the adapter's directory count, the cap holds before any
    download, and a missing directory is an unknown adapter."""
    from types import SimpleNamespace

    from malora_runtime.adapters.sources import HubStore

    class Tree:
        def list_repo_tree(self, repo_id, path_in_repo, recursive, revision):
            assert (repo_id, revision, recursive) == ("org/adapters", "v2", False)
            if not path_in_repo.endswith("/sql"):
                raise type("RemoteEntryNotFoundError", (Exception,), {})("404")
            return [SimpleNamespace(path=f"{path_in_repo}/adapter_config.json", size=40, blob_id="a1"),
                    SimpleNamespace(path=f"{path_in_repo}/weights.safetensors", size=9000, blob_id="b1"),
                    SimpleNamespace(path=f"{path_in_repo}/checkpoint-100", tree_id="t1")]  # a folder: not fetched

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    source = parse_source("hub=hf://org/adapters@v2/loras")
    store = HubStore(source, api=Tree())
    monkeypatch.setattr(store, "_snapshot", lambda *a, **k: pytest.fail("downloaded before the cap was checked"))
    version = store.latest("sql")
    assert [(f.name, f.size) for f in version.files] == [("adapter_config.json", 40), ("weights.safetensors", 9000)]
    with pytest.raises(AdapterTooLargeForCacheError):
        SourceCache(tmp_path / "cache").fetch(source, store, "sql", 4096, read_weights)
    with pytest.raises(UnknownAdapterError):
        store.latest("nope")
