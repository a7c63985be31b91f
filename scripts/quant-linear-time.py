"""Time one base linear of the default model per weight format, at 1 to 256 rows (issue 17): oneDNN-packed float32
and bfloat16 (what the engine runs for batches), torch's weight-only int8 (`_weight_int8pack_mm`, per-channel
scales) and int4 (`_weight_int4pack_mm_for_cpu`, group 32) kernels, and the native GEMV of the fast decode path
(`kernels/native/decode_ops.gemv`) over bfloat16 and int8 weights, on the fused q/k/v and gate/up shapes too.

    .venv/bin/python scripts/quant-linear-time.py

Each figure is the best of 5 rounds of the mean per call (at least 0.2 s a round); the weights rotate over enough
copies to leave the last-level cache, as a decode step reads every layer's weights once.
"""

from __future__ import annotations

import time

import torch

from malora_runtime.kernels.native.decode_ops import GemvWeight, gemv
from malora_runtime.models.packed_linear import pack_weight

SHAPES = {"q/o 576x576": (576, 576), "qkv 576->960": (576, 960), "up 576->1536": (576, 1536),
          "gate_up 576->3072": (576, 3072), "down 1536->576": (1536, 576), "head 576->49152": (576, 49152)}
ROWS = (1, 2, 4, 8, 32, 256)
GEMV_ROWS = 8  # the GEMV reads each weight once per four rows: past a few rows it is not a contender
GROUP = 32


def best_per_call(fn, min_time: float = 0.2, rounds: int = 5) -> float:
    fn(0)
    start = time.perf_counter()
    fn(1)
    once = max(time.perf_counter() - start, 1e-6)
    calls = max(3, int(min_time / once))
    figures = []
    for r in range(rounds):
        start = time.perf_counter()
        for i in range(calls):
            fn(r * calls + i)
        figures.append((time.perf_counter() - start) / calls)
    return min(figures)


def int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scales = w.abs().amax(dim=1).clamp_min(1e-8) / 127
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales.bfloat16()


def int4_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    groups = w.reshape(n, k // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp_min(1e-8)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, scales_and_zeros


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per call (speed-up vs bf16 oneDNN)")
    print(f"{'layer':>18} {'rows':>5} {'fp32':>8} {'bf16':>8} {'int8':>14} {'int4':>14} {'gemv bf16':>16} "
          f"{'gemv int8':>16}")
    for label, (d_in, d_out) in SHAPES.items():
        copies = max(2, int(64e6 // (d_in * d_out * 4)))
        weights = [torch.randn(d_out, d_in) / d_in**0.5 for _ in range(copies)]
        fp32 = [pack_weight(w) for w in weights]
        bf16 = [pack_weight(w.bfloat16()) for w in weights]
        int8 = [int8_weight(w) for w in weights]
        int4 = [int4_weight(w) for w in weights]
        plain_bf16 = [GemvWeight(w.bfloat16().contiguous()) for w in weights]
        plain_int8 = [GemvWeight(q, s.float()) for q, s in int8]
        threads = torch.get_num_threads()
        for rows in ROWS:
            x = torch.randn(rows, d_in)
            xb = x.bfloat16()
            with torch.no_grad():
                t32 = best_per_call(lambda i: torch.ops.mkldnn._linear_pointwise(x, fp32[i % copies], None, "none",
                                                                                 [], ""))
                t16 = best_per_call(lambda i: torch.ops.mkldnn._linear_pointwise(xb, bf16[i % copies], None, "none",
                                                                                 [], ""))
                t8 = best_per_call(lambda i: torch.ops.aten._weight_int8pack_mm(xb, *int8[i % copies]))
                t4 = best_per_call(lambda i: torch.ops.aten._weight_int4pack_mm_for_cpu(
                    xb, int4[i % copies][0], GROUP, int4[i % copies][1]))
                native = ""
                if rows <= GEMV_ROWS:
                    out = torch.empty(rows, d_out, dtype=torch.bfloat16)
                    g16 = best_per_call(lambda i: gemv(xb, plain_bf16[i % copies], out, threads))
                    g8 = best_per_call(lambda i: gemv(xb, plain_int8[i % copies], out, threads))
                    native = f" {g16 * 1e3:8.3f} ({t16 / g16:4.2f}x) {g8 * 1e3:8.3f} ({t16 / g8:4.2f}x)"
            print(f"{label:>18} {rows:>5} {t32 * 1e3:8.3f} {t16 * 1e3:8.3f} {t8 * 1e3:8.3f} ({t16 / t8:4.2f}x) "
                  f"{t4 * 1e3:8.3f} ({t16 / t4:4.2f}x){native}")


if __name__ == "__main__":
    main()
