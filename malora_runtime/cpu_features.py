"""What the CPU can do, as the serving code sees it: the instruction-set level its native libraries are built for,
whether it computes bfloat16 natively, and a cap (`MALORA_MAX_ISA`) that makes a bigger CPU act as a smaller one.

Levels, lowest first: `scalar` (any x86-64 or ARM CPU: the portable C++ paths), `neon` (ARMv8 Advanced SIMD),
`avx2` (AVX2, FMA and F16C: Haswell, AMD Zen 1-3), `avx512` (F, BW, VL, DQ: Skylake-X, Zen 4), `avx512_bf16`
(plus native bfloat16 dot products: Cooper Lake, Zen 4), `amx` (plus AMX tiles: Sapphire Rapids).

Why a cap: users run every one of these, and a machine can only test the paths its own CPU takes. With
`MALORA_MAX_ISA=avx2` an AVX-512 machine builds the native libraries for AVX2 (`-march=x86-64-v3`), picks the
dtype an AVX2 CPU would (float32: no native bfloat16), and asks oneDNN and ATen for their AVX2 kernels too
(`ONEDNN_MAX_CPU_ISA`, `ATEN_CPU_CAPABILITY`: both read at their first use, so `apply_isa_cap()` runs when this
package is imported). The suite runs its CPU-specific tests once more that way (`make test`).
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
ENV_CAP = "MALORA_MAX_ISA"

X86_LEVELS = ("scalar", "avx2", "avx512", "avx512_bf16", "amx")
ARM_LEVELS = ("scalar", "neon")
# The /proc/cpuinfo flags each level needs on top of the level below it.
X86_REQUIREMENTS = {
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
    "avx512_bf16": ("avx512_bf16",),
    "amx": ("amx_bf16", "amx_tile"),
}
ARM_REQUIREMENTS = {"neon": ("asimd",)}
# The compiler's target for a level below the machine's own (the machine's own level is built with -march=native,
# which also enables what no level names, such as VNNI).
X86_MARCH = {"scalar": "x86-64", "avx2": "x86-64-v3", "avx512": "x86-64-v4",
             "avx512_bf16": "x86-64-v4 -mavx512bf16", "amx": "sapphirerapids"}
ARM_MARCH = {"scalar": "armv8-a+nosimd", "neon": "armv8-a"}
# What oneDNN and ATen are told at a capped level (their own names for it).
ONEDNN_ISA = {"scalar": "SSE41", "avx2": "AVX2", "avx512": "AVX512_CORE", "avx512_bf16": "AVX512_CORE_BF16",
              "amx": "AVX512_CORE_AMX"}
ATEN_CAPABILITY = {"scalar": "default", "avx2": "avx2", "avx512": "avx512", "avx512_bf16": "avx512",
                   "amx": "avx512"}
BF16_LEVELS = ("avx512_bf16", "amx")


class IsaError(ValueError):
    """MALORA_MAX_ISA names no level of this CPU's architecture."""


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU's flags and levels, with the cap applied."""

    architecture: str  # x86_64 or aarch64 (others: scalar only)
    flags: frozenset[str] = field(repr=False)  # as /proc/cpuinfo reports them, cap not applied
    native_level: str = ""  # the best level the CPU has
    level: str = ""  # the level served: native_level, or the cap where it is lower
    capped: bool = False

    @property
    def levels(self) -> tuple[str, ...]:
        """The levels this CPU can run, lowest first, up to the served level."""
        ladder = _ladder(self.architecture)
        return ladder[:ladder.index(self.level) + 1]

    @property
    def native_bfloat16(self) -> bool:
        return bool(self.bf16_flags())

    def bf16_flags(self) -> list[str]:
        """The native-bfloat16 flags this CPU reports (empty when capped below the bfloat16 levels)."""
        if self.capped and self.level not in BF16_LEVELS:
            return []
        return [flag for flag in ("avx512_bf16", "amx_bf16") if flag in self.flags]

    def describe(self) -> str:
        """One line for the start-up log and /version: the served level, and the CPU's own where capped."""
        if self.capped:
            return f"{self.level} ({ENV_CAP}; the CPU has {self.native_level})"
        return self.level

    def march(self, level: str | None = None) -> list[str]:
        """The compiler flags that target `level` (default: the served one)."""
        level = level or self.level
        if level == self.native_level and not self.capped and self.architecture in ("x86_64", "aarch64"):
            return ["-march=native"]
        table = X86_MARCH if self.architecture == "x86_64" else ARM_MARCH
        if level not in table:
            return []
        return [f"-march={table[level].split()[0]}", *table[level].split()[1:]]


def _ladder(architecture: str) -> tuple[str, ...]:
    return {"x86_64": X86_LEVELS, "aarch64": ARM_LEVELS}.get(architecture, ("scalar",))


def read_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The flags (x86) or features (ARM) line of /proc/cpuinfo; empty where there is none."""
    try:
        with cpuinfo.open() as handle:
            line = next((line for line in handle if line.startswith(("flags", "Features"))), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def native_level(architecture: str, flags: frozenset[str]) -> str:
    """The highest level whose flags (and every lower level's) the CPU has."""
    requirements = {"x86_64": X86_REQUIREMENTS, "aarch64": ARM_REQUIREMENTS}.get(architecture, {})
    best = "scalar"
    for level in _ladder(architecture)[1:]:
        if not all(flag in flags for flag in requirements[level]):
            break
        best = level
    return best


def detect(cpuinfo: Path = CPUINFO, cap: str | None = None, architecture: str | None = None) -> CpuFeatures:
    """The CPU's features from `cpuinfo`, capped at `cap` (a level name; None or '' for no cap)."""
    architecture = architecture or platform.machine()
    if architecture == "arm64":
        architecture = "aarch64"
    flags = read_flags(cpuinfo)
    best = native_level(architecture, flags)
    ladder = _ladder(architecture)
    if not cap or cap == "native":
        return CpuFeatures(architecture, flags, best, best, capped=False)
    if cap not in ladder:
        raise IsaError(f"{ENV_CAP}={cap!r}: this {architecture} CPU's levels are {', '.join(ladder)} (or native)")
    level = ladder[min(ladder.index(cap), ladder.index(best))]
    return CpuFeatures(architecture, flags, best, level, capped=level != best)


@functools.cache
def cpu_features() -> CpuFeatures:
    """This machine's features, capped by MALORA_MAX_ISA (read once per process)."""
    return detect(cap=os.environ.get(ENV_CAP, "").strip() or None)


def apply_isa_cap() -> None:
    """Tell oneDNN and ATen the capped level, unless the caller set their own variables: both read them once, at
    their first use, so this runs before any product is computed (at the package's import). No-op without a cap,
    and for a cap that names no level (the server refuses it at start-up, with the levels, from `cpu_features()`)."""
    try:
        features = cpu_features()
    except IsaError:
        return
    if not features.capped or features.architecture != "x86_64":
        return
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", ONEDNN_ISA[features.level])
    os.environ.setdefault("ATEN_CPU_CAPABILITY", ATEN_CAPABILITY[features.level])
