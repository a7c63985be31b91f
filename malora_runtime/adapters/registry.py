"""Adapters known to the server, the host-memory tier, and safe loading from disk.

Tiers: disk (any adapter directory under a configured root, or registered by name), host memory (an
LRU of parsed, validated adapters, `max_cpu_adapters`), and the engine's slots (see
`engine/adapter_slots.py`). Reading and validating files happens here, in a worker thread, never on
the engine's step loop. Concurrent loads of one name share a single read.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..kernels.packed import pack_adapter
from . import load_adapter
from .convert import PEFT_CONFIG
from .errors import AdapterError, AdapterMemoryError, AdapterNotFoundError, UnknownAdapterError
from .format import CONFIG_FILE, MaloraAdapter
from .io import ModuleShapes
from .source_cache import SourceCache
from .sources import AdapterSource, RemoteRef, Store, open_store
from .unloaded import UnloadedRecord

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEFAULT_MAX_ADAPTER_BYTES = 1 << 30


class AdapterNameError(AdapterError):
    """The name has characters outside the safe set."""


class AdapterPathError(AdapterError):
    """The path resolves outside every configured adapter root."""


class AdapterTooLargeError(AdapterError):
    """The adapter's files exceed the configured size cap."""


class AdapterLimitError(AdapterError):
    """The adapter's N, r or d exceeds what this server accepts."""


@dataclass(frozen=True)
class AdapterLimits:
    """Upper bounds on what one adapter may ask of the server, checked when it is read (before activation)."""

    max_experts: int = 64
    max_rank: int = 256
    max_subspace_rank: int = 1024
    max_host_bytes: int = 4 << 30
    """Bytes of parsed adapters held in host memory and not in an engine slot (an LRU over them, like the
    count); adapters in slots have their own budget (the engine's `adapter_bank_memory`)."""

    def check(self, adapter: MaloraAdapter, source: Path) -> None:
        for kind, spec in adapter.config.modules.items():
            for label, value, limit, flag in (("N", spec.num_experts, self.max_experts, "--max-adapter-experts"),
                                              ("r", spec.r, self.max_rank, "--max-adapter-rank"),
                                              ("d", spec.d, self.max_subspace_rank, "--max-adapter-subspace-rank")):
                if value > limit:
                    raise AdapterLimitError(f"{source}: modules.{kind} has {label} = {value}, more than this "
                                            f"server accepts ({flag} {limit})")
        if adapter.num_bytes() > self.max_host_bytes:
            raise AdapterLimitError(f"{source}: {adapter.num_bytes()} bytes of weights, more than the host memory "
                                    f"budget for adapters (--max-cpu-adapter-bytes {self.max_host_bytes})")


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and ((path / CONFIG_FILE).is_file() or (path / PEFT_CONFIG).is_file())


@dataclass(eq=False)
class HostAdapter:
    """A parsed, validated adapter version held in host memory."""

    name: str
    version: int
    adapter: MaloraAdapter
    path: Path
    load_seconds: float
    pinned: bool = False
    remote: RemoteFetch | None = None  # where it came from, when a source's
    num_bytes: int = field(init=False)  # of its weights, counted once
    unloaded: bool = False  # set when the name is unloaded: requests that resolved it do not start

    def __post_init__(self) -> None:
        self.num_bytes = self.adapter.num_bytes()


@dataclass(frozen=True)
class RemoteFetch:
    """An adapter version fetched from a source: which, the version there, and the time listing and copying took."""

    ref: RemoteRef
    version: str
    seconds: float
    offline: bool = False  # the source was unreachable: the newest cached version


@dataclass
class RegistryCounters:
    loads: int = 0
    reloads: int = 0
    unloads: int = 0
    host_evictions: int = 0
    load_seconds: list[float] = field(default_factory=list)  # drained by the metrics layer


READ_NICENESS = 10


