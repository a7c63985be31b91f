"""The local cache of adapters from sources: `$MALORA_CACHE/adapters/<source>/<adapter>/<version>/`.

A version is downloaded into a hidden temporary sibling, size-capped before (the listed sizes) and during the
transfer (the bytes that arrive), read and validated there exactly as a local adapter is, and only then renamed
into place: a failed, partial or invalid download is never visible, and the name keeps its cached versions.
Concurrent fetches of one adapter share one download (a lock per adapter). Versions are evicted least recently
used first (a directory's mtime marks its last use) once the cache passes its byte budget. Without the network
the newest cached version of a name keeps serving; an uncached one fails naming the source and the reason.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from .errors import AdapterError
from .sources import AdapterSource, AdapterSourceError, RemoteVersion, Store

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_CACHE_BYTES = 10 << 30
LOCK_STRIPES = 64


class AdapterTooLargeForCacheError(AdapterError):
    """The adapter's listed size exceeds the cap on one adapter."""


@dataclass(frozen=True)
class Fetched(Generic[T]):
    path: Path  # the cached version's directory
    version: str
    seconds: float  # listing and (when not cached) downloading and validating
    value: T  # what `read` returned for it
    downloaded: bool
    offline: bool = False  # the source could not be reached: the newest cached version


class SourceCache:
    def __init__(self, root: Path, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.root = root
        self.max_bytes = max_bytes
        # Striped, not one per name: names come from clients, and a lock per name made up would never go away.
        self._locks = [threading.Lock() for _ in range(LOCK_STRIPES)]

    def _lock(self, source: AdapterSource, name: str) -> threading.Lock:
        return self._locks[hash((source.name, name)) % LOCK_STRIPES]

    def directory(self, source: AdapterSource, name: str) -> Path:
        return self.root / source.name / name

    def fetch(self, source: AdapterSource, store: Store, name: str, max_bytes: int,
              read: Callable[[Path], T], allow_cached: bool = True) -> Fetched[T]:
        """The newest version of `name` in `source`, cached; `read` parses and validates a version's directory
        (it runs on a download before the download becomes visible, and on a cached copy when it is used). When
        the source cannot be reached, the newest cached version if `allow_cached` (a lazy load; an explicit reload
        must not pass off an old version as the newest)."""
        started = time.perf_counter()
        with self._lock(source, name):
            try:
                version = store.latest(name)
            except AdapterSourceError as exc:
                cached = self._newest(source, name) if allow_cached else None
                if cached is None:
                    raise
                log.warning("%s; serving the cached version %s of %s", exc, cached.name, name)
                os.utime(cached)  # in use: not the first the LRU deletes
                return Fetched(cached, cached.name, time.perf_counter() - started, read(cached), False, True)
            target = self.directory(source, name) / version.key
            if target.is_dir():
                os.utime(target)  # its last use, for the LRU
                return Fetched(target, version.key, time.perf_counter() - started, read(target), False)
            value = self._download(source, store, name, version, target, max_bytes, read)
            seconds = time.perf_counter() - started
        log.info("fetched adapter %s version %s from source %s in %.0f ms", name, version.key, source.name,
                 seconds * 1e3)
        self.evict(keep=target)
        return Fetched(target, version.key, seconds, value, True)

    def _download(self, source: AdapterSource, store: Store, name: str, version: RemoteVersion, target: Path,
                  max_bytes: int, read: Callable[[Path], T]) -> T:
        listed = version.size
        if listed is not None and listed > max_bytes:
            raise AdapterTooLargeForCacheError(f"adapter {name!r} in source {source}: {listed} bytes exceeds the "
                                               f"cap of {max_bytes}")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{version.key}.tmp-{secrets.token_hex(6)}"
        staging.mkdir()
        try:
            store.download(name, version, staging, max_bytes)
            value = read(staging)  # validated before anyone can see it
            os.rename(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return value

    def _newest(self, source: AdapterSource, name: str) -> Path | None:
        directory = self.directory(source, name)
        if not directory.is_dir():
            return None
        versions = [p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return max(versions, key=lambda p: p.stat().st_mtime, default=None)

    def versions(self) -> list[tuple[Path, int, float]]:
        """(directory, bytes, last use) of every cached version."""
        found = []
        if self.root.is_dir():
            for version in self.root.glob("*/*/*"):
                try:
                    if version.is_dir() and not version.name.startswith("."):
                        size = sum(f.stat().st_size for f in version.iterdir() if f.is_file())
                        found.append((version, size, version.stat().st_mtime))
                except OSError:  # renamed away by an eviction meanwhile
                    continue
        return found

    @property
    def num_bytes(self) -> int:
        return sum(size for _, size, _ in self.versions())

    def evict(self, keep: Path | None = None) -> None:
        """Delete least recently used versions until the cache fits its budget (never `keep`)."""
        versions = sorted(self.versions(), key=lambda v: v[2])
        total = sum(size for _, size, _ in versions)
        for path, size, _ in versions:
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            aside = path.parent / f".{path.name}.evicted-{secrets.token_hex(6)}"
            try:
                os.rename(path, aside)  # gone from view at once, then deleted
            except OSError:
                continue
            shutil.rmtree(aside, ignore_errors=True)
            total -= size
            log.info("adapter cache: evicted %s (%d bytes, least recently used)", path, size)
