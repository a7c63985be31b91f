"""Time the native decode ops (GEMV, RMS norm, SiLU, paged attention) of several builds, alternating in one process.

Builds are instruction-set levels of this checkout (`--level avx2`, built as the server would build them) or other
compiled libraries (`--library NAME=PATH`, e.g. an older source built with `g++ -O3 -march=native -shared -fPIC
-std=c++17 -fopenmp`). Median, min and max microseconds per call over `--rounds` rounds of `--calls` calls each.

    .venv/bin/python scripts/decode-ops-time.py --level avx512_bf16 --level avx2 [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import malora_runtime.kernels.native.decode_ops as ops  # noqa: E402
from malora_runtime.kernels.native.build import build_library  # noqa: E402


def cases(dtype: torch.dtype, weight_dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    weight = ops.GemvWeight(torch.randn(576 * 3, 576).to(weight_dtype))
    x, y = torch.randn(1, 576).to(dtype), torch.empty(1, 576 * 3, dtype=dtype)
    hidden, delta, norm, normed = (torch.randn(1, 576).to(dtype), torch.randn(1, 576).to(dtype),
                                   torch.randn(576).to(dtype), torch.empty(1, 576, dtype=dtype))
    gate_up, activated = torch.randn(1, 3072).to(dtype), torch.empty(1, 1536, dtype=dtype)
    blocks, block_size = 64, 16
    keys, values = (torch.randn(blocks * block_size, 3, 64).to(dtype) for _ in range(2))
    query, attended = torch.randn(1, 9 * 64).to(dtype), torch.empty(1, 9 * 64, dtype=dtype)
    batch = ops.DecodeBatch.checked(torch.tensor([500]), torch.arange(blocks, dtype=torch.int32).view(1, blocks),
                                    torch.tensor([600]), block_size, blocks * block_size)
    return {
        f"gemv 1728x576, {str(weight_dtype).removeprefix('torch.')} weights": lambda: ops.gemv(x, weight, y, 2),
        "add_rms_norm 576": lambda: ops.add_rms_norm(hidden, delta, norm, normed, 1e-5),
        "silu_mul 1536": lambda: ops.silu_mul(gate_up[:, :1536], gate_up[:, 1536:], activated),
        "attention, 600 keys, 9 q / 3 kv heads of 64": lambda: ops.decode_attention(query, keys, values, batch,
                                                                                      0.125, None, attended, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--level", action="append", default=[], help="an instruction-set level of this checkout")
    parser.add_argument("--library", action="append", default=[], help="NAME=PATH of a compiled decode_cpu library")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the rows' dtype")
    parser.add_argument("--weight-dtype", default="bfloat16", choices=["float32", "bfloat16", "int8"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    libraries = {level: ops.DecodeOps.load(build_library(ops.SOURCE, level=level)) for level in args.level}
    libraries.update({name: ops.DecodeOps.load(Path(path)) for name, _, path in
                      (spec.partition("=") for spec in args.library)})
    if not libraries:
        parser.error("name at least one --level or --library")
    if args.weight_dtype == "int8":
        parser.error("int8 weights need scales: time them through scripts/quant-linear-time.py")
    work = cases(getattr(torch, args.dtype), getattr(torch, args.weight_dtype))
    times: dict[str, dict[str, list[float]]] = {case: {name: [] for name in libraries} for case in work}
    for _ in range(args.rounds):
        for name, library in libraries.items():
            ops._load = lambda level=None, _library=library: _library  # every op reads the library through _load
            for case, call in work.items():
                for _ in range(50):
                    call()
                started = time.perf_counter()
                for _ in range(args.calls):
                    call()
                times[case][name].append((time.perf_counter() - started) / args.calls * 1e6)
    for case, per_build in times.items():
        cells = [f"{name} {statistics.median(t):.2f} us [{min(t):.2f}-{max(t):.2f}]" for name, t in per_build.items()]
        sys.stdout.write(f"{case}: {', '.join(cells)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
