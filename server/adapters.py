"""The adapters the server knows about (named on the command line or found under the root) and their state.

States: `loaded` (in an engine slot, servable), `available` (known, not in a slot: loaded on first
use when a slot is free), `failed` (its directory did not load; `error` says why).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from malora_runtime.adapters.format import CONFIG_FILE, AdapterConfig, MaloraAdapter

from .engine_client import EngineClient

log = logging.getLogger(__name__)
PEFT_CONFIG_FILE = "adapter_config.json"
AdapterLoader = Callable[[Path], MaloraAdapter]


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and ((path / CONFIG_FILE).is_file() or (path / PEFT_CONFIG_FILE).is_file())


def discover(adapters: dict[str, Path], root: Path | None) -> dict[str, Path]:
    """Named adapters plus every adapter directory directly under `root` (named ones win)."""
    found: dict[str, Path] = {}
    if root is not None:
        if not root.is_dir():
            log.warning("adapter root %s does not exist; no adapters loaded from it", root)
        else:
            found.update({p.name: p for p in sorted(root.iterdir()) if is_adapter_dir(p)})
    found.update(adapters)
    return found


@dataclass
class AdapterEntry:
    name: str
    path: Path
    state: str = "available"
    config: AdapterConfig | None = None
    error: str | None = None


class AdapterCatalog:
    def __init__(self, engine: EngineClient, loader: AdapterLoader, max_loaded: int) -> None:
        self.engine = engine
        self.loader = loader
        self.max_loaded = max_loaded
        self.entries: dict[str, AdapterEntry] = {}
        self._lock = asyncio.Lock()

    async def load_all(self, paths: dict[str, Path], strict: bool = True) -> None:
        """Load each adapter while slots remain; the rest stay `available`. With `strict`, a bad one raises."""
        for name, path in paths.items():
            self.entries[name] = AdapterEntry(name, path)
            if self.num_loaded() < self.max_loaded:
                await self._load(self.entries[name], strict)

    def num_loaded(self) -> int:
        return sum(e.state == "loaded" for e in self.entries.values())

    def get(self, name: str) -> AdapterEntry | None:
        return self.entries.get(name)

    async def ensure_loaded(self, name: str) -> bool:
        """Load an `available` adapter on first use; False when no slot is free or it failed."""
        entry = self.entries[name]
        async with self._lock:
            if entry.state == "available" and self.num_loaded() < self.max_loaded:
                await self._load(entry, strict=False)
        return entry.state == "loaded"

    async def _load(self, entry: AdapterEntry, strict: bool) -> None:
        try:
            adapter = await asyncio.to_thread(self.loader, entry.path)
            await self.engine.add_adapter(entry.name, adapter)
        except (ValueError, OSError) as exc:  # AdapterError is a ValueError
            entry.state, entry.error = "failed", str(exc)
            log.error("adapter %s (%s) failed to load: %s", entry.name, entry.path, exc)
            if strict:
                raise
            return
        entry.state, entry.config, entry.error = "loaded", adapter.config, None
        log.info("adapter %s loaded from %s", entry.name, entry.path)
