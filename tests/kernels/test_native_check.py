"""The native kernels (decode ops and the MALoRA delta) for ARM, NEON and the scalar build, cross-compiled with
g++-aarch64-linux-gnu and checked under qemu-aarch64 from C++ against double-precision references
(tests/kernels/native_check.cpp; fresh random inputs each run, MALORA_TEST_SEED replays one). Every build here, x86
levels included, takes the vector width of its level, so no level silently falls back to the scalar loops."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from malora_runtime.cpu_features import ARM_MARCH, cpu_features

HERE = Path(__file__).resolve().parent
NATIVE = HERE.parents[1] / "malora_runtime" / "kernels" / "native"
SOURCES = [HERE / "native_check.cpp", NATIVE / "decode_cpu.cpp", NATIVE / "malora_cpu.cpp"]
# (decode ops, delta kernel) floats per vector each level's build must use; 0: the scalar loops.
LANES = {"scalar": (0, None), "avx2": (8, 8), "avx512": (16, 16), "avx512_bf16": (16, 16), "amx": (16, 16),
         "neon": (4, 4)}
CROSS_COMPILER, QEMU = "aarch64-linux-gnu-g++", "qemu-aarch64"


def seed() -> str:
    return os.environ.get("MALORA_TEST_SEED") or str(int.from_bytes(os.urandom(4), "little"))


def build_and_run(compiler: str, march: list[str], binary: Path, runner: list[str], level: str) -> None:
    """Build the check (-O1: half the compile time of -O2; the vector types are explicit, so the vector paths are
    the same) and run it; its vector widths must be the level's."""
    built = subprocess.run([compiler, "-O1", *march, "-std=c++17", "-fopenmp", *map(str, SOURCES), "-o",
                            str(binary), *(["-static"] if runner else [])], capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    ran = subprocess.run([*runner, str(binary), seed()], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0 and "0 failed" in ran.stdout, ran.stdout[-4000:] + ran.stderr[-2000:]
    first = ran.stdout.splitlines()[0]  # "native_check: seed S, decode ops D lanes, delta kernel K lanes"
    decode_lanes, delta_lanes = (int(part.split()[-2]) for part in first.split(", ")[1:])
    want_decode, want_delta = LANES[level]
    assert decode_lanes == want_decode and (want_delta is None or delta_lanes == want_delta), first


@pytest.mark.parametrize("level", cpu_features().levels)
def test_each_level_this_cpu_runs_builds_its_own_vector_width(level):
    """The libraries Python loads, per level (their results are checked by the `isa` tests at every level)."""
    from malora_runtime.kernels.native import require_native_kernel
    from malora_runtime.kernels.native.decode_ops import decode_ops

    want_decode, want_delta = LANES[level]
    assert decode_ops(level).library.malora_decode_lanes() == want_decode
    if want_delta is not None:
        assert require_native_kernel(level).library.malora_kernel_lanes() == want_delta


@pytest.mark.parametrize("level", ["neon", "scalar"])
def test_arm_under_qemu(level, tmp_path):
    missing = [tool for tool in (CROSS_COMPILER, QEMU) if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian: g++-aarch64-linux-gnu, qemu-user; "
                    ".ci/run installs them)")
    if cpu_features().architecture == "aarch64":
        pytest.skip("an ARM machine runs its levels natively (test_each_level_this_cpu_runs)")
    build_and_run(CROSS_COMPILER, [f"-march={ARM_MARCH[level]}"], tmp_path / f"check-arm-{level}", [QEMU], level)
