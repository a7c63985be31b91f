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


def block_bytes(model: nn.Module) -> int:
    """Bytes of every block weight the model reads (a weight shared by two modules counted once)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        weight = getattr(module, "block_weight", None)
        if isinstance(weight, BlockWeight):
            blocks = weight.blocks
            seen[blocks.data_ptr()] = blocks.numel()
    return sum(seen.values())
