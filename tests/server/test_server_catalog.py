"""The adapter manager's states and rules with a fake engine (no model): disk, cpu, loaded, failed, pins."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from malora_runtime.adapters import save_adapter
from malora_runtime.adapters.init import random_adapter
from malora_runtime.adapters.registry import AdapterPathError, AdapterRegistry, UnknownAdapterNameError
from malora_runtime.engine.adapter_slots import NoFreeSlotError
from malora_runtime.patching import linear_shapes
from server.adapters import AdapterConflictError, AdapterManager, PinLimitError
from tests.conftest import make_tiny_llama

SHAPES = linear_shapes(make_tiny_llama())


class FakeEngine:
    """Slots by name, reached where the manager reads them (`engine.runner.adapters`); no eviction."""

    def __init__(self, slots: int) -> None:
        self.adapters = SimpleNamespace(current={}, slots=[None] * slots, num_evictions=0)
        self.engine = SimpleNamespace(runner=SimpleNamespace(adapters=self.adapters))
        self.adapter_provider = None

    @property
    def active(self) -> dict[str, int]:
        return self.adapters.current

    async def add_adapter(self, name, adapter, version=0, pinned=False) -> int:
        slot = self.adapters.current.get(name)
        if slot is None:
            free = [i for i, s in enumerate(self.adapters.slots) if s is None]
            if not free:
                raise NoFreeSlotError("full")
            slot = free[0]
        self.adapters.slots[slot] = SimpleNamespace(adapter=adapter, version=version)
        self.adapters.current[name] = slot
        return slot

    async def remove_adapter(self, name: str) -> None:
        slot = self.adapters.current.pop(name, None)
        if slot is not None:
            self.adapters.slots[slot] = None


def write(directory: Path, seed: int) -> Path:
    return save_adapter(random_adapter(SHAPES, "tiny", ["q_proj"], 2, 2, 3, 1, seed=seed, dtype="float32"), directory)


def test_states_versions_and_rules(tmp_path: Path):
    root = tmp_path / "root"
    for i, name in enumerate(("a", "b", "c")):
        write(root / name, i)
    write(root / "versions" / "a2", 9)
    (root / "broken").mkdir()
    (root / "broken" / "malora_config.json").write_text("{")
    cli = write(tmp_path / "cli", 5)
    engine = FakeEngine(slots=2)
    manager = AdapterManager(engine, AdapterRegistry(SHAPES, [root]), max_loaded=2)
    assert engine.adapter_provider == manager.provide

    async def scenario() -> None:
        await manager.load_startup({"cli": cli}, pins=[])
        states = {v.name: v.state for v in manager.views()}
        assert states == {"a": "disk", "b": "disk", "c": "disk", "broken": "disk", "cli": "loaded"}
        host = await manager.resolve("a")  # lazy: read on first use
        assert host.version == 1 and await manager.provide("a") is host
        with pytest.raises(ValueError, match="invalid JSON"):
            await manager.resolve("broken")
        assert manager.view("broken").state == "failed" and "invalid JSON" in manager.view("broken").error
        view = await manager.load("a", "versions/a2", reload=True)  # relative to the first root
        assert (view.version, view.state, view.path) == (2, "loaded", (root / "versions" / "a2").resolve())
        with pytest.raises(AdapterConflictError):
            await manager.load("a", "a")
        with pytest.raises(AdapterPathError):
            await manager.load("d", tmp_path / "cli")  # outside the roots: only the command line may
        assert (await manager.load("cli", None, reload=True)).version == 2  # its own directory stays trusted
        pinned = await manager.load("b", "b", pinned=True)
        assert (pinned.state, pinned.pinned) == ("cpu", True)  # no free slot: stays in host memory
        with pytest.raises(PinLimitError):
            await manager.load("c", "c", pinned=True)  # 2 pins would leave no slot for the others
        gone = await manager.unload("a")
        assert gone.state == "unloaded" and "a" not in engine.active
        with pytest.raises(UnknownAdapterNameError):
            await manager.resolve("a")
        assert "a" not in {v.name for v in manager.views()}
        stats = manager.stats()
        assert (stats.loads, stats.reloads, stats.unloads) == (3, 2, 1)

    asyncio.run(scenario())


def test_a_request_runs_on_the_version_it_resolved(tmp_path: Path):
    root = tmp_path / "root"
    write(root / "a", 1)
    write(root / "a2", 2)
    manager = AdapterManager(FakeEngine(slots=4), AdapterRegistry(SHAPES, [root]), max_loaded=4)

    async def request() -> int:
        resolved = await manager.resolve("a")
        await asyncio.sleep(0.05)  # a reload commits meanwhile
        return (await manager.provide("a")).version if resolved else -1

    async def scenario() -> None:
        await manager.resolve("a")
        task = asyncio.create_task(request())
        await asyncio.sleep(0.01)
        await manager.load("a", "a2", reload=True)
        assert await task == 1  # the version it resolved (and reported), not the newer one
        assert (await manager.resolve("a")).version == (await manager.provide("a")).version == 2

    asyncio.run(scenario())
