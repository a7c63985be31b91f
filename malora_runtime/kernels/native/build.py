"""Building the native libraries (the MALoRA delta kernel, the decode ops, the GGUF block kernels): each compiled once
per machine and instruction-set level by the system's C++ compiler (`$CXX`, else `c++`) into `$MALORA_CACHE/kernels/`,
under a name that hashes the source (with the headers beside it), the flags, the compiler's version and the CPU's
feature flags; concurrent builders rename a finished library into place.

The served level (`cpu_features`) is built with -march=native; a lower level (a `MALORA_MAX_ISA` cap, or a test
that checks every level this CPU can run against the scalar one) with that level's -march, so its preprocessor
paths are exactly the ones a CPU of that level takes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ...cache import cache_root
from ...cpu_features import cpu_features

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("malora_cpu.cpp")
FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17")
BUILD_TIMEOUT_S = 300  # the build takes about a second; a stuck compiler must not hold the server's start


class NativeKernelError(RuntimeError):
    """The native kernel cannot be built or loaded here."""


Loaded = TypeVar("Loaded")


def load_or_error(load: Callable[[], Loaded]) -> Loaded | NativeKernelError:
    """`load()`, or the NativeKernelError saying why it failed (whatever the build or the loader raised)."""
    try:
        return load()
    except NativeKernelError as exc:
        return exc
    except Exception as exc:
        return NativeKernelError(f"{type(exc).__name__}: {exc}")


def loaded_or_raise(loaded: Loaded | NativeKernelError) -> Loaded:
    """What `load_or_error` loaded, or its error raised."""
    if isinstance(loaded, NativeKernelError):
        raise loaded
    return loaded


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    raise NativeKernelError("no C++ compiler found (set CXX, or install g++)")


def _run_compiler(command: list[str]) -> tuple[int, str, str]:
    """(return code, stdout, stderr). The compiler runs in its own process group, so a timeout stops
    the whole pipeline (the driver's cc1plus and ld too), not only the driver."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                          start_new_session=True) as process:
        try:
            out, err = process.communicate(timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise NativeKernelError(f"`{' '.join(command[:2])} ...` did not finish in {BUILD_TIMEOUT_S} s") from exc
    return process.returncode, out, err


def _torch_uses_libgomp() -> bool:
    """Whether the process's OpenMP runtime, loaded by torch, is `libgomp.so.1`, the one g++'s -fopenmp
    links: the kernel's threads are then torch's own. A torch that bundles a renamed libgomp (or
    Intel's runtime) would get a second thread pool beside its own, oversubscribing the cores, so the
    kernel is built single-threaded there."""
    try:
        with open("/proc/self/maps") as maps:
            return any(line.rstrip().endswith("/libgomp.so.1") for line in maps)
    except OSError:
        return False


def build_native_kernel(directory: Path | None = None, level: str | None = None) -> Path:
    """Compile the MALoRA delta kernel (once: the result is cached by content) and return the library's path."""
    return build_library(SOURCE, directory, level)


def build_library(source_path: Path, directory: Path | None = None, level: str | None = None) -> Path:
    """Compile one C++ source of this folder into a shared library for instruction-set `level` (default: the served
    one; `cpu_features`), once: cached by content; its path."""
    features = cpu_features()
    level = level or features.level
    if level not in features.levels:
        raise NativeKernelError(f"this CPU runs the levels {', '.join(features.levels)}, not {level}")
    compiler = _compiler()
    version = _run_compiler([compiler, "--version"])[1]
    flags = (*FLAGS, *features.march(level))
    flags = (*flags, "-fopenmp") if _torch_uses_libgomp() else (*flags, "-Wno-unknown-pragmas")
    if "-fopenmp" not in flags:
        log.warning("torch's OpenMP runtime is not libgomp.so.1: the native MALoRA kernel runs single-threaded")
    # The source and every header beside it (numeric.h): a change to either must rebuild.
    source = b"\0".join(path.read_bytes() for path in (source_path, *sorted(source_path.parent.glob("*.h"))))
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(),
                                     " ".join(sorted(features.flags)).encode()])).hexdigest()[:16]
    directory = directory or cache_root() / "kernels"
    target = directory / f"{source_path.stem}-{level}-{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent builders (several servers, test workers) never
    # load a half-written library.
    fd, partial = tempfile.mkstemp(prefix=target.stem, suffix=".so.partial", dir=directory)
    os.close(fd)
    try:
        code, _, err = _run_compiler([compiler, *flags, str(source_path), "-o", partial])
        if code != 0:
            raise NativeKernelError(f"{compiler} failed to build {source_path.name}:\n{err.strip()[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    log.info("built the native library %s", target)
    return target
