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
    from malora_runtime.kernels.native.block_ops import block_ops
    from malora_runtime.kernels.native.decode_ops import decode_ops

    want_decode, want_delta = LANES[level]
    assert decode_ops(level).library.malora_decode_lanes() == want_decode
    assert block_ops(level).library.malora_blocks_lanes() == want_decode  # the GGUF block kernels: the same widths
    if want_delta is not None:
        assert require_native_kernel(level).library.malora_kernel_lanes() == want_delta


def skip_without_cross_tools() -> None:
    missing = [tool for tool in (CROSS_COMPILER, QEMU) if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian: g++-aarch64-linux-gnu, qemu-user; "
                    ".ci/run installs them)")


@pytest.mark.parametrize("level", ["neon", "scalar"])
def test_arm_under_qemu(level, tmp_path):
    skip_without_cross_tools()
    if cpu_features().architecture == "aarch64":
        pytest.skip("an ARM machine runs its levels natively (test_each_level_this_cpu_runs)")
    build_and_run(CROSS_COMPILER, [f"-march={ARM_MARCH[level]}"], tmp_path / f"check-arm-{level}", [QEMU], level)


def write_block_cases(path: Path) -> None:
    """Random blocks of every format, rows of x, and gguf-py's float64 products and de-quantized row 0 (the file
    tests/kernels/blocks_check.cpp reads)."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from malora_runtime.kernels.native.block_ops import FORMATS
    from tests.kernels.test_block_kernels import random_blocks

    rng = np.random.default_rng()
    chunks = [np.array([len(FORMATS)], dtype=np.int64).tobytes()]
    for index, fmt in enumerate(FORMATS.values()):
        rows, in_features, out, has_bias = 6, 512 + 32 * (fmt.values == 32), 11, index % 2
        raw = random_blocks(fmt, out, in_features, rng)
        weight = dequantize(raw, GGMLQuantizationType[fmt.name]).astype(np.float64)
        x = rng.standard_normal((rows, in_features)).astype(np.float32)
        bias = rng.standard_normal(out).astype(np.float32)
        want = x.astype(np.float64) @ weight.T + (bias.astype(np.float64) if has_bias else 0)
        chunks += [np.array([fmt.ggml_type, rows, in_features, out, has_bias], dtype=np.int64).tobytes(),
                   raw.tobytes(), x.tobytes(), bias.tobytes() if has_bias else b"", want.tobytes(),
                   weight[0].tobytes()]
    path.write_bytes(b"".join(chunks))


@pytest.mark.parametrize("level", ["neon", "scalar"])
def test_block_kernels_on_arm_under_qemu(level, tmp_path):
    skip_without_cross_tools()
    if cpu_features().architecture == "aarch64":
        pytest.skip("an ARM machine runs its levels natively (tests/kernels/test_block_kernels.py)")
    cases, binary = tmp_path / "cases.bin", tmp_path / f"blocks-check-{level}"
    write_block_cases(cases)
    built = subprocess.run([CROSS_COMPILER, "-O1", f"-march={ARM_MARCH[level]}", "-std=c++17", "-fopenmp",
                            str(HERE / "blocks_check.cpp"), str(NATIVE / "blocks_cpu.cpp"), "-o", str(binary),
                            "-static"], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    ran = subprocess.run([QEMU, str(binary), str(cases)], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0 and "0 failed" in ran.stdout, ran.stdout[-4000:] + ran.stderr[-2000:]
    lanes = int(ran.stdout.splitlines()[0].split()[-2])  # "blocks_check: N cases, L lanes"
    assert lanes == LANES[level][0]
