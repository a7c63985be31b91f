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
    UnknownAdapterError,
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
    assert registry.host_names() == ["beta", "gamma"] and registry.counters.host_evictions == 1
    again = asyncio.run(registry.fetch("alpha"))  # re-read after host eviction: same version
    assert again.version == 1
    with pytest.raises(UnknownAdapterError):
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
    with pytest.raises(UnknownAdapterError):
        asyncio.run(registry.fetch("alpha"))
    assert "alpha" not in registry.discover()
    assert asyncio.run(registry.load("alpha", root / "alpha")).version == 2


def test_size_cap(root: Path) -> None:
    registry = AdapterRegistry(SHAPES, [root], max_adapter_bytes=100)
    with pytest.raises(AdapterTooLargeError):
        asyncio.run(registry.fetch("alpha"))
    assert os.path.getsize(root / "alpha" / WEIGHTS_FILE) > 100


def test_limits_on_n_r_and_d_refuse_an_adapter_before_it_is_kept(root: Path, tmp_path: Path) -> None:
    from malora_runtime.adapters.registry import AdapterLimitError, AdapterLimits

    wide = save_adapter(random_adapter(SHAPES, "tiny", ["q_proj"], 5, 3, 7, 1, seed=4, dtype="float32"), root / "wide")
    for limits, field in ((AdapterLimits(max_experts=4), "N = 5"), (AdapterLimits(max_rank=2), "r = 3"),
                          (AdapterLimits(max_subspace_rank=6), "d = 7")):
        registry = AdapterRegistry(SHAPES, [root], limits=limits)
        with pytest.raises(AdapterLimitError, match=field):
            asyncio.run(registry.fetch("wide"))
        assert registry.host_entry("wide") is None
        assert asyncio.run(registry.fetch("alpha")).version == 1  # the others are unaffected
    registry = AdapterRegistry(SHAPES, [root], limits=AdapterLimits(max_experts=5, max_rank=3, max_subspace_rank=7))
    assert asyncio.run(registry.load("wide", wide)).adapter.config.modules


def test_the_host_tier_keeps_within_its_byte_budget(root: Path) -> None:
    from malora_runtime.adapters.registry import AdapterLimitError, AdapterLimits

    one = asyncio.run(AdapterRegistry(SHAPES, [root]).fetch("alpha")).num_bytes
    registry = AdapterRegistry(SHAPES, [root], limits=AdapterLimits(max_host_bytes=2 * one))
    for name in ("alpha", "beta", "gamma"):
        asyncio.run(registry.fetch(name))
        assert registry.host_bytes <= 2 * one
    assert registry.host_names() == ["beta", "gamma"] and registry.counters.host_evictions == 1
    registry.pin("beta")
    asyncio.run(registry.fetch("alpha"))  # evicts gamma, the least recent that is not pinned
    assert registry.host_names() == ["beta", "alpha"]
    tiny = AdapterRegistry(SHAPES, [root], limits=AdapterLimits(max_host_bytes=one - 1))
    with pytest.raises(AdapterLimitError, match="--max-cpu-adapter-bytes"):
        asyncio.run(tiny.fetch("alpha"))


def test_adapters_in_slots_count_against_the_slots_not_the_host_tier(root: Path) -> None:
    """An adapter version in an engine slot is held for the slot: the host tier neither counts nor evicts it
    (evicting it would free nothing); it counts and evicts the others."""
    registry = AdapterRegistry(SHAPES, [root], max_cpu_adapters=1)
    alpha = asyncio.run(registry.fetch("alpha"))
    registry.slot_versions = lambda: {"alpha": alpha.version}
    asyncio.run(registry.fetch("beta"))
    assert registry.host_names() == ["alpha", "beta"] and registry.host_count == 1
    assert registry.host_bytes == registry.host_entry("beta").num_bytes
    asyncio.run(registry.fetch("gamma"))  # evicts beta, the only one outside a slot
    assert registry.host_names() == ["alpha", "gamma"] and registry.counters.host_evictions == 1


