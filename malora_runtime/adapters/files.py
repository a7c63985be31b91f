"""Safe file handling for adapter directories: what a reader may open, and how writers replace a directory.

Every file a reader opens is checked first (a regular file, or a symlink to one inside the adapter directory:
never a FIFO, socket or device) and read whole into memory with a size cap, never memory-mapped, so a file
replaced while serving cannot change the weights. Writers build a hidden sibling directory and rename it into
place (`atomic_directory`), so a reader never sees half an adapter.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from .errors import (
    AdapterConfigError,
    AdapterNotFoundError,
    CorruptFileError,
    DestinationError,
    FileTooLargeError,
    UnsafeFileError,
)
from .format import CONFIG_FILE

log = logging.getLogger(__name__)

MAX_CONFIG_BYTES = 1 << 20
"""Cap on a JSON config: they are a few hundred bytes."""
MAX_WEIGHTS_BYTES = 1 << 32
"""Default cap on a weights file (the server passes its own `--max-adapter-bytes`)."""
# A directory holding one of these may be replaced by a writer; any other non-empty directory is refused.
ADAPTER_MARKERS = (CONFIG_FILE, "adapter_config.json", "molora_config.json")  # MALoRA, PEFT, MoLoRA


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory"))
    return next((name for test, name in kinds if test(mode)), "special file")


def checked_file(path: Path, root: Path) -> Path:
    """What to open for `path`: itself if it is a regular file, or the target of a symlink that resolves
    to a regular file inside `root`. Uses lstat/stat only, so a FIFO or a device is refused unopened."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise AdapterNotFoundError(f"{path}: not found") from None
    target = path
    if stat.S_ISLNK(info.st_mode):
        real_root = Path(os.path.realpath(root))
        try:
            target = path.resolve(strict=True)
        except FileNotFoundError:
            raise AdapterNotFoundError(f"{path}: dangling symlink to {os.readlink(path)}") from None
        except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
            raise UnsafeFileError(f"{path}: symlink cannot be resolved ({exc})") from None
        if real_root not in target.parents:
            raise UnsafeFileError(f"{path}: symlink to {target}, which is outside the adapter directory "
                                  f"{real_root}; refused")
        info = os.stat(target)
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFileError(f"{path}: is a {_kind(info.st_mode)}, not a regular file; refused")
    return target


def read_file_bytes(path: Path, root: Path, max_bytes: int) -> bytes:
    """The whole content of `path` (see `checked_file`), refusing files larger than `max_bytes`."""
    target = checked_file(path, root)
    # O_NONBLOCK: a FIFO swapped in after the check cannot block the open; O_NOFOLLOW: nor can a symlink.
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(target, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(f"{path}: became a symlink while being opened; refused") from None
        raise CorruptFileError(f"{path}: cannot be read ({exc.strerror})") from None
    with open(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFileError(f"{path}: is a {_kind(info.st_mode)}, not a regular file; refused")
        if info.st_size > max_bytes:
            raise FileTooLargeError(f"{path}: {info.st_size} bytes exceeds the cap of {max_bytes}")
        data = handle.read(info.st_size + 1)  # at most max_bytes + 1
    if len(data) != info.st_size:
        raise CorruptFileError(f"{path}: changed size while being read ({info.st_size} -> {len(data)} bytes)")
    return data


def read_json(path: Path, root: Path) -> Any:
    """Parse a JSON file read by `read_file_bytes`; errors are `AdapterConfigError`s naming the file."""
    raw = read_file_bytes(path, root, MAX_CONFIG_BYTES)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise AdapterConfigError(f"{path}: not UTF-8 text") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise AdapterConfigError(f"{path}: invalid JSON: {exc}") from None


def read_safetensors(path: Path, root: Path, max_bytes: int = MAX_WEIGHTS_BYTES) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, parsed from its bytes in memory (no memory map)."""
    data = read_file_bytes(path, root, max_bytes)
    try:
        return load_safetensors_bytes(data)
    except SafetensorError as exc:
        raise CorruptFileError(f"{path}: not a valid safetensors file ({exc})") from None
    except (ValueError, RuntimeError, TypeError, AssertionError) as exc:
        raise CorruptFileError(f"{path}: cannot be read as safetensors ({exc})") from None


# ---- writing ----
@contextmanager
def atomic_directory(destination: str | Path) -> Iterator[Path]:
    """Yield an empty hidden sibling of `destination` to write into; put it in place only when complete.

    On a clean exit every file and directory in it is fsynced and it replaces `destination`: swapped in
    one step where the system can (Linux `renameat2` RENAME_EXCHANGE), else the old directory is renamed
    aside first. Either way a reader sees the old directory or the new one, never half of one. The old
    one is then deleted. On any error the sibling is removed and `destination` is left as it was.
    """
    dst = Path(os.path.realpath(destination))  # through a symlinked destination, to the real directory
    _check_replaceable(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.parent / f".{dst.name}.tmp-{secrets.token_hex(6)}"
    os.mkdir(staging)  # hidden: the registry only discovers names that do not start with '.'
    try:
        yield staging
        _fsync_tree(staging)
        _replace(staging, dst)
    finally:
        if os.path.lexists(staging):
            shutil.rmtree(staging, ignore_errors=True)


def _check_replaceable(dst: Path) -> None:
    # A mistyped `-o .` must not delete a project: only adapter directories (or empty ones) are replaced.
    if not os.path.lexists(dst):
        return
    if not dst.is_dir():
        raise DestinationError(f"{dst}: exists and is not a directory; refusing to replace it")
    names = os.listdir(dst)
    if names and not any(marker in names for marker in ADAPTER_MARKERS):
        raise DestinationError(f"{dst}: exists and is not an adapter directory; refusing to replace it")


def _fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for folder, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(folder, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                _fsync_path(path)
        _fsync_path(folder)


def _replace(staging: Path, dst: Path) -> None:
    """Rename `staging` to `dst`; an existing `dst` ends up deleted."""
    if not os.path.lexists(dst):
        os.rename(staging, dst)
    elif _exchange(staging, dst):
        _fsync_path(dst.parent)
        _remove_old(staging)  # it now holds the old directory
        return
    else:
        aside = dst.parent / f".{dst.name}.old-{secrets.token_hex(6)}"
        os.rename(dst, aside)
        try:
            os.rename(staging, dst)
        except BaseException:
            os.rename(aside, dst)  # put the old one back
            raise
        _remove_old(aside)
    _fsync_path(dst.parent)


def _remove_old(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except OSError as exc:
        log.warning("could not delete the replaced adapter directory %s: %s", path, exc)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):  # the kernel, file system or a
        return False  # seccomp filter does not allow it: the fallback then succeeds or says why not
    raise OSError(code, os.strerror(code), str(b))
