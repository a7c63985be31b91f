"""The adapter registry: names, paths inside roots, single-flight loads, versions, host LRU."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from malora_runtime.adapters import errors as E
from malora_runtime.adapters import save_adapter
from malora_runtime.adapters.format import WEIGHTS_FILE
from malora_runtime.adapters.init import random_adapter
from malora_runtime.adapters.registry import (
    AdapterNameError,
    AdapterPathError,
    AdapterRegistry,
    AdapterTooLargeError,
    UnknownAdapterNameError,
)
from malora_runtime.patching import linear_shapes
from tests.conftest import make_tiny_llama

SHAPES = linear_shapes(make_tiny_llama())


def write(directory: Path, seed: int) -> Path:
    return save_adapter(random_adapter(SHAPES, "tiny", ["q_proj"], 2, 2, 3, 1, seed=seed, dtype="float32"), directory)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        write(root / name, i)
    return root


def test_discover_and_lazy_fetch(root: Path) -> None:
    registry = AdapterRegistry(SHAPES, [root], max_cpu_adapters=2)
    assert sorted(registry.discover()) == ["alpha", "beta", "gamma"]
    entries = [asyncio.run(registry.fetch(n)) for n in ("alpha", "beta", "gamma")]
    assert [e.version for e in entries] == [1, 1, 1]
    assert list(registry.host) == ["beta", "gamma"] and registry.counters.host_evictions == 1
    again = asyncio.run(registry.fetch("alpha"))  # re-read after host eviction: same version
    assert again.version == 1
    with pytest.raises(UnknownAdapterNameError):
        asyncio.run(registry.fetch("delta"))


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 200, "sp ace", "semi;colon"])
def test_unsafe_names_are_refused(root: Path, name: str) -> None:
    registry = AdapterRegistry(SHAPES, [root])
    with pytest.raises(AdapterNameError):
        asyncio.run(registry.load(name, root / "alpha"))


def test_paths_must_resolve_inside_a_root(root: Path, tmp_path: Path) -> None:
    outside = write(tmp_path / "outside", 9)
    (root / "link").symlink_to(outside, target_is_directory=True)
    registry = AdapterRegistry(SHAPES, [root])
    for path in (outside, root / ".." / "outside", root / "link", "../outside", "/etc"):
        with pytest.raises(AdapterPathError):
            asyncio.run(registry.load("x", path))
    assert asyncio.run(registry.load("ok", "alpha")).path == (root / "alpha").resolve()


def test_reload_makes_a_new_version_and_a_bad_one_changes_nothing(root: Path) -> None:
    registry = AdapterRegistry(SHAPES, [root])
    first = asyncio.run(registry.load("a", root / "alpha"))
    second = asyncio.run(registry.load("a", root / "beta"))
    assert (first.version, second.version) == (1, 2) and registry.counters.reloads == 1
    weights = root / "gamma" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(E.CorruptFileError):
        asyncio.run(registry.load("a", root / "gamma"))
    current = asyncio.run(registry.fetch("a"))
    assert current.version == 2 and current.path == (root / "beta").resolve()


def test_concurrent_loads_of_one_name_read_once(root: Path, monkeypatch) -> None:
    registry = AdapterRegistry(SHAPES, [root])
    reads = []
    original = registry._read
    monkeypatch.setattr(registry, "_read", lambda name, path: reads.append(name) or original(name, path))

    async def both():
        return await asyncio.gather(registry.load("a", root / "alpha"), registry.load("a", root / "alpha"))

    one, two = asyncio.run(both())
    assert one is two and reads == ["a"]


def test_unload_stops_lazy_discovery_until_loaded_again(root: Path) -> None:
    registry = AdapterRegistry(SHAPES, [root])
    asyncio.run(registry.fetch("alpha"))
    registry.forget("alpha")
    with pytest.raises(UnknownAdapterNameError):
        asyncio.run(registry.fetch("alpha"))
    assert "alpha" not in registry.discover()
    assert asyncio.run(registry.load("alpha", root / "alpha")).version == 2


def test_size_cap(root: Path) -> None:
    registry = AdapterRegistry(SHAPES, [root], max_adapter_bytes=100)
    with pytest.raises(AdapterTooLargeError):
        asyncio.run(registry.fetch("alpha"))
    assert os.path.getsize(root / "alpha" / WEIGHTS_FILE) > 100
