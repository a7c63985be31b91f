"""Which dtype the engine serves in when asked for `auto`: bfloat16 where the hardware computes it natively,
float32 elsewhere. Detected, not guessed: on the CPU from the kernel's list of CPU flags (AVX512_BF16 or
AMX-BF16), on CUDA from torch's own check.

Why: a decode step reads every weight once, so halving their bytes is the lever; packed oneDNN bfloat16
products measured 1.7-2.9x faster than float32 ones on an AVX512_BF16 CPU (docs/BENCHMARKS.md). Without
native bf16 instructions the products are emulated and slower than float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class DtypeChoice:
    name: str  # float32, bfloat16 or float16
    reason: str  # why, for the start-up log and /version


def cpu_bf16_flags(cpuinfo: Path = CPUINFO) -> list[str]:
    """The native-bfloat16 flags this CPU reports (empty where there are none or no /proc/cpuinfo)."""
    try:
        with cpuinfo.open() as handle:
            line = next((line for line in handle if line.startswith(("flags", "Features"))), "")
    except OSError:
        return []
    flags = set(line.partition(":")[2].split())
    return [flag for flag in BF16_CPU_FLAGS if flag in flags]


def choose_dtype(requested: str, device: str, cpuinfo: Path = CPUINFO) -> DtypeChoice:
    """`requested` as it is, or for `auto` the dtype this device computes fastest with the reason."""
    if requested != "auto":
        return DtypeChoice(requested, f"requested ({requested})")
    if torch.device(device).type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return DtypeChoice("bfloat16", f"auto: {torch.cuda.get_device_name()} supports bfloat16")
        return DtypeChoice("float32", "auto: this CUDA device has no native bfloat16")
    flags = cpu_bf16_flags(cpuinfo)
    if flags:
        return DtypeChoice("bfloat16", f"auto: the CPU has native bfloat16 ({', '.join(flags)})")
    return DtypeChoice("float32", "auto: the CPU has no native bfloat16 (no avx512_bf16 or amx_bf16 flag)")
