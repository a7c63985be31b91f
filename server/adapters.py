"""The adapters the server serves, across three tiers: engine slots, host memory and disk.

`AdapterManager` joins the registry (disk and host tiers: names, safe paths, single-flight reads,
versions) to the engine (slots: activation between steps, reference counts, LRU eviction, pins).
States shown to clients: `loaded` (its current version sits in an engine slot), `cpu` (parsed in
host memory), `disk` (known, read on first use), `failed` (the last read of it failed).

A request resolves its adapter here before it is admitted: the version resolved is the one it runs
on (the engine asks `provide`, which hands back exactly that version), so the version the server
reports in `x-malora-adapter-version` is the one that produced the output. A reload that commits
between a request's resolve and its admission (a few microseconds on the event loop) leaves that
request on the version it resolved; the next request re-activates the newer one.
"""

from __future__ import annotations

import contextvars
import logging
from dataclasses import dataclass
from pathlib import Path

from malora_runtime.adapters.errors import AdapterError
from malora_runtime.adapters.format import AdapterConfig
from malora_runtime.adapters.registry import AdapterPathError, AdapterRegistry, HostAdapter, UnknownAdapterNameError
from malora_runtime.engine.adapter_slots import NoFreeSlotError

from .engine_client import EngineClient

log = logging.getLogger(__name__)

# The adapter version the current request resolved (set per request task, read by `provide`).
_resolved: contextvars.ContextVar[HostAdapter | None] = contextvars.ContextVar("malora_resolved", default=None)


class AdapterConflictError(AdapterError):
    """A load names an adapter that is already loaded (reload it instead)."""


class PinLimitError(AdapterError):
    """Pinning would leave no slot for unpinned adapters."""


@dataclass
class AdapterView:
    """One adapter as clients see it."""

    name: str
    state: str  # loaded | cpu | disk | failed | unloaded
    path: Path | None = None
    version: int | None = None
    slot: int | None = None
    pinned: bool = False
    config: AdapterConfig | None = None
    error: str | None = None


@dataclass
class AdapterStats:
    loads: int
    reloads: int
    unloads: int
    host_evictions: int
    slot_evictions: int
    waiting_for_adapter: int


def _slots(engine: EngineClient | None):
    """The engine's device tier (`AdapterSlots`), or None for an engine without one (test fakes)."""
    runner = getattr(getattr(engine, "engine", None), "runner", None)
    return getattr(runner, "adapters", None)