def _lower_thread_priority() -> None:
    """Run this thread (the adapter reader) below normal priority. The engine's OpenMP team keeps
    every core of a small machine busy while it steps; a read at equal priority takes a core from it
    and stalls each step it overlaps (inter-token latency p99 doubled with a reload every 200 ms on
    2 cores). Linux only (a thread id is a valid `setpriority` target there); elsewhere a no-op."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), READ_NICENESS)
    except (AttributeError, OSError) as exc:
        log.debug("adapter reads keep normal priority: %s", exc)


class AdapterRegistry:
    FAILED_READ_TTL = 5.0
    """Seconds a failed read of name@path is remembered: requests for a broken adapter re-raise its
    error meanwhile instead of reading the files again. An explicit `load` always reads."""

    def __init__(
        self,
        module_shapes: ModuleShapes,
        roots: list[Path] | None = None,
        max_cpu_adapters: int = 64,
        max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
        failed_read_ttl: float = FAILED_READ_TTL,
        limits: AdapterLimits | None = None,
        unloaded_record: UnloadedRecord | None = None,
        sources: list[AdapterSource] | None = None,
        source_cache: SourceCache | None = None,
        s3_endpoint_url: str | None = None,
    ) -> None:
        self.module_shapes = module_shapes
        self.roots = [Path(r).resolve() for r in (roots or [])]
        self.max_cpu_adapters = max_cpu_adapters
        self.max_adapter_bytes = max_adapter_bytes
        self.limits = limits or AdapterLimits()
        self._paths: dict[str, Path] = {}  # registered names (CLI, load API) -> directory
        # Adapter sources (s3://, hf://, https://), searched in order after the roots; their stores open on first use.
        self.sources = list(sources or [])
        self.source_cache = source_cache
        if self.sources and source_cache is None:
            raise ValueError("adapter sources need a source cache")
        self.s3_endpoint_url = s3_endpoint_url
        self._stores: dict[str, Store] = {}
        self._remote: dict[str, RemoteRef] = {}  # names served from a source -> where
        self.last_fetch: dict[str, RemoteFetch] = {}  # name -> its latest fetch (metrics, views)
        self._pinned: set[str] = set()
        # Unloaded names are not lazily found under the roots again, after a restart too when recorded.
        self._unloaded_record = unloaded_record
        self._unloaded: set[str] = unloaded_record.read() if unloaded_record is not None else set()
        self._host: OrderedDict[str, HostAdapter] = OrderedDict()
        # Whether an entry's adapter is in an engine slot (set by the manager): such entries count against the
        # slots' memory budget, not the host one, and evicting them here would free nothing.
        self.slot_versions: Callable[[], dict[str, int]] = dict  # name -> version in a slot now
        self._issued: dict[str, weakref.WeakSet[HostAdapter]] = {}  # every version read, while someone holds it
        self._versions: dict[str, int] = {}
        self.counters = RegistryCounters()
        self._inflight: dict[tuple[str, str | None], asyncio.Future[HostAdapter]] = {}
        self.failed_read_ttl = failed_read_ttl
        self._failed_reads: dict[str, tuple[Path, float, AdapterError]] = {}  # name -> (path, expiry, error)
        # Reads and validation run on one background thread below the engine's priority (see
        # `_lower_thread_priority`), never on the event loop or the engine thread.
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="malora-adapter-read",
                                          initializer=_lower_thread_priority)

    def close(self) -> None:
        """Stop the reader thread (reads already queued finish first)."""
        self._reader.shutdown(wait=False)

    # ---- names and paths ----
    @staticmethod
    def check_name(name: str) -> str:
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise AdapterNameError(
                f"invalid adapter name {name!r}: use letters, digits, '.', '_' or '-' (at most 128, not starting "
                "with '.', '_' or '-')"
            )
        return name

    def check_path(self, path: str | Path) -> Path:
        """Resolve `path` (symlinks included) and require it inside a configured root."""
        candidate = Path(path)
        if not candidate.is_absolute() and self.roots:
            candidate = self.roots[0] / candidate
        resolved = candidate.resolve()
        if not any(resolved == root or root in resolved.parents for root in self.roots):
            raise AdapterPathError(f"{path}: adapter paths must be inside an adapter root "
                                   f"({', '.join(map(str, self.roots)) or 'none configured'})")
        if not resolved.is_dir():
            raise AdapterNotFoundError(f"{path}: adapter directory not found")
        return resolved

    def discover(self) -> dict[str, Path]:
        """Every adapter available on disk: registered names plus adapter directories under the roots."""
        found: dict[str, Path] = {}
        for root in self.roots:
            if root.is_dir():
                for child in sorted(root.iterdir()):
                    if NAME_PATTERN.match(child.name) and child.name not in self._unloaded and is_adapter_dir(child):
                        found.setdefault(child.name, child.resolve())
        found.update(self._paths)
        return found

    def path_of(self, name: str) -> Path:
        self.check_name(name)
        if name in self._paths:
            return self._paths[name]
        if name in self._unloaded:
            raise UnknownAdapterError(f"adapter {name!r} was unloaded")
        for root in self.roots:
            candidate = root / name
            if is_adapter_dir(candidate):
                return self.check_path(candidate)
        raise UnknownAdapterError(f"adapter {name!r} does not exist")

    def remote_ref(self, name: str) -> RemoteRef | None:
        """Where a name served from a source lives (None: not one, or not fetched yet)."""
        return self._remote.get(name)

    def ref_for_url(self, url: str) -> RemoteRef:
        """The adapter a URL names: a directory directly under a declared source (nothing else is reachable)."""
        for source in self.sources:
            key = url.rstrip("/").removeprefix(source.url + "/")
            if url.startswith(source.url + "/") and NAME_PATTERN.match(key):
                return RemoteRef(source, key)
        raise AdapterPathError(f"{url}: adapter URLs must name a directory directly under an --adapter-source "
                               f"({', '.join(s.url for s in self.sources) or 'none declared'})")

    def forget(self, name: str) -> None:
        """Unload: the name is unknown from now on (until loaded again, as a new version)."""
        self._paths.pop(name, None)
        self._remote.pop(name, None)
        self.last_fetch.pop(name, None)
        self._mark_unloaded(name, True)
        self._host.pop(name, None)
        for entry in self._issued.pop(name, ()):  # versions requests may still hold, evicted from host memory too
            entry.unloaded = True
        self._pinned.discard(name)
        self.counters.unloads += 1

    def _mark_unloaded(self, name: str, unloaded: bool) -> None:
        if (name in self._unloaded) == unloaded:
            return
        if unloaded:
            self._unloaded.add(name)
        else:
            self._unloaded.discard(name)
        if self._unloaded_record is not None:
            self._unloaded_record.write(self._unloaded)

    # ---- queries and pins ----
    def is_loaded(self, name: str) -> bool:
        """Registered by a load, served from a source, or parsed in host memory."""
        return name in self._paths or name in self._host or name in self._remote

    def host_entry(self, name: str) -> HostAdapter | None:
        return self._host.get(name)

    def host_names(self) -> list[str]:
        """Adapters parsed in host memory, least recently used first."""
        return list(self._host)

    def version(self, name: str) -> int | None:
        """The current version of `name` (None before its first read)."""
        return self._versions.get(name)

    def registered_paths(self) -> dict[str, Path]:
        """Names registered by a load (command line or API) and their directories."""
        return dict(self._paths)

    def unloaded_names(self) -> set[str]:
        return set(self._unloaded)

    def pin(self, name: str) -> None:
        """Keep `name` in host memory (the host LRU never evicts it)."""
        self._pinned.add(name)

    def unpin(self, name: str) -> None:
        self._pinned.discard(name)

    def is_pinned(self, name: str) -> bool:
        return name in self._pinned

    @property
    def num_pinned(self) -> int:
        return len(self._pinned)

    def is_known(self, name: str) -> bool:
        if name in self._remote:
            return True
        try:
            self.path_of(name)
        except AdapterError:
            return False
        return True

    # ---- reading ----
    def _read(self, name: str, path: Path) -> MaloraAdapter:
        # lstat only (scandir without following): no symlink is followed out of the directory and no
        # FIFO or device is touched. The loader refuses those, and caps each file it reads as well.
        try:
            size = sum(e.stat(follow_symlinks=False).st_size for e in os.scandir(path)
                       if e.is_file(follow_symlinks=False))
        except OSError as exc:
            raise AdapterNotFoundError(f"{path}: adapter directory cannot be listed ({exc.strerror})") from None
        if size > self.max_adapter_bytes:
            raise AdapterTooLargeError(f"{path}: {size} bytes exceeds the cap of {self.max_adapter_bytes}")
        # Packed once, here, in the layout the kernels read: on the CPU a slot then reads it in place.
        adapter = pack_adapter(load_adapter(path, self.module_shapes, max_bytes=self.max_adapter_bytes))
        self.limits.check(adapter, path)
        return adapter

    async def fetch(self, name: str) -> HostAdapter:
        """The current version of `name` from host memory, read from disk or fetched from a source when absent (lazy
        loading)."""
        if name in self._host:
            self._host.move_to_end(name)
            return self._host[name]
        try:
            path = self.path_of(name)
        except UnknownAdapterError:
            if not self.sources or name in self._unloaded:
                raise
            refs = [self._remote[name]] if name in self._remote else [RemoteRef(s, name) for s in self.sources]
            failed = self._failed_reads.get(name)
            if failed is not None and failed[0] == Path(refs[0].url) and time.monotonic() < failed[1]:
                raise failed[2].with_traceback(None) from None
            return await self._single_flight((name, None), lambda: self._read_and_commit(name, refs, False))
        failed = self._failed_reads.get(name)
        if failed is not None and failed[0] == path and time.monotonic() < failed[1]:
            raise failed[2].with_traceback(None)  # the same error, without reading again
        return await self._single_flight((name, None), lambda: self._read_and_commit(name, path, new_version=False))

    async def load(self, name: str, path: str | Path, pinned: bool = False, trusted: bool = False) -> HostAdapter:
        """Load (or reload, as a new version) `name` from `path`. Nothing changes if the files are invalid."""
        self.check_name(name)
        resolved = Path(path).resolve() if trusted else self.check_path(path)
        if not resolved.is_dir():
            raise AdapterNotFoundError(f"{path}: adapter directory not found")
        entry = await self._single_flight((name, str(resolved)),
                                          lambda: self._read_and_commit(name, resolved, new_version=True))
        if pinned:
            self._pinned.add(name)
            entry.pinned = True
        return entry

    async def load_remote(self, name: str, ref: RemoteRef, pinned: bool = False) -> HostAdapter:
        """Load (or reload, as a new version) `name` from the newest version of `ref` in its source."""
        self.check_name(name)
        entry = await self._single_flight((name, ref.url), lambda: self._read_and_commit(name, [ref], True))
        if pinned:
            self._pinned.add(name)
            entry.pinned = True
        return entry

    def _store(self, source: AdapterSource) -> Store:
        if source.name not in self._stores:
            self._stores[source.name] = open_store(source, self.s3_endpoint_url)
        return self._stores[source.name]

    def _read_remote(self, name: str, refs: list[RemoteRef], new_version: bool
                     ) -> tuple[MaloraAdapter, Path, RemoteFetch]:
        """The newest version of the first of `refs` that has it, through the source cache (reader thread)."""
        assert self.source_cache is not None
        for ref in refs:
            try:
                fetched = self.source_cache.fetch(ref.source, self._store(ref.source), ref.key,
                                                  self.max_adapter_bytes, lambda path: self._read(name, path),
                                                  allow_cached=not new_version)
            except UnknownAdapterError:
                if len(refs) == 1:
                    raise
                continue
            return fetched.value, fetched.path, RemoteFetch(ref, fetched.version, fetched.seconds, fetched.offline)
        raise UnknownAdapterError(f"adapter {name!r} does not exist")

    async def _single_flight(self, key: tuple[str, str | None], work) -> HostAdapter:
        """One read per (name, path) at a time: concurrent callers share its result."""
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[HostAdapter] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            entry = await work()
            future.set_result(entry)
            return entry
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            self._inflight.pop(key, None)

    async def _read_and_commit(self, name: str, target: Path | list[RemoteRef], new_version: bool) -> HostAdapter:
        """Read `target` (a directory, or the refs of a source to fetch from) and commit it as `name`'s version."""
        version_at_start = self._versions.get(name)
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        remote: RemoteFetch | None = None
        try:
            if isinstance(target, Path):
                path = target
                adapter = await loop.run_in_executor(self._reader, self._read, name, path)
            else:
                adapter, path, remote = await loop.run_in_executor(self._reader, self._read_remote, name, target,
                                                                   new_version)
        except AdapterError as exc:
            if self._versions.get(name) == version_at_start:  # not when a load committed meanwhile
                self._remember_failure(name, target if isinstance(target, Path) else Path(target[0].url), exc)
            raise
        self._failed_reads.pop(name, None)
        elapsed = time.perf_counter() - started
        if not new_version and self._versions.get(name) != version_at_start and name in self._host:
            # A reload committed while this lazy read ran: its result is the current version, not ours.
            return self._host[name]
        if not new_version and name in self._unloaded:
            raise UnknownAdapterError(f"adapter {name!r} was unloaded")
        # Commit only after a successful read: a bad reload leaves the old version serving.
        self._make_room(name, adapter)
        version = self._versions.get(name)
        is_reload = new_version and (name in self._paths or name in self._host)
        if version is None or new_version:
            version = (version or 0) + 1
            self._versions[name] = version
        if new_version and remote is None:
            self._paths[name] = path
            self._remote.pop(name, None)
        if remote is not None:
            self._remote[name] = remote.ref
            self._paths.pop(name, None)
            self.last_fetch[name] = remote
        if new_version:
            self._mark_unloaded(name, False)
        entry = HostAdapter(name, version, adapter, path, elapsed, pinned=name in self._pinned, remote=remote)
        self._issued.setdefault(name, weakref.WeakSet()).add(entry)
        self._remember(entry)
        if is_reload:
            self.counters.reloads += 1
        else:
            self.counters.loads += 1
        self.counters.load_seconds.append(elapsed)
        log.info("read adapter %s v%d from %s in %.0f ms", name, version, path, elapsed * 1e3)
        return entry

    def _remember_failure(self, name: str, path: Path, error: AdapterError) -> None:
        now = time.monotonic()
        self._failed_reads = {n: f for n, f in self._failed_reads.items() if f[1] > now}  # drop expired ones
        self._failed_reads[name] = (path, now + self.failed_read_ttl, error)

    def _outside_slots(self) -> list[HostAdapter]:
        """Host entries whose version is not in an engine slot, least recently used first."""
        in_slots = self.slot_versions()
        return [e for e in self._host.values() if in_slots.get(e.name) != e.version]

    @property
    def host_bytes(self) -> int:
        """Bytes of the parsed adapters held in host memory and not in an engine slot."""
        return sum(entry.num_bytes for entry in self._outside_slots())

    @property
    def host_count(self) -> int:
        """Adapters held in host memory and not in an engine slot."""
        return len(self._outside_slots())

    def _make_room(self, name: str, adapter: MaloraAdapter) -> None:
        """Evict least recently used adapters (not pinned, not in a slot) until `adapter` fits the host tier's
        count and bytes; AdapterMemoryError, with nothing evicted, when pinned adapters leave it no room."""
        kept = [e for e in self._outside_slots() if e.name != name]
        pinned = [e for e in kept if e.name in self._pinned]
        pinned_bytes = sum(e.num_bytes for e in pinned)
        if pinned_bytes + adapter.num_bytes() > self.limits.max_host_bytes or len(pinned) + 1 > self.max_cpu_adapters:
            raise AdapterMemoryError(
                f"adapter {name!r} ({adapter.num_bytes() / 2**20:.1f} MiB) does not fit host memory for adapters: "
                f"{len(pinned)} pinned adapters hold {pinned_bytes / 2**20:.0f} MiB of the "
                f"{self.limits.max_host_bytes / 2**20:.0f} MiB (--max-cpu-adapter-bytes) and --max-cpu-adapters "
                f"{self.max_cpu_adapters}")
        count, total = len(kept), sum(e.num_bytes for e in kept)
        for victim in [e for e in kept if e.name not in self._pinned]:  # least recently used first
            if count + 1 <= self.max_cpu_adapters and total + adapter.num_bytes() <= self.limits.max_host_bytes:
                break
            del self._host[victim.name]
            self.counters.host_evictions += 1
            count, total = count - 1, total - victim.num_bytes
            log.info("adapter %s v%d left host memory (least recently used)", victim.name, victim.version)

    def _remember(self, entry: HostAdapter) -> None:
        """Keep `entry` as the most recently used (`_make_room` made room for it)."""
        self._host[entry.name] = entry
        self._host.move_to_end(entry.name)
