"""`--quantization int8`: weight-only int8 base linears for one-row decode, on CPU, next to the packed weights.

Measured here (`scripts/quant-linear-time.py`, docs/BENCHMARKS.md "Single-stream latency"): torch's weight-only
int8 product (`_weight_int8pack_mm`, per-output-channel scales) is 1.7-2.3x faster than the bfloat16 oneDNN product
at one row, and slower from 8 rows on, where the AMX bfloat16 products barely grow. So each linear keeps its packed
oneDNN weight for batches and gains an int8 copy for single rows. Both read the int8-rounded weights: the packed
weight is re-packed from the int8 weight times its scales, rounded to bfloat16 (within 2^-8 relative of what the
one-row product uses), so a sequence's tokens can differ between one-row and batched steps only at near-ties, as
bfloat16 batches of different sizes already may. Quality of the rounding itself (`scripts/quant-quality.py`):
top-1 agreement with float32 0.942 on the default model (bfloat16: 0.965). The embedding keeps its own weights (the
tied output head's `weight` parameter is never modified, only the copies its forward reads).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .packed_linear import PackedLinear, pack_weight, packing_refusal

log = logging.getLogger(__name__)

QUANTIZATIONS = ("int8",)
INT8_MAX_ROWS = 1  # the int8 product wins at one row only (0.6-0.9x of bfloat16 at 8 rows here)
ALIGN = 64
"""torch's int8 kernel runs only linears whose widths are multiples of this: it crashed (33 -> 7) or gave wrong
results on small odd shapes here; every width of 64k tried (64-4096 in, 64-49152 out) matched to 2e-2."""


def check_quantization(mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise ValueError saying why `mode` cannot be served on this device in this dtype."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        raise ValueError(f"--quantization {mode} needs the CPU and --dtype bfloat16: in float32 the int8 product "
                         "measured slower than the float32 one (64 against 49 ms a step)")
    refusal = packing_refusal(torch.bfloat16)
    if refusal is not None:
        raise ValueError(f"--quantization {mode} needs packed bfloat16 linears, which oneDNN does not make on this CPU "
                         f"({refusal}); serve without it (--quantization none)")


def int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [out, in], float32 scales [out]): symmetric per output channel, round to nearest."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


class Int8DecodeLinear(PackedLinear):
    """A PackedLinear that multiplies single rows by an int8 copy of its (rounded) weight."""

    int8_weight: torch.Tensor
    int8_scales: torch.Tensor
    torch_kernel_fits: bool
    """Whether torch's int8 kernel takes this shape; where not, eager one-row steps use the packed product of the
    same rounded weights and only the native GEMV (models.fused_products) reads the int8 copy."""

    @classmethod
    def quantize(cls, linear: PackedLinear) -> Int8DecodeLinear:
        """Make `linear` an Int8DecodeLinear in place; its packed weight becomes the rounded one."""
        q, scales = int8_per_channel(linear.weight)
        dtype = linear.weight.dtype
        rounded = (q.float() * scales[:, None]).to(dtype)
        linear.packed_weight = pack_weight(rounded)
        linear.__class__ = cls
        linear.register_buffer("int8_weight", q, persistent=False)
        linear.register_buffer("int8_scales", scales.to(dtype), persistent=False)
        linear.torch_kernel_fits = not (linear.in_features % ALIGN or linear.out_features % ALIGN)
        return linear  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] > INT8_MAX_ROWS or not self.torch_kernel_fits:
            return super().forward(x)
        y = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.int8_weight, self.int8_scales)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def quantize_linears(model: nn.Module, mode: str) -> int:
    """Give every packed base linear of `model` its `mode` copy; returns how many."""
    if mode not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {mode!r}")
    count = misfits = 0
    for module in model.modules():
        if type(module) is PackedLinear:
            misfits += not Int8DecodeLinear.quantize(module).torch_kernel_fits
            count += 1
    if misfits:
        log.info("%d linear layers with widths not a multiple of %d: torch's int8 kernel does not take them, their "
                 "one-row products are the native GEMV's (fast decode) or the packed ones", misfits, ALIGN)
    return count
