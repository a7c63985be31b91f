"""Adapter sources: object storage and model hubs next to local adapter roots.

A source is declared at start, `--adapter-source NAME=URL`, and acts like a root: adapter `x` under it is the
directory `URL/x/` (a MALoRA or PEFT adapter, flat). URLs:

- `s3://bucket/prefix` on AWS or any S3-compatible endpoint (`--s3-endpoint-url`), through s3fs; credentials from
  the environment, `~/.aws` files, an instance or pod role: botocore's own chain, never from the URL or our logs.
- `hf://org/repo[@revision][/subdir]` on the Hugging Face Hub, through huggingface_hub (its token, cache and
  offline mode: `HF_TOKEN`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE`).
- `https://host/path` (or `http://`), a plain directory listing (as `python -m http.server` serves), through
  fsspec's HTTP file system.

A `Store` answers two questions per adapter: which version is newest (its files, sizes and tags: S3 ETags, HTTP
ETags or sizes, the Hub's commit) and how to copy that version into a directory, with the byte cap enforced while
the bytes arrive. `cache.SourceCache` keeps the copies.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from .errors import AdapterError, UnknownAdapterError

log = logging.getLogger(__name__)

SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SCHEMES = ("s3", "hf", "https", "http")
CHUNK = 1 << 20
CONFIG_FILES = ("malora_config.json", "adapter_config.json")


class AdapterSourceError(AdapterError):
    """A source could not answer (unreachable, refused, offline without a cached copy); names source and reason."""


class AdapterTransferError(AdapterError):
    """A download was cut short, grew past the cap, or changed while it was read."""


@dataclass(frozen=True)
class AdapterSource:
    name: str
    url: str  # without a trailing slash

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0]

    def __str__(self) -> str:
        return f"{self.name} ({self.url})"


@dataclass(frozen=True)
class RemoteRef:
    """An adapter in a source: the directory `key` directly under the source's URL."""

    source: AdapterSource
    key: str

    @property
    def url(self) -> str:
        return f"{self.source.url}/{self.key}"


def parse_source(spec: str) -> AdapterSource:
    """`NAME=URL` of `--adapter-source`; ValueError naming what is wrong."""
    name, sep, url = spec.partition("=")
    if not sep or not SOURCE_NAME.match(name):
        raise ValueError(f"--adapter-source {spec!r}: give NAME=URL, NAME of letters, digits, '_' or '-'")
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"--adapter-source {name}: the URL must start with one of "
                         f"{', '.join(s + '://' for s in SCHEMES)}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"--adapter-source {name}: no credentials, query or fragment in the URL (credentials come "
                         "from the environment or the usual config files)")
    if not parts.netloc:
        raise ValueError(f"--adapter-source {name}: the URL has no bucket, repository or host")
    if parts.scheme == "hf" and len(url.removeprefix("hf://").split("/")) < 2:
        raise ValueError(f"--adapter-source {name}: hf:// URLs are hf://org/repo[@revision][/subdir]")
    return AdapterSource(name, url.rstrip("/"))


@dataclass(frozen=True)
class RemoteFile:
    name: str  # inside the adapter's directory
    size: int | None
    tag: str  # what changes when the file does (ETag, commit, size)
    location: str = field(compare=False, default="")  # where the store reads it


@dataclass(frozen=True)
class RemoteVersion:
    """The newest version of one adapter in a source: `key` names it in the cache."""

    files: tuple[RemoteFile, ...]
    key: str

    @property
    def size(self) -> int | None:
        sizes = [f.size for f in self.files]
        return None if any(s is None for s in sizes) else sum(sizes)  # type: ignore[arg-type]

    @staticmethod
    def of(files: list[RemoteFile]) -> RemoteVersion:
        digest = hashlib.sha256("\n".join(f"{f.name}\t{f.size}\t{f.tag}" for f in sorted(files, key=lambda f: f.name))
                                .encode()).hexdigest()[:16]
        return RemoteVersion(tuple(sorted(files, key=lambda f: f.name)), digest)


