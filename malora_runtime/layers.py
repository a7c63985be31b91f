"""The wrapped linear layer: `y = W0 x + MALoRA delta`.

Two ways to supply the delta, chosen by what is set on the layer:
- `adapter` (one `ModuleWeights`): the single-adapter reference path, plain readable torch; used by
  offline generation and as the oracle in tests (it runs in whatever dtype the model is in, float64
  included).
- `bank` plus the shared `StepContext`: the serving path; each token of the packed batch uses its
  own adapter slot, and the kernel facade computes every token's delta in one batched call.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters.format import ModuleWeights
from .context import StepContext
from .kernels.dispatch import add_malora_delta, choose_backend
from .kernels.reference import malora_delta_dense
from .kernels.slot_bank import SlotBank


class MaloraLinear(nn.Module):
    """A base `nn.Linear` plus an optional MALoRA delta."""

    def __init__(self, base: nn.Linear, path: str, context: StepContext) -> None:
        super().__init__()
        self.base = base
        self.path = path
        self.context = context
        self.adapter: ModuleWeights | None = None
        self.bank: SlotBank | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.adapter is not None:
            w = self.adapter
            spec = w.spec
            flat = x.reshape(-1, x.shape[-1]).to(w.S.dtype)  # the adapter's dtype: float32 over bfloat16 as served
            delta = malora_delta_dense(
                flat, w.S, w.G, w.P, w.B, spec.scale, spec.top_k, w.router_bias,
                spec.router_norm, spec.router_temperature,
            )
            # One rounding into y's dtype, as the kernels add a float32 delta into bfloat16 rows.
            return (y.to(delta.dtype) + delta.reshape(*y.shape[:-1], -1)).to(y.dtype)
        self.add_bank_delta(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]))
        return y

    def add_bank_delta(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """The serving path's delta: y [T, d_out] += every token's delta from its slot (x [T, d_in]); y may be a
        column range of a wider product (the fast decode path's fused q, k, v)."""
        step = self.context
        token_slots = step.token_slots
        if self.bank is not None and token_slots is not None and token_slots.any_adapter:
            backend = step.backend or choose_backend(x)
            counts = step.routing.sink(self.path, backend) if step.routing is not None else None
            add_malora_delta(y, x, self.bank, token_slots, counts, backend)

    def extra_repr(self) -> str:
        return f"path={self.path}, adapter={'set' if self.adapter is not None else 'none'}"
