"""The wrapped linear layer: `y = W0 x + MALoRA delta`.

Two ways to supply the delta, chosen by what is set on the layer:
- `adapter` (one `ModuleWeights`): the single-adapter reference path, plain readable torch; used by
  offline generation and as the oracle in tests (it runs in whatever dtype the model is in, float64
  included).
- `bank` plus the shared `BatchContext`: the serving path; each token of the packed batch uses its
  own adapter slot, and the kernel facade computes every token's delta in one batched call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters.format import ModuleWeights
from .kernels.dispatch import add_malora_delta, choose_backend
from .kernels.reference import malora_delta_dense
from .kernels.slots import RoutingLog, SlotBank, TokenSlots


@dataclass
class BatchContext:
    """Per-step adapter metadata shared by every wrapped layer of one model (set by the runner)."""

    token_slots: TokenSlots | None = None
    # [num_slots, n_max] per bank path: tokens routed to each expert, counted by the kernels themselves
    # (Triton on the GPU, the native kernel on the CPU).
    expert_counts: dict[str, torch.Tensor] = field(default_factory=dict)
    # The torch CPU path records its routing choices here instead and they are counted when harvested.
    routing_log: RoutingLog = field(default_factory=RoutingLog)
    count_experts: bool = False
    # The delta's backend (`kernels.dispatch.choose_backend`), resolved once per step; None: per call.
    backend: str | None = None


class MaloraLinear(nn.Module):
    """A base `nn.Linear` plus an optional MALoRA delta."""

    def __init__(self, base: nn.Linear, path: str, context: BatchContext) -> None:
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
            flat = x.reshape(-1, x.shape[-1])
            delta = malora_delta_dense(
                flat, w.S, w.G, w.P, w.B, spec.scale, spec.top_k, w.router_bias,
                spec.router_norm, spec.router_temperature,
            )
            return y + delta.reshape(*y.shape[:-1], -1).to(y.dtype)
        token_slots = self.context.token_slots
        if self.bank is not None and token_slots is not None and token_slots.any_adapter:
            flat_y = y.view(-1, y.shape[-1])
            backend = self.context.backend or choose_backend(x)
            counts = None
            if self.context.count_experts:
                deferred = backend == "cpu"  # the torch path defers its counting to a RoutingLog
                counts = self.context.routing_log if deferred else self.context.expert_counts.get(self.path)
            add_malora_delta(flat_y, x.reshape(-1, x.shape[-1]), self.bank, token_slots, counts, backend)
        return y

    def extra_repr(self) -> str:
        return f"path={self.path}, adapter={'set' if self.adapter is not None else 'none'}"