class Store(Protocol):
    def latest(self, name: str) -> RemoteVersion:
        """UnknownAdapterError when the source has no adapter `name`; AdapterSourceError when it cannot say."""
        ...

    def download(self, name: str, version: RemoteVersion, into: Path, max_bytes: int) -> None:
        """Write the version's files into `into`, at most `max_bytes` in all (counted as they arrive)."""
        ...


def _check_files(source: AdapterSource, name: str, files: list[RemoteFile]) -> list[RemoteFile]:
    files = [f for f in files if FILE_NAME.match(f.name)]
    if not any(f.name in CONFIG_FILES for f in files):
        raise UnknownAdapterError(f"adapter {name!r} does not exist in source {source}")
    return files


def copy_stream(read, out_path: Path, budget: int, expected: int | None, what: str) -> int:
    """Copy `read(n)` chunks into `out_path`; the bytes written. Raises once `budget` would be passed, or when the
    length differs from `expected` (cut short, or changed since it was listed)."""
    written = 0
    with open(out_path, "wb") as out:
        while chunk := read(CHUNK):
            written += len(chunk)
            if written > budget:
                raise AdapterTransferError(f"{what}: more bytes than the cap allows (stopped after {written})")
            out.write(chunk)
    if expected is not None and written != expected:
        raise AdapterTransferError(f"{what}: {written} bytes arrived, {expected} were listed (cut short or "
                                   "changed during the transfer)")
    return written


class FsspecStore:
    """s3:// (s3fs) and http(s):// (fsspec's HTTP file system): list the adapter's directory, stream its files."""

    def __init__(self, source: AdapterSource, s3_endpoint_url: str | None = None, fs: Any = None) -> None:
        self.source = source
        self.root = source.url.removeprefix("s3://") if source.scheme == "s3" else source.url
        if fs is not None:
            self.fs = fs
        elif source.scheme == "s3":
            import s3fs

            kwargs: dict[str, Any] = {"client_kwargs": {"endpoint_url": s3_endpoint_url}} if s3_endpoint_url else {}
            self.fs = s3fs.S3FileSystem(**kwargs)
        else:
            import fsspec

            self.fs = fsspec.filesystem(source.scheme)

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AdapterError:
            raise
        except FileNotFoundError:  # listed a moment ago: deleted or replaced since
            raise AdapterTransferError(f"source {self.source}: {what}: the object is gone since it was listed; "
                                       "try again") from None
        except OSError as exc:
            if type(exc).__name__ != "FileExpired":  # s3fs reads with If-Match on the listed ETag
                raise AdapterSourceError(f"source {self.source}: {what} failed: {type(exc).__name__}: "
                                         f"{_first_line(exc)}") from None
            raise AdapterTransferError(f"source {self.source}: {what}: the object changed during the transfer; "
                                       "try again") from None
        except Exception as exc:  # network, credentials, permissions: say which source and why, nothing more
            raise AdapterSourceError(f"source {self.source}: {what} failed: {type(exc).__name__}: "
                                     f"{_first_line(exc)}") from None

    def latest(self, name: str) -> RemoteVersion:
        directory = f"{self.root}/{name}"
        self.fs.invalidate_cache(directory)
        try:
            entries = self.fs.ls(directory + "/", detail=True)
        except FileNotFoundError:
            raise UnknownAdapterError(f"adapter {name!r} does not exist in source {self.source}") from None
        except Exception as exc:  # network, credentials, permissions: say which source and why, nothing more
            raise AdapterSourceError(f"source {self.source}: listing {name!r} failed: {type(exc).__name__}: "
                                     f"{_first_line(exc)}") from None
        files = []
        for entry in entries:
            if entry.get("type") != "file":
                continue
            location = entry["name"]
            basename = location.rstrip("/").rsplit("/", 1)[-1]
            size = entry.get("size")
            tag = entry.get("ETag") or entry.get("etag") or entry.get("LastModified") or ""
            if self.source.scheme != "s3" and FILE_NAME.match(basename):
                info = self._call(f"reading {basename!r} of {name!r}", self.fs.info, location)
                size = info.get("size", size)
                tag = info.get("ETag") or info.get("etag") or info.get("Last-Modified") or tag
            files.append(RemoteFile(basename, size, str(tag), location))
        return RemoteVersion.of(_check_files(self.source, name, files))

    def download(self, name: str, version: RemoteVersion, into: Path, max_bytes: int) -> None:
        budget = max_bytes
        for f in version.files:
            what = f"source {self.source}: {name}/{f.name}"
            with self._call(f"opening {name}/{f.name}", self.fs.open, f.location, "rb", block_size=CHUNK) as stream:
                budget -= self._call(f"reading {name}/{f.name}", copy_stream, stream.read, into / f.name, budget,
                                     f.size, what)


