"""Linear layers and embeddings whose weights stay in a GGUF file's block format (`kernels.native.block_ops`).

`BlockLinear` is an `nn.Linear` (so MALoRA wrapping, adapter targeting and the fast decode path find it like any
other) without a float `weight`: its forward is the native block product, which de-quantizes tiles inside the
kernel. `BlockEmbedding` looks rows up the same way. Both compute in the activations' dtype (float32 or bfloat16)
with float32 sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cpu_features import cpu_features
from ..kernels.native.block_ops import BlockWeight, block_matmul, block_rows

WIDE_MIN_ROWS = 64
"""From this many rows, a bfloat16 product on a CPU with native bfloat16 de-quantizes the whole weight into a
bfloat16 copy for the call and multiplies through torch (oneDNN's AVX512-BF16 / AMX kernels, twice the float32
multiply-adds per instruction): gate_proj at 256 rows 2.6 ms against 6.0 through the block tiles (one thread). Below,
the copy costs more than it saves: 32-stream decode steps 80 ms through it, 71 ms through the tiles (Zen 4,
scripts/weights-step-time.py). The copy lives for the call only (out x in x 2 bytes), so the model's memory stays the
file's; its rounding is the bfloat16 engine's on the de-quantized weights."""


def wide_product(rows: int, dtype: torch.dtype) -> bool:
    """Whether a product of `rows` rows in `dtype` goes through a transient bfloat16 copy (WIDE_MIN_ROWS)."""
    return rows >= WIDE_MIN_ROWS and dtype == torch.bfloat16 and cpu_features().native_bfloat16


class BlockLinear(nn.Linear):
    """y = x W^T (+ bias) with W kept as blocks. `weight` is None: nothing reads a float copy of W."""

    block_weight: BlockWeight

    def __init__(self, weight: BlockWeight) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)  # a bias lives in the block weight, added in float32 by the kernel
        self.block_weight = weight

    def use(self, weight: BlockWeight) -> None:
        """Read `weight` (the same values, e.g. a view into a fused product's blocks) from now on."""
        if (weight.in_features, weight.out_features, weight.format) != (
                self.in_features, self.out_features, self.block_weight.format):
            raise ValueError("a replacement block weight must have the same shape and format")
        self.block_weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        threads = torch.get_num_threads()
        if wide_product(rows.shape[0], x.dtype):
            weight = self.block_weight
            dense = block_rows(weight, torch.arange(self.out_features), x.dtype, threads)
            y = F.linear(rows, dense, None if weight.bias is None else weight.bias.to(x.dtype))
        else:
            y = torch.empty(rows.shape[0], self.out_features, dtype=x.dtype)
            block_matmul(rows, self.block_weight, y, threads)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        bias = self.block_weight.bias is not None
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.block_weight.format.name}, bias={bias}")


class BlockEmbedding(nn.Module):
    """An embedding table kept as blocks: each looked-up row is de-quantized into `dtype`."""

    def __init__(self, weight: BlockWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.out_features, weight.in_features
        self.block_weight = weight
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return block_rows(self.block_weight, ids, self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.block_weight.format.name}"


def describe_weights(model: nn.Module) -> str:
    """The base model's weight formats as served, for the start-up line and /version: e.g. "gguf blocks (210 Q4_1,
    1 Q8_0)", "float32 (211 packed for oneDNN)", "bfloat16 + int8 one-row copies (211)"."""
    from .packed_linear import PackedLinear
    from .quantized_linear import Int8DecodeLinear

    blocks: dict[str, int] = {}
    seen: set[int] = set()  # a tied output head reads the embedding's blocks: one weight
    packed = int8 = plain = 0
    dtype = None
    for module in model.modules():
        weight = getattr(module, "block_weight", None)
        if isinstance(weight, BlockWeight) and weight.blocks.data_ptr() not in seen:
            seen.add(weight.blocks.data_ptr())
            blocks[weight.format.name] = blocks.get(weight.format.name, 0) + 1
        elif isinstance(module, nn.Linear) and module.weight is not None:
            dtype = str(module.weight.dtype).removeprefix("torch.")
            int8 += isinstance(module, Int8DecodeLinear)
            packed += isinstance(module, PackedLinear)
            plain += not isinstance(module, PackedLinear)
    parts = []
    if blocks:
        parts.append("gguf blocks (" + ", ".join(f"{n} {name}" for name, n in sorted(blocks.items())) + ")")
    if dtype is not None:
        kinds = [f"{packed} packed for oneDNN"] if packed else []
        kinds += [f"{plain} plain"] if plain else []
        parts.append(f"{dtype} ({', '.join(kinds)})" + (f" + int8 one-row copies ({int8})" if int8 else ""))
    return " + ".join(parts) or "none"


def block_bytes(model: nn.Module) -> int:
    """Bytes of every block weight the model reads (a weight shared by two modules counted once)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        weight = getattr(module, "block_weight", None)
        if isinstance(weight, BlockWeight):
            blocks = weight.blocks
            seen[blocks.data_ptr()] = blocks.numel()
    return sum(seen.values())