class AdapterManager:
    def __init__(self, engine: EngineClient, registry: AdapterRegistry, max_loaded: int) -> None:
        self.engine = engine
        self.registry = registry
        self.max_loaded = max_loaded
        self.trusted: dict[str, Path] = {}  # operator-given (command line) name -> directory, outside roots allowed
        self.failures: dict[str, str] = {}  # name -> error of its last failed read
        engine.adapter_provider = self.provide

    # ---- start-up ----
    async def load_startup(self, adapters: dict[str, Path], pins: list[str]) -> None:
        """Read and validate the command line's adapters (raising on a bad one) and activate them while slots last."""
        self._check_pin_count(len(set(pins)))
        for name in pins:
            if name not in adapters and not self.registry.is_known(name):
                raise UnknownAdapterNameError(f"--pin {name}: no adapter of that name (give it with --adapter or "
                                              "put it under --adapter-root)")
        for name, path in adapters.items():
            self.trusted[name] = Path(path).resolve()
            await self.registry.load(name, path, pinned=name in pins, trusted=True)
        for name in pins:
            if name not in adapters:
                self.registry.pinned.add(name)
                await self.registry.fetch(name)
        order = [*pins, *(n for n in adapters if n not in pins)]
        for name in order[:self.max_loaded]:
            await self._activate(await self.registry.fetch(name))

    # ---- requests ----
    async def resolve(self, name: str) -> HostAdapter:
        """The current version of `name`, read from disk if needed; the request will run on exactly it."""
        try:
            host = await self.registry.fetch(name)
        except AdapterError as exc:
            if self.registry.is_known(name):
                self.failures[name] = str(exc)
                log.error("adapter %s failed to load: %s", name, exc)
            raise
        self.failures.pop(name, None)
        _resolved.set(host)
        return host

    async def provide(self, name: str) -> HostAdapter:
        """The engine's adapter provider: the version this request resolved, unless unloaded since."""
        host = _resolved.get()
        if host is None or host.name != name:
            return await self.registry.fetch(name)
        if name in self.registry.unloaded:
            raise UnknownAdapterNameError(f"adapter {name!r} was unloaded")
        return host

    # ---- management ----
    async def load(self, name: str, path: str | Path | None, pinned: bool | None = None,
                   reload: bool = False) -> AdapterView:
        """Load `name` from `path` (a reload: a new version, `path` defaulting to the current one).

        The files are read and validated in a worker thread; only then is the version committed and
        copied into a slot between engine steps. A bad file raises and leaves the old version serving.
        """
        self.registry.check_name(name)
        loaded = name in self.registry.paths or name in self.registry.host
        if reload and not loaded and not self.registry.is_known(name):
            raise UnknownAdapterNameError(f"adapter {name!r} does not exist")
        if not reload and loaded:
            raise AdapterConflictError(f"adapter {name!r} is already loaded; reload it with PUT /v1/adapters/{name}")
        if path is None:
            path = self.registry.path_of(name)
        resolved, trusted = self._check_path(name, path)
        was_pinned = name in self.registry.pinned
        if pinned and not was_pinned:
            self._check_pin_count(len(self.registry.pinned) + 1)
        if pinned is False:
            self.registry.pinned.discard(name)
        try:
            before = self.registry.versions.get(name, 0)
            while True:  # a concurrent lazy read or a load of another path hands back its result: load again
                host = await self.registry.load(name, resolved, pinned=bool(pinned), trusted=trusted)
                if host.path == resolved and host.version > before:
                    break
        except BaseException:
            if was_pinned:
                self.registry.pinned.add(name)
            raise
        self.failures.pop(name, None)
        await self._activate(host)
        return self.view(name)

    async def unload(self, name: str) -> AdapterView:
        """New requests for `name` get 404 at once; running ones finish on their version, then its slot frees."""
        self.registry.check_name(name)
        if not self.registry.is_known(name) and name not in self.registry.host:
            raise UnknownAdapterNameError(f"adapter {name!r} does not exist")
        view = self.view(name)
        self.registry.forget(name)
        self.trusted.pop(name, None)
        self.failures.pop(name, None)
        await self.engine.remove_adapter(name)
        view.state, view.slot = "unloaded", None
        return view

    def _check_path(self, name: str, path: str | Path) -> tuple[Path, bool]:
        """(resolved directory, trusted): the command line's own directory of `name` is trusted, all else must
        resolve inside a root."""
        candidate = Path(path)
        if candidate.is_absolute() and candidate.resolve() == self.trusted.get(name):
            return self.trusted[name], True
        if not self.registry.roots:
            raise AdapterPathError("runtime loads are disabled: no --adapter-root is configured, and adapter "
                                   "paths must resolve inside one")
        return self.registry.check_path(candidate), False

    def _check_pin_count(self, count: int) -> None:
        if count >= self.max_loaded:
            raise PinLimitError(f"{count} pinned adapter(s) would leave no slot of --max-loaded-adapters "
                                f"{self.max_loaded} for the others")

    async def _activate(self, host: HostAdapter) -> None:
        """Copy `host` into a slot now (between steps); with every slot busy it stays in host memory."""
        try:
            await self.engine.add_adapter(host.name, host.adapter, host.version, host.pinned)
        except NoFreeSlotError:
            log.info("adapter %s v%d stays in host memory: every slot is busy", host.name, host.version)

    def public_message(self, message: str) -> str:
        """`message` with the server's adapter directories replaced by placeholders (for non-admin callers)."""
        for name, path in sorted({**self.registry.paths, **self.trusted}.items(), key=lambda item: -len(str(item[1]))):
            message = message.replace(str(path), f"<adapter {name}>")
        for root in self.registry.roots:
            message = message.replace(str(root), "<adapter root>")
        return message

    # ---- views ----
    def view(self, name: str, on_disk: dict[str, Path] | None = None) -> AdapterView:
        registry = self.registry
        host = registry.host.get(name)
        slots = _slots(self.engine)
        slot = slots.current.get(name) if slots is not None else None
        state = slots.slots[slot] if slot is not None else None
        view = AdapterView(name, "disk", path=host.path if host else registry.paths.get(name),
                           version=registry.versions.get(name), pinned=name in registry.pinned)
        if view.path is None:
            view.path = (registry.discover() if on_disk is None else on_disk).get(name)
        if state is not None:
            view.state, view.slot, view.config = "loaded", slot, state.adapter.config
        elif host is not None:
            view.state = "cpu"
        elif name in self.failures:
            view.state, view.error = "failed", self.failures[name]
        if host is not None:
            view.config = host.adapter.config
        return view

    def views(self) -> list[AdapterView]:
        """Every adapter: registered, under a root, in host memory, or failed (unloaded ones excepted)."""
        on_disk = self.registry.discover()
        names = sorted({*on_disk, *self.registry.host, *self.failures} - self.registry.unloaded)
        return [self.view(n, on_disk) for n in names]

    def stats(self) -> AdapterStats:
        counters = self.registry.counters
        slots = _slots(self.engine)
        return AdapterStats(
            loads=counters.loads, reloads=counters.reloads, unloads=counters.unloads,
            host_evictions=counters.host_evictions, slot_evictions=slots.num_evictions if slots is not None else 0,
            waiting_for_adapter=getattr(self.engine, "num_waiting_for_adapter", 0),
        )