class HubStore:
    """hf://org/repo[@revision][/subdir] through huggingface_hub (its token, cache and offline mode). Online, the
    adapter's directory is listed first (its files directly in it, their sizes and blob ids: the version), so the
    byte cap holds before anything is downloaded and nested files are never fetched; then exactly those files are
    downloaded. Offline (HF_HUB_OFFLINE), the Hub's cache answers: the version is the cached commit's."""

    def __init__(self, source: AdapterSource, api: Any = None) -> None:
        self.source = source
        rest = source.url.removeprefix("hf://").split("/")
        repo = "/".join(rest[:2])
        self.subdir = "/".join(rest[2:])
        self.repo_id, _, revision = repo.partition("@")
        self.revision = revision or None
        self._api = api

    def _path(self, name: str) -> str:
        return f"{self.subdir}/{name}" if self.subdir else name

    @staticmethod
    def _offline() -> bool:  # the environment read now, not at import: as the operator set it
        return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")

    def _snapshot(self, patterns: list[str], offline: bool) -> Path:
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(self.repo_id, revision=self.revision, allow_patterns=patterns,
                                          cache_dir=os.environ.get("HF_HUB_CACHE") or None, local_files_only=offline))
        except Exception as exc:  # offline without it cached, no such repo or revision, refused
            raise AdapterSourceError(f"source {self.source}: {type(exc).__name__}: {_first_line(exc)}") from None

    def latest(self, name: str) -> RemoteVersion:
        if not self._offline():
            return RemoteVersion.of(_check_files(self.source, name, self._listed(name)))
        snapshot = self._snapshot([f"{self._path(name)}/*"], offline=True)  # no transfer: the cache only
        commit = snapshot.name
        files = [RemoteFile(p.name, p.stat().st_size, commit, str(p)) for p in _files(snapshot / self._path(name))]
        version = RemoteVersion.of(_check_files(self.source, name, files))
        return RemoteVersion(version.files, f"{commit[:12]}-{version.key}")

    def _listed(self, name: str) -> list[RemoteFile]:
        from huggingface_hub import HfApi

        api = self._api or HfApi()
        try:
            entries = list(api.list_repo_tree(self.repo_id, path_in_repo=self._path(name), recursive=False,
                                              revision=self.revision))
        except Exception as exc:
            if "EntryNotFound" in type(exc).__name__:
                raise UnknownAdapterError(f"adapter {name!r} does not exist in source {self.source}") from None
            raise AdapterSourceError(f"source {self.source}: listing {name!r} failed: {type(exc).__name__}: "
                                     f"{_first_line(exc)}") from None
        return [RemoteFile(e.path.rsplit("/", 1)[-1], e.size, str(e.blob_id), e.path) for e in entries
                if getattr(e, "size", None) is not None]  # files (folders have no size)

    def download(self, name: str, version: RemoteVersion, into: Path, max_bytes: int) -> None:
        if version.files and not Path(version.files[0].location).is_absolute():  # listed online: fetch exactly these
            snapshot = self._snapshot([f.location for f in version.files], offline=False)
            version = RemoteVersion(tuple(RemoteFile(f.name, f.size, f.tag, str(snapshot / f.location))
                                          for f in version.files), version.key)
        budget = max_bytes
        for f in version.files:
            with open(f.location, "rb") as stream:
                budget -= copy_stream(stream.read, into / f.name, budget, f.size, f"source {self.source}: {name}")


def _files(directory: Path) -> Iterator[Path]:
    if directory.is_dir():
        yield from (p for p in sorted(directory.iterdir()) if p.is_file())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def open_store(source: AdapterSource, s3_endpoint_url: str | None = None) -> Store:
    if source.scheme == "hf":
        return HubStore(source)
    return FsspecStore(source, s3_endpoint_url)

