"""The adapter lifecycle across three tiers: engine slots (`Tier.DEVICE`), host memory (`Tier.HOST`) and disk.

`AdapterManager` joins the registry (disk and host tiers: names, safe paths, single-flight reads, versions) to
an engine (slots: activation between steps, reference counts, LRU eviction, pins). The verbs: `resolve` (the
version a request runs on, read on first use), `load` (a new version, from a path), `unload`, and `pin`
through `load(pinned=...)`.

A request resolves its adapter here and hands that `HostAdapter` to the engine with the request: the version
it resolved is the one it runs on, which is the version a server reports to the client. A reload that commits
between a request's resolve and its admission leaves that request on the version it resolved; an unload in
between makes the request fail as unknown (`HostAdapter.unloaded`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

from ..engine.adapter_slots import NoFreeSlotError
from ..engine.outputs import EngineStats, ResidentAdapter
from .errors import AdapterError
from .format import AdapterConfig, MaloraAdapter
from .registry import AdapterPathError, AdapterRegistry, HostAdapter, RemoteFetch, UnknownAdapterError
from .sources import RemoteRef

log = logging.getLogger(__name__)


class Tier(Enum):
    """Where an adapter's current version is. The values are the names metrics use."""

    DEVICE = "device"  # in an engine slot
    HOST = "cpu"  # parsed and validated, in host memory
    DISK = "disk"  # known (registered, or under a root), read on first use


class AdapterConflictError(AdapterError):
    """A load names an adapter that is already loaded (reload it instead)."""


class PinLimitError(AdapterError):
    """Pinning would leave no slot for unpinned adapters."""


class AdapterEngine(Protocol):
    """What the manager needs of an engine (`AsyncEngine` has it; tests may pass a fake)."""

    async def add_adapter(self, name: str, adapter: MaloraAdapter, version: int = 0, pinned: bool = False) -> int:
        """Copy `adapter` into a slot between steps; NoFreeSlotError when every slot is busy."""
        ...

    async def remove_adapter(self, name: str) -> None: ...

    def resident_adapters(self) -> dict[str, ResidentAdapter]: ...

    def stats(self) -> EngineStats: ...


@dataclass
class AdapterView:
    """One adapter as clients see it."""

    name: str
    tier: Tier
    path: Path | None = None
    version: int | None = None
    slot: int | None = None
    pinned: bool = False
    config: AdapterConfig | None = None
    error: str | None = None  # its last read failed (it stays on disk)
    unloaded: bool = False  # only in the answer to an unload
    fetch: RemoteFetch | None = None  # its latest fetch, when it comes from a source


@dataclass
class AdapterStats:
    loads: int
    reloads: int
    unloads: int
    host_evictions: int
    slot_evictions: int
    waiting_for_adapter: int
    host_bytes: int  # of adapters in host memory and not in a slot
    host_budget: int  # --max-cpu-adapter-bytes
    slot_bytes: int  # of adapters in slots
    slot_budget: int | None  # --adapter-bank-memory


