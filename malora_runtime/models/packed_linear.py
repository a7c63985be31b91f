"""The base model's linear layers through oneDNN with weights packed once, on CPU in float32 or bfloat16.

Why: torch's CPU `F.linear` calls MKL's sgemm, which on this project's AMD (AVX-512) machines runs
2.2-2.7x slower than oneDNN's matmul on a weight re-laid out ahead of time, at every batch size the
engine sees (1 to 2048 rows; `docs/BENCHMARKS.md`, "oneDNN linears"). This is the same pre-packing
that torch.compile's CPU backend applies when it freezes weights, without the compile.

`pack_linears` turns every plain `nn.Linear` of a frozen model into a `PackedLinear` in place: the
module keeps its `weight` (shared, unchanged, so anything that reads it still works) and gains a
packed copy that its forward uses. The packed copy is not updated if `weight` is later modified.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from ..cpu_features import cpu_features
from ..kernels.onednn import onednn_linear_available

log = logging.getLogger(__name__)

# Weight dtypes oneDNN packs on the CPU. bfloat16 products on packed weights measured 1.7-2.9x faster than
# float32 ones on this AVX512_BF16 machine (docs/BENCHMARKS.md); float16 is left to torch's own matmul.
PACKABLE_DTYPES = (torch.float32, torch.bfloat16)

# The row count the packed layout is tuned for: the engine's decode batches. Other row counts work
# (measured 2.2-2.3x faster than MKL at 256 and 2048 rows with this hint).
PACKING_BATCH_HINT = 32


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, batch_size=PACKING_BATCH_HINT)


@functools.cache
def packing_refusal(dtype: torch.dtype) -> str | None:
    """Why oneDNN does not pack `dtype` weights on this CPU, or None where it does. Asked of oneDNN itself (a
    16x16 weight), not inferred from CPU flags: bfloat16 packing needs AVX512BW/VL/DQ or AVX-NE-CONVERT, so an
    AVX2-only CPU (or a `MALORA_MAX_ISA=avx2` cap) is refused."""
    if not onednn_linear_available():
        return "oneDNN is not available in this torch"
    if dtype not in PACKABLE_DTYPES:
        return f"oneDNN packs {', '.join(map(str, PACKABLE_DTYPES))} weights, not {dtype}"
    try:
        pack_weight(torch.zeros(16, 16, dtype=dtype))
    except RuntimeError as exc:
        return str(exc).strip().splitlines()[0]
    return None


class PackedLinear(nn.Linear):
    """An `nn.Linear` whose forward multiplies by a oneDNN-packed copy of its weight."""

    packed_weight: torch.Tensor

    @classmethod
    def convert(cls, linear: nn.Linear) -> PackedLinear:
        """Make `linear` a PackedLinear in place (as torch.nn.utils.parametrize does, by changing its
        class), so parents, hooks and tied parameters keep pointing at the same module. Raises
        RuntimeError (and leaves `linear` unchanged) when oneDNN cannot pack the weight."""
        packed = pack_weight(linear.weight.detach())
        linear.__class__ = cls
        linear.register_buffer("packed_weight", packed, persistent=False)
        return linear  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if not rows.is_contiguous():
            rows = rows.contiguous()
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


def pack_linears(model: nn.Module) -> int:
    """Convert the model's plain float32 or bfloat16 CPU `nn.Linear` layers (including those wrapped by
    `MaloraLinear`) to `PackedLinear`; returns how many. No-op where oneDNN is unavailable."""
    if not onednn_linear_available():
        log.info("oneDNN is not available: base linears use torch's default matmul")
        return 0
    features = cpu_features()
    if features.architecture == "x86_64" and features.level == "scalar":
        # oneDNN's SSE4.1 kernels sum a row in another order depending on how many rows the product has, and the
        # engine promises rows that do not change with the batch (seeded sampling relies on it).
        log.info("base linears use torch's default matmul: oneDNN's products below AVX2 are not batch-invariant")
        return 0
    refused = {dtype: packing_refusal(dtype) for dtype in PACKABLE_DTYPES}
    for dtype, reason in refused.items():
        if reason is not None and any(type(m) is nn.Linear and m.weight.dtype == dtype for m in model.modules()):
            log.info("oneDNN does not pack %s weights on this CPU (%s): those linears use torch's default matmul",
                     dtype, reason)
    count = 0
    for module in model.modules():
        if (type(module) is nn.Linear and module.weight.device.type == "cpu"
                and module.weight.dtype in PACKABLE_DTYPES and refused[module.weight.dtype] is None):
            try:
                PackedLinear.convert(module)
            except RuntimeError as exc:  # e.g. a CPU oneDNN has no kernel for: serve with torch's matmul
                log.warning("oneDNN cannot pack %dx%d weights (%s): the remaining linears use torch's "
                            "default matmul", module.out_features, module.in_features, exc)
                break
            count += 1
    return count
