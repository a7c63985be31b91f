"""Base products of a decode step at a few rows through the native GEMV, projections of one input fused into one.

Why: oneDNN's packed product costs ~30-35 us a call at one row however small the weight (k_proj of the default
model is 221 KB: 6 GB/s), and a Llama layer makes seven. The native GEMV (`kernels.native.decode_ops.gemv`) reads
plain row-major weights with a call cost of a few us, so q, k and v become one product over their weights stored
side by side, and gate and up another: four products a layer. The projections' own modules then read views of the
fused weight (no second copy); their packed weights still serve batches. MALoRA deltas are added per projection
into its columns of the fused output, so adapters work unchanged.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch
from torch import nn

from ..kernels.native.block_ops import BlockWeight, block_matmul
from ..kernels.native.decode_ops import BLOCK_WEIGHTS, GemvWeight, ProductArgs, gemv
from ..layers import MaloraLinear
from .block_linear import BlockLinear
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
class BlockProduct:
    """The weights of a fused product kept as GGUF blocks: one block weight per run of projections stored in the
    same format (one for a uniform file; a Q4_K_M file's q and k in Q4_K beside v in Q6_K make two), side by side."""

    segments: tuple[BlockWeight, ...]

    @property
    def in_features(self) -> int:
        return self.segments[0].in_features

    @property
    def out_features(self) -> int:
        return sum(segment.out_features for segment in self.segments)

    @classmethod
    def of(cls, bases: list[BlockLinear]) -> BlockProduct:
        """The bases' blocks side by side (a copy per run of one format); each base then reads its rows of it."""
        if len({base.in_features for base in bases}) != 1:
            raise ValueError("projections fused into one product must share their input width")
        runs: list[list[BlockLinear]] = []
        for base in bases:
            if runs and runs[-1][0].block_weight.format == base.block_weight.format:
                runs[-1].append(base)
            else:
                runs.append([base])
        return cls(tuple(_fuse_run(run) for run in runs))


def _fuse_run(run: list[BlockLinear]) -> BlockWeight:
    weights = [base.block_weight for base in run]
    if len(weights) == 1:
        return weights[0]
    blocks = torch.cat([w.blocks for w in weights])
    bias = None
    if any(w.bias is not None for w in weights):
        bias = torch.cat([w.bias if w.bias is not None else torch.zeros(w.out_features) for w in weights])
    first = 0
    for base, weight in zip(run, weights):
        end = first + weight.out_features
        base.use(BlockWeight(blocks[first:end], weight.format, weight.in_features,
                             None if bias is None else bias[first:end]))
        first = end
    return BlockWeight(blocks, weights[0].format, weights[0].in_features, bias)


@dataclass(frozen=True)
class FusedProduct:
    """One native product for a few rows over the weights of one or more projections of the same input."""

    weight: GemvWeight | BlockProduct
    parts: tuple[tuple[nn.Module, str, int, int], ...]  # (parent, attribute, first, end column) per projection

    @classmethod
    def of(cls, parent: nn.Module, names: list[str]) -> FusedProduct:
        """The product of `parent`'s projections `names` (e.g. a Llama attention's q_proj, k_proj, v_proj)."""
        bases = [base_of(parent._modules[name]) for name in names]
        parts, first = [], 0
        for name, base in zip(names, bases):
            parts.append((parent, name, first, first + base.out_features))
            first += base.out_features
        if any(isinstance(base, BlockLinear) for base in bases):
            if not all(isinstance(base, BlockLinear) for base in bases):
                raise ValueError("projections fused into one product must all be block weights or none")
            return cls(BlockProduct.of(bases), tuple(parts))  # type: ignore[arg-type]
        weights, scales = zip(*(_plain_weight(base) for base in bases))
        if len({w.dtype for w in weights}) != 1 or len({s is None for s in scales}) != 1:
            raise ValueError("projections fused into one product must share their weight format")
        fused = weights[0].contiguous() if len(weights) == 1 else torch.cat(weights)
        if len(weights) > 1:
            for (_, _, first, end), base in zip(parts, bases):
                _read_from(base, fused[first:end])
        fused_scales = None if scales[0] is None else torch.cat(scales).contiguous()
        bias = None
        if any(base.bias is not None for base in bases):
            bias = torch.cat([base.bias.detach().float() if base.bias is not None
                              else torch.zeros(base.out_features) for base in bases])
        return cls(GemvWeight(fused, fused_scales, bias), tuple(parts))

    @functools.cached_property
    def args(self) -> ProductArgs:
        """The product for the native decode layer (`struct Product`); its parts array lives as long as self."""
        weight = self.weight
        if isinstance(weight, GemvWeight):
            return ProductArgs.of(weight)
        if len(weight.segments) == 1:
            return ProductArgs.of_blocks(weight.segments[0])
        parts = (ProductArgs * len(weight.segments))(*(ProductArgs.of_blocks(s) for s in weight.segments))
        object.__setattr__(self, "_parts", parts)  # kept alive with the product: the layer reads it by address
        return ProductArgs(None, None, None, weight.in_features, weight.out_features, BLOCK_WEIGHTS, None,
                           ctypes.addressof(parts), len(parts))

    def __call__(self, x: torch.Tensor, threads: int) -> torch.Tensor:
        """[rows, out] in x's dtype, with the MALoRA delta of every projection wrapped by now (adapters wrap
        their target modules when first loaded) added into its columns."""
        y = torch.empty(x.shape[0], self.weight.out_features, dtype=x.dtype)
        if isinstance(self.weight, GemvWeight):
            gemv(x, self.weight, y, threads)
        else:
            first = 0
            for segment in self.weight.segments:
                block_matmul(x, segment, y[:, first:first + segment.out_features], threads)
                first += segment.out_features
        for parent, name, first, end in self.parts:
            module = parent._modules[name]
            if isinstance(module, MaloraLinear):
                module.add_bank_delta(y[:, first:end], x)
        return y
