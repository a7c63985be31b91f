"""The glibc malloc settings the engine applies on CPU (engine.allocator)."""

from __future__ import annotations

import platform

import pytest

from malora_runtime.engine.allocator import keep_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_settings_take_effect_and_can_be_applied_again() -> None:
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True
