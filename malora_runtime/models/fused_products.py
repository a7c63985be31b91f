"""Base products of a decode step at a few rows through the native GEMV, projections of one input fused into one.

Why: oneDNN's packed product costs ~30-35 us a call at one row however small the weight (k_proj of the default
model is 221 KB: 6 GB/s), and a Llama layer makes seven. The native GEMV (`kernels.native.decode_ops.gemv`) reads
plain row-major weights with a call cost of a few us, so q, k and v become one product over their weights stored
side by side, and gate and up another: four products a layer. The projections' own modules then read views of the
fused weight (no second copy); their packed weights still serve batches. MALoRA deltas are added per projection
into its columns of the fused output, so adapters work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..kernels.native.decode_ops import GemvWeight, gemv
from ..layers import MaloraLinear
from .quantized_linear import Int8DecodeLinear


def base_of(module: nn.Module) -> nn.Linear:
    """The base linear of a projection (MALoRA-wrapped or not)."""
    base = module.base if isinstance(module, MaloraLinear) else module
    if not isinstance(base, nn.Linear):
        raise TypeError(f"{type(base).__name__} is not a linear layer")
    return base


def _plain_weight(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in], float32 scales or None) as the one-row product reads it."""
    if isinstance(linear, Int8DecodeLinear):
        return linear.int8_weight, linear.int8_scales.float()
    return linear.weight.detach(), None


def _read_from(linear: nn.Linear, view: torch.Tensor) -> None:
    """Make `linear` hold `view` (equal values) in place of its own one-row weight, freeing the original."""
    if isinstance(linear, Int8DecodeLinear):
        linear.int8_weight = view
    else:
        linear.weight.data = view


@dataclass(frozen=True)
class FusedProduct:
    """One native product for a few rows over the weights of one or more projections of the same input."""

    weight: GemvWeight
    parts: tuple[tuple[nn.Module, str, int, int], ...]  # (parent, attribute, first, end column) per projection

    @classmethod
    def of(cls, parent: nn.Module, names: list[str]) -> FusedProduct:
        """The product of `parent`'s projections `names` (e.g. a Llama attention's q_proj, k_proj, v_proj)."""
        bases = [base_of(parent._modules[name]) for name in names]
        weights, scales = zip(*(_plain_weight(base) for base in bases))
        if len({w.dtype for w in weights}) != 1 or len({s is None for s in scales}) != 1:
            raise ValueError("projections fused into one product must share their weight format")
        fused = weights[0].contiguous() if len(weights) == 1 else torch.cat(weights)
        parts, first = [], 0
        for name, base, weight in zip(names, bases, weights):
            end = first + weight.shape[0]
            if len(weights) > 1:
                _read_from(base, fused[first:end])
            parts.append((parent, name, first, end))
            first = end
        fused_scales = None if scales[0] is None else torch.cat(scales).contiguous()
        bias = None
        if any(base.bias is not None for base in bases):
            bias = torch.cat([base.bias.detach().float() if base.bias is not None
                              else torch.zeros(base.out_features) for base in bases])
        return cls(GemvWeight(fused, fused_scales, bias), tuple(parts))

    def __call__(self, x: torch.Tensor, threads: int) -> torch.Tensor:
        """[rows, out] in x's dtype, with the MALoRA delta of every projection wrapped by now (adapters wrap
        their target modules when first loaded) added into its columns."""
        y = torch.empty(x.shape[0], self.weight.out_features, dtype=x.dtype)
        gemv(x, self.weight, y, threads)
        for parent, name, first, end in self.parts:
            module = parent._modules[name]
            if isinstance(module, MaloraLinear):
                module.add_bank_delta(y[:, first:end], x)
        return y