def test_pinned_adapters_filling_the_host_tier_refuse_a_new_one_and_commit_nothing(root: Path) -> None:
    from malora_runtime.adapters.registry import AdapterLimits

    one = asyncio.run(AdapterRegistry(SHAPES, [root]).fetch("alpha")).num_bytes
    registry = AdapterRegistry(SHAPES, [root], limits=AdapterLimits(max_host_bytes=2 * one))
    for name in ("alpha", "beta"):
        registry.pin(name)
        asyncio.run(registry.fetch(name))
    with pytest.raises(E.AdapterMemoryError, match="2 pinned adapters") as refused:
        asyncio.run(registry.fetch("gamma"))
    assert registry.host_names() == ["alpha", "beta"] and registry.version("gamma") is None
    # A client sees a retryable 503, not a 400 blaming its adapter.
    from server.errors import to_api_error

    error = to_api_error(refused.value)
    assert (error.status, error.code, error.headers.get("Retry-After")) == (503, "adapter_memory_full", "5")


def test_adapters_are_held_packed_at_their_own_size(root: Path) -> None:
    """The host tier holds each module once, packed in the layout the kernels read (its tensors are views)."""
    from malora_runtime.kernels.packed import TAIL, PackedModule

    entry = asyncio.run(AdapterRegistry(SHAPES, [root]).fetch("alpha"))
    for weights in entry.adapter.modules.values():
        assert isinstance(weights.packed, PackedModule)
        assert weights.S.untyped_storage().data_ptr() == weights.packed.buffer.untyped_storage().data_ptr()
    tensors = sum(t.numel() * t.element_size() for w in entry.adapter.modules.values() for t in w.tensors().values())
    extra = sum((TAIL + w.spec.num_experts) * 4 for w in entry.adapter.modules.values())  # tail, zero bias
    assert entry.num_bytes == tensors + extra


def test_an_unload_is_remembered_across_a_restart_until_a_load(root: Path, tmp_path: Path) -> None:
    from malora_runtime.adapters.unloaded import UnloadedRecord

    state = tmp_path / "state"
    first = AdapterRegistry(SHAPES, [root], unloaded_record=UnloadedRecord(state, [root]))
    asyncio.run(first.fetch("beta"))
    first.forget("beta")
    restarted = AdapterRegistry(SHAPES, [root], unloaded_record=UnloadedRecord(state, [root]))
    assert "beta" not in restarted.discover() and not restarted.is_known("beta")
    with pytest.raises(UnknownAdapterError):
        asyncio.run(restarted.fetch("beta"))
    other_roots = AdapterRegistry(SHAPES, [root, tmp_path], unloaded_record=UnloadedRecord(state, [root, tmp_path]))
    assert other_roots.is_known("beta")  # the record belongs to one set of roots
    asyncio.run(restarted.load("beta", root / "beta"))  # an explicit load brings it back, after restarts too
    again = AdapterRegistry(SHAPES, [root], unloaded_record=UnloadedRecord(state, [root]))
    assert again.is_known("beta")


def test_a_broken_or_unwritable_record_never_stops_the_registry(root: Path, tmp_path: Path) -> None:
    from malora_runtime.adapters.unloaded import UnloadedRecord

    record = UnloadedRecord(tmp_path / "state", [root])
    record.path.parent.mkdir()
    record.path.write_text("{not json")
    registry = AdapterRegistry(SHAPES, [root], unloaded_record=record)
    assert registry.unloaded_names() == set()
    blocked = UnloadedRecord(tmp_path / "file-not-dir" / "state", [root])
    (tmp_path / "file-not-dir").write_text("x")
    registry = AdapterRegistry(SHAPES, [root], unloaded_record=blocked)
    registry.forget("alpha")  # logged, not raised
    assert "alpha" in registry.unloaded_names()
