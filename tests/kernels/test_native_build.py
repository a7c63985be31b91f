"""How the native kernel is built: cached by content, and clear errors (never a hang) when it cannot be."""

from __future__ import annotations

import pytest

from malora_runtime.kernels.native import build as native
from malora_runtime.kernels.native.build import NativeKernelError
from tests.conftest import requires_native


@requires_native
def test_build_is_cached_by_content(tmp_path):
    first = native.build_native_kernel(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build_native_kernel(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob("*.partial"))


def test_build_failures_say_why(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(NativeKernelError, match="false failed to build malora_cpu.cpp"):
        native.build_native_kernel(tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written left behind
    stuck = tmp_path / "stuck-compiler"  # answers --version, then never finishes a build
    stuck.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "stuck 1.0" && exit 0\nexec sleep 30\n')
    stuck.chmod(0o755)
    monkeypatch.setenv("CXX", str(stuck))
    monkeypatch.setattr(native, "BUILD_TIMEOUT_S", 0.5)
    with pytest.raises(NativeKernelError, match=r"`\S+stuck-compiler -O3 \.\.\.` did not finish in 0.5 s"):
        native.build_native_kernel(tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())
    monkeypatch.setenv("CXX", "")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(NativeKernelError, match="no C\\+\\+ compiler"):
        native.build_native_kernel(tmp_path)
