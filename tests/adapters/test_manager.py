"""The adapter manager's tiers and rules with a fake engine (no model): disk, host, device, failed, pins."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from malora_runtime.adapters import save_adapter
from malora_runtime.adapters.init import random_adapter
from malora_runtime.adapters.manager import AdapterConflictError, AdapterManager, PinLimitError, Tier
from malora_runtime.adapters.registry import AdapterPathError, AdapterRegistry, UnknownAdapterError
from malora_runtime.engine.adapter_slots import NoFreeSlotError
from malora_runtime.engine.outputs import EngineStats, ResidentAdapter
from malora_runtime.patching import linear_shapes
from tests.conftest import make_tiny_llama

SHAPES = linear_shapes(make_tiny_llama())


class FakeEngine:
    """The `AdapterEngine` interface over a list of slots; no eviction."""

    def __init__(self, slots: int) -> None:
        self.slots: list[tuple[str, int, object] | None] = [None] * slots
        self.active: dict[str, int] = {}

    async def add_adapter(self, name, adapter, version=0, pinned=False) -> int:
        slot = self.active.get(name)
        if slot is None:
            free = [i for i, s in enumerate(self.slots) if s is None]
            if not free:
                raise NoFreeSlotError("full")
            slot = free[0]
        self.slots[slot] = (name, version, adapter)
        self.active[name] = slot
        return slot

    async def remove_adapter(self, name: str) -> None:
        slot = self.active.pop(name, None)
        if slot is not None:
            self.slots[slot] = None

    def resident_adapters(self) -> dict[str, ResidentAdapter]:
        return {name: ResidentAdapter(name, self.slots[slot][1], slot, self.slots[slot][2].config, False)
                for name, slot in self.active.items()}

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 1, 0, 0, 0.0, num_adapter_evictions=0, num_waiting_for_adapter=0)


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

    async def scenario() -> None:
        await manager.load_startup({"cli": cli}, pins=[])
        tiers = {v.name: v.tier for v in manager.views()}
        assert tiers == {"a": Tier.DISK, "b": Tier.DISK, "c": Tier.DISK, "broken": Tier.DISK, "cli": Tier.DEVICE}
        assert manager.tiers() == tiers
        host = await manager.resolve("a")  # lazy: read on first use
        assert host.version == 1 and await manager.resolve("a") is host and manager.view("a").tier is Tier.HOST
        with pytest.raises(ValueError, match="invalid JSON"):
            await manager.resolve("broken")
        broken = manager.view("broken")
        assert broken.tier is Tier.DISK and "invalid JSON" in broken.error
        view = await manager.load("a", "versions/a2", reload=True)  # relative to the first root
        assert (view.version, view.tier, view.path) == (2, Tier.DEVICE, (root / "versions" / "a2").resolve())
        assert not host.unloaded and host.version == 1  # what a request holds is its own version
        with pytest.raises(AdapterConflictError):
            await manager.load("a", "a")
        with pytest.raises(AdapterPathError):
            await manager.load("d", tmp_path / "cli")  # outside the roots: only the command line may
        assert (await manager.load("cli", None, reload=True)).version == 2  # its own directory stays trusted
        pinned = await manager.load("b", "b", pinned=True)
        assert (pinned.tier, pinned.pinned) == (Tier.HOST, True)  # no free slot: stays in host memory
        with pytest.raises(PinLimitError):
            await manager.load("c", "c", pinned=True)  # 2 pins would leave no slot for the others
        held = await manager.resolve("a")
        gone = await manager.unload("a")
        assert gone.unloaded and "a" not in engine.active
        assert held.unloaded and host.unloaded  # requests that resolved it will not start
        with pytest.raises(UnknownAdapterError):
            await manager.resolve("a")
        assert "a" not in {v.name for v in manager.views()}
        stats = manager.stats()
        assert (stats.loads, stats.reloads, stats.unloads) == (3, 2, 1)

    asyncio.run(scenario())
