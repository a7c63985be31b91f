"""Which dtype the engine serves in when asked for `auto`: bfloat16 where the hardware computes it natively,
float32 elsewhere. Detected, not guessed: on the CPU from its flags as `cpu_features` sees them (AVX512_BF16 or
AMX-BF16; none under a `MALORA_MAX_ISA` cap below them), on CUDA from torch's own check.

Why: a decode step reads every weight once, so halving their bytes is the lever; packed oneDNN bfloat16
products measured 1.7-2.9x faster than float32 ones on an AVX512_BF16 CPU (docs/BENCHMARKS.md). Without
native bf16 instructions the products are emulated and slower than float32 (and oneDNN does not pack them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .cpu_features import CpuFeatures, cpu_features, detect


@dataclass(frozen=True)
class DtypeChoice:
    name: str  # float32, bfloat16 or float16
    reason: str  # why, for the start-up log and /version


def _features(cpuinfo: Path | None) -> CpuFeatures:
    return cpu_features() if cpuinfo is None else detect(cpuinfo, architecture="x86_64")


def cpu_bf16_flags(cpuinfo: Path | None = None) -> list[str]:
    """The native-bfloat16 flags this CPU reports (empty where there are none, no /proc/cpuinfo, or a cap below)."""
    return _features(cpuinfo).bf16_flags()


def choose_dtype(requested: str, device: str, cpuinfo: Path | None = None) -> DtypeChoice:
    """`requested` as it is, or for `auto` the dtype this device computes fastest with the reason."""
    if requested != "auto":
        return DtypeChoice(requested, f"requested ({requested})")
    if torch.device(device).type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return DtypeChoice("bfloat16", f"auto: {torch.cuda.get_device_name()} supports bfloat16")
        return DtypeChoice("float32", "auto: this CUDA device has no native bfloat16")
    features = _features(cpuinfo)
    flags = features.bf16_flags()
    if flags:
        return DtypeChoice("bfloat16", f"auto: the CPU has native bfloat16 ({', '.join(flags)})")
    capped = f" at {features.level} (MALORA_MAX_ISA)" if features.capped else ""
    return DtypeChoice("float32", f"auto: the CPU has no native bfloat16{capped} (no avx512_bf16 or amx_bf16 flag)")
