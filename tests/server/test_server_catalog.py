"""The adapter catalog's states with a fake engine: loaded, available (no free slot), failed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

from server.adapters import AdapterCatalog


class FakeEngine:
    def __init__(self) -> None:
        self.added: list[str] = []

    async def add_adapter(self, name: str, adapter) -> int:
        self.added.append(name)
        return len(self.added) - 1


def fake_loader(path: Path):
    if path.name == "broken":
        raise ValueError(f"{path}: malora_config.json is missing")
    return SimpleNamespace(config=SimpleNamespace(name=path.name))


def test_states():
    engine = FakeEngine()
    catalog = AdapterCatalog(engine, fake_loader, max_loaded=2)
    paths = {name: Path("/adapters") / name for name in ("a", "broken", "b", "c")}

    async def scenario() -> None:
        await catalog.load_all(paths, strict=False)
        assert {n: e.state for n, e in catalog.entries.items()} == {
            "a": "loaded", "broken": "failed", "b": "loaded", "c": "available"}
        assert "missing" in catalog.get("broken").error
        assert await catalog.ensure_loaded("c") is False  # both slots taken
        catalog.max_loaded = 3
        assert await catalog.ensure_loaded("c") is True
        assert engine.added == ["a", "b", "c"]

    asyncio.run(scenario())