class AdapterManager:
    def __init__(self, engine: AdapterEngine, registry: AdapterRegistry, max_loaded: int) -> None:
        self.engine = engine
        self.registry = registry
        self.max_loaded = max_loaded
        self.trusted: dict[str, Path] = {}  # operator-given (command line) name -> directory, outside roots allowed
        self.failures: dict[str, str] = {}  # name -> error of its last failed read
        # Adapters in slots count against the slots' memory budget, not the host tier's.
        registry.slot_versions = lambda: {n: r.version for n, r in engine.resident_adapters().items()}

    # ---- start-up ----
    async def load_startup(self, adapters: dict[str, Path], pins: list[str]) -> None:
        """Read and validate the command line's adapters (raising on a bad one) and activate them while slots last."""
        self._check_pin_count(len(set(pins)))
        for name in pins:
            if name not in adapters and not self.registry.is_known(name):
                raise UnknownAdapterError(f"--pin {name}: no adapter of that name (give it with --adapter or "
                                              "put it under --adapter-root)")
        for name, path in adapters.items():
            self.trusted[name] = Path(path).resolve()
            await self.registry.load(name, path, pinned=name in pins, trusted=True)
        for name in pins:
            if name not in adapters:
                self.registry.pin(name)
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
        return host

    # ---- management ----
    async def load(self, name: str, path: str | Path | None, pinned: bool | None = None,
                   reload: bool = False) -> AdapterView:
        """Load `name` from `path` (a reload: a new version, `path` defaulting to the current one).

        The files are read and validated in a worker thread; only then is the version committed and
        copied into a slot between engine steps. A bad file raises and leaves the old version serving.
        """
        registry = self.registry
        registry.check_name(name)
        loaded = registry.is_loaded(name)
        if reload and not loaded and not registry.is_known(name):
            raise UnknownAdapterError(f"adapter {name!r} does not exist")
        if not reload and loaded:
            raise AdapterConflictError(f"adapter {name!r} is already loaded; reload it with PUT /v1/adapters/{name}")
        ref = self._remote_target(name, path)
        if ref is None:
            resolved, trusted = self._check_path(name, registry.path_of(name) if path is None else path)
        was_pinned = registry.is_pinned(name)
        if pinned and not was_pinned:
            self._check_pin_count(registry.num_pinned + 1)
        if pinned is False:
            registry.unpin(name)
        try:
            before = registry.version(name) or 0
            while True:  # a concurrent lazy read or a load of another path hands back its result: load again
                if ref is not None:  # the newest version in its source, always as a new version
                    host = await registry.load_remote(name, ref, pinned=bool(pinned))
                    break
                host = await registry.load(name, resolved, pinned=bool(pinned), trusted=trusted)
                if host.path == resolved and host.version > before:
                    break
        except BaseException:
            if was_pinned:
                registry.pin(name)
            raise
        self.failures.pop(name, None)
        await self._activate(host)
        return self.view(name)

    async def unload(self, name: str) -> AdapterView:
        """New requests for `name` get 404 at once; running ones finish on their version, then its slot frees."""
        self.registry.check_name(name)
        if not self.registry.is_known(name) and not self.registry.is_loaded(name):
            raise UnknownAdapterError(f"adapter {name!r} does not exist")
        view = self.view(name)
        self.registry.forget(name)
        self.trusted.pop(name, None)
        self.failures.pop(name, None)
        await self.engine.remove_adapter(name)
        view.unloaded, view.slot = True, None
        return view

    def _remote_target(self, name: str, path: str | Path | None) -> RemoteRef | None:
        """The source adapter a load means: a URL under a declared source, or (no path) the one `name` came from."""
        if path is None:
            return self.registry.remote_ref(name)
        if isinstance(path, str) and "://" in path:
            return self.registry.ref_for_url(path)
        return None

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

    # ---- views ----
    def public_message(self, message: str) -> str:
        """`message` with the server's adapter directories replaced by placeholders (for non-admin callers)."""
        known = {**self.registry.registered_paths(), **self.trusted}
        for name, path in sorted(known.items(), key=lambda item: -len(str(item[1]))):
            message = message.replace(str(path), f"<adapter {name}>")
        for root in self.registry.roots:
            message = message.replace(str(root), "<adapter root>")
        if self.registry.source_cache is not None:
            message = message.replace(str(self.registry.source_cache.root), "<adapter cache>")
        for source in self.registry.sources:  # bucket names and internal hosts stay with the operator
            message = message.replace(source.url, f"<source {source.name}>")
        return message

    def view(self, name: str, on_disk: dict[str, Path] | None = None,
             resident: dict[str, ResidentAdapter] | None = None) -> AdapterView:
        registry = self.registry
        host = registry.host_entry(name)
        in_slot = (self.engine.resident_adapters() if resident is None else resident).get(name)
        view = AdapterView(name, Tier.DISK, path=host.path if host else registry.registered_paths().get(name),
                           version=registry.version(name), pinned=registry.is_pinned(name))
        if view.path is None:
            view.path = (registry.discover() if on_disk is None else on_disk).get(name)
        if in_slot is not None:
            view.tier, view.slot, view.config = Tier.DEVICE, in_slot.slot, in_slot.config
        elif host is not None:
            view.tier = Tier.HOST
        elif name in self.failures:
            view.error = self.failures[name]
        if host is not None:
            view.config = host.adapter.config
        view.fetch = registry.last_fetch.get(name)
        return view

    def views(self) -> list[AdapterView]:
        """Every adapter: registered, under a root, in host memory, or failed (unloaded ones excepted)."""
        on_disk = self.registry.discover()
        resident = self.engine.resident_adapters()
        names = sorted({*on_disk, *self.registry.host_names(), *self.failures, *self.registry.last_fetch}
                       - self.registry.unloaded_names())
        return [self.view(n, on_disk, resident) for n in names]

    def tiers(self, on_disk: Iterable[str] | None = None) -> dict[str, Tier]:
        """The tier of every known adapter; `on_disk`: the names `registry.discover()` found (scanned now if None)."""
        disk = self.registry.discover() if on_disk is None else on_disk
        tiers = {name: Tier.DISK for name in [*disk, *self.registry.last_fetch]}
        tiers.update({name: Tier.HOST for name in self.registry.host_names()})
        tiers.update({name: Tier.DEVICE for name in self.engine.resident_adapters()})
        return tiers

    def is_known_model(self, name: str) -> bool:
        """Whether `name` names an adapter this manager serves (loaded or findable)."""
        return self.registry.is_loaded(name) or self.registry.is_known(name)

    def drain_load_seconds(self) -> list[float]:
        """Read times of the adapters read since the last call (for a latency histogram)."""
        counters = self.registry.counters
        seconds, counters.load_seconds = counters.load_seconds, []
        return seconds

    def close(self) -> None:
        """Stop the registry's reader thread (reads already queued finish first)."""
        self.registry.close()

    def stats(self) -> AdapterStats:
        counters = self.registry.counters
        engine = self.engine.stats()
        return AdapterStats(
            loads=counters.loads, reloads=counters.reloads, unloads=counters.unloads,
            host_evictions=counters.host_evictions, slot_evictions=engine.num_adapter_evictions,
            waiting_for_adapter=engine.num_waiting_for_adapter,
            host_bytes=self.registry.host_bytes, host_budget=self.registry.limits.max_host_bytes,
            slot_bytes=engine.adapter_slot_bytes, slot_budget=engine.adapter_slot_budget,
        )
