"""Linear layers and embeddings whose weights stay in a GGUF file's block format (`kernels.native.block_ops`).

`BlockLinear` is an `nn.Linear` (so MALoRA wrapping, adapter targeting and the fast decode path find it like any
other) without a float `weight`: its forward is the native block product, which de-quantizes tiles inside the
kernel. `BlockEmbedding` looks rows up the same way. Both compute in the activations' dtype (float32 or bfloat16)
with float32 sums.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.native.block_ops import BlockWeight, block_matmul, block_rows


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
        y = torch.empty(rows.shape[0], self.out_features, dtype=x.dtype)
        block_matmul(rows, self.block_weight, y, torch.get_num_threads())
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
