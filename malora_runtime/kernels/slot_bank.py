"""Per-module stacked adapter weights: a `SlotBank` holds, for one target linear layer, the weights of every
adapter resident in the engine, padded to common maxima so that one batched op (or one kernel launch) serves
tokens of different adapters; each kernel may keep its own layout of the same weights in step with it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from ..adapters.format import ModuleWeights
from .reference import ROUTER_SOFTMAX_TOPK

MAX_DERIVED = 256  # cached derived values per bank (group sets seen since the last slot write)


class SlotLayout(Protocol):
    """A kernel's own copy of a bank's weights (see `SlotBank.layout`)."""

    def write_slot(self, bank: SlotBank, slot: int) -> None:
        """Bring `slot` in step with the bank (called after every set_slot / zero_slot)."""


LayoutT = TypeVar("LayoutT", bound=SlotLayout)


@dataclass
class SlotInfo:
    """Host-side copy of one slot's sizes, so fast paths never read them back from the device."""

    d: int
    r: int
    num_experts: int
    top_k: int
    scale: float
    router_temperature: float
    softmax_first: bool
    has_router_bias: bool


@dataclass(frozen=True)
class SlotParams:
    """Per-slot routing settings on the device (see `SlotBank.params`)."""

    scale: torch.Tensor  # [num_slots] float32, 0 for inactive slots
    top_k: torch.Tensor  # [num_slots] int32, 0 for inactive slots
    router_temperature: torch.Tensor  # [num_slots] float32, 1 for inactive slots
    softmax_first: torch.Tensor  # [num_slots] bool: router_norm == "softmax_topk"


@dataclass
class SlotBank:
    """Padded weights of one target module for `num_slots` adapter slots.

    Padding is exact: padded rows of S, P and B of an active slot are zero, and padded experts have
    a router bias of -inf so they are never chosen. An inactive slot's weights are never read (a
    released slot keeps stale ones). A slot whose adapter does not target this module is inactive
    (`infos[slot] is None`) and its tokens get no delta here.
    """

    S: torch.Tensor  # [num_slots, d_max, d_in]
    G: torch.Tensor  # [num_slots, n_max, d_in]
    router_bias: torch.Tensor  # [num_slots, n_max], -inf on padded experts
    P: torch.Tensor  # [num_slots, n_max, r_max, d_max]
    B: torch.Tensor  # [num_slots, n_max, d_out, r_max]
    infos: list[SlotInfo | None] = field(default_factory=list)  # the slots' sizes and routing settings
    # Layouts of the same weights for the CPU paths ([S; G] for kernels.cpu, B^T for it and the native
    # kernel, whose own layout is in `_layouts`), built on first use and from then on kept in step by
    # set_slot / zero_slot one slot at a time: a swap copies one adapter, not the bank.
    _stacked_sg: torch.Tensor | None = field(default=None, repr=False)
    _transposed_b: torch.Tensor | None = field(default=None, repr=False)
    _layouts: dict[str, SlotLayout] = field(default_factory=dict, repr=False)
    # Values computed from `infos` (active slots, a group's routing constants), dropped at every slot
    # write: the fast path would otherwise recompute them in Python for every module of every step.
    _derived: dict[Hashable, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def allocate(
        cls,
        num_slots: int,
        d_in: int,
        d_out: int,
        d_max: int,
        r_max: int,
        n_max: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> SlotBank:
        def zeros(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dt, device=device)

        return cls(
            S=zeros(num_slots, d_max, d_in),
            G=zeros(num_slots, n_max, d_in),
            router_bias=torch.full((num_slots, n_max), float("-inf"), dtype=dtype, device=device),
            P=zeros(num_slots, n_max, r_max, d_max),
            B=zeros(num_slots, n_max, d_out, r_max),
            infos=[None] * num_slots,
        )

    @property
    def num_slots(self) -> int:
        return self.S.shape[0]

    @property
    def d_in(self) -> int:
        return self.S.shape[2]

    @property
    def d_out(self) -> int:
        return self.B.shape[2]

    @staticmethod
    def estimated_bytes(num_slots: int, d_in: int, d_out: int, d_max: int, r_max: int, n_max: int,
                        dtype: torch.dtype, device: torch.device | str) -> int:
        """Memory of a bank of these sizes: its own S, G, bias, P and B, plus the copies the kernels keep of
        them (on the CPU: [S; G], B^T and the native kernel's layout, about twice the bank again)."""
        per_slot = d_max * d_in + n_max * d_in + n_max + n_max * r_max * d_max + n_max * d_out * r_max
        copies = 3 if torch.device(device).type == "cpu" else 1
        return copies * num_slots * per_slot * dtype.itemsize

    @property
    def maxima(self) -> tuple[int, int, int]:
        """(d_max, r_max, n_max)."""
        return self.S.shape[1], self.P.shape[2], self.P.shape[1]

    def stacked_sg(self) -> torch.Tensor:
        """[S; G] per slot, [num_slots, d_max + n_max, d_in]: the shared projection and the router
        logits come from one product over x (docs/malora.md: the fused first step)."""
        if self._stacked_sg is None:
            with torch.inference_mode(False):  # a normal tensor: set_slot updates it outside inference mode
                self._stacked_sg = torch.cat([self.S, self.G], dim=1)
        return self._stacked_sg

    def transposed_b(self) -> torch.Tensor:
        """B with each B_t transposed, [num_slots, n_max, r_max, d_out], in float32: every row of
        B_t^T is a contiguous row of one table, which the CPU path reads with embedding_bag."""
        if self._transposed_b is None:
            with torch.inference_mode(False):
                self._transposed_b = self.B.transpose(-1, -2).to(torch.float32).contiguous()
        return self._transposed_b

    def layout(self, name: str, build: Callable[[SlotBank], LayoutT]) -> LayoutT:
        """The layout `name`, built by `build(bank)` on first use and from then on kept in step by every
        slot write (`write_slot`), like the two above."""
        layout = self._layouts.get(name)
        if layout is None:
            with torch.inference_mode(False):  # normal tensors: slot writes update them outside inference mode
                layout = self._layouts[name] = build(self)
        return layout  # type: ignore[return-value]

    def derived(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """`compute()` cached under `key` until the next slot write (bounded: cleared when full)."""
        value = self._derived.get(key)
        if value is None:
            if len(self._derived) >= MAX_DERIVED:
                self._derived.clear()
            value = self._derived[key] = compute()
        return value

    def params(self) -> SlotParams:
        """The slots' routing settings as tensors on the bank's device, for kernels that read them per
        token; built from `infos` once per slot write (a swap writes no per-slot scalars)."""

        def compute() -> SlotParams:
            infos, device = self.infos, self.S.device
            return SlotParams(
                scale=torch.tensor([i.scale if i else 0.0 for i in infos], dtype=torch.float32, device=device),
                top_k=torch.tensor([i.top_k if i else 0 for i in infos], dtype=torch.int32, device=device),
                router_temperature=torch.tensor([i.router_temperature if i else 1.0 for i in infos],
                                                dtype=torch.float32, device=device),
                softmax_first=torch.tensor([bool(i and i.softmax_first) for i in infos], dtype=torch.bool,
                                           device=device),
            )

        return self.derived("params", compute)

    @property
    def active_slots(self) -> tuple[int, ...]:
        return self.derived("active", lambda: tuple(s for s, info in enumerate(self.infos) if info is not None))

    def _sync_layouts(self, slot: int) -> None:
        if self._stacked_sg is not None:
            d_max = self.S.shape[1]
            self._stacked_sg[slot, :d_max].copy_(self.S[slot])
            self._stacked_sg[slot, d_max:].copy_(self.G[slot])
        if self._transposed_b is not None:
            self._transposed_b[slot].copy_(self.B[slot].transpose(-1, -2))
        for layout in self._layouts.values():
            layout.write_slot(self, slot)

    def fits(self, weights: ModuleWeights) -> str | None:
        """None when `weights` fit this bank, else a message saying which limit they exceed."""
        spec = weights.spec
        d_max, r_max, n_max = self.maxima
        if weights.d_in != self.d_in or weights.d_out != self.d_out:
            return f"module is {weights.d_out}x{weights.d_in}, bank is {self.d_out}x{self.d_in}"
        for label, value, limit in (("d", spec.d, d_max), ("r", spec.r, r_max), ("N", spec.num_experts, n_max)):
            if value > limit:
                return f"{label}={value} exceeds the engine's maximum {limit}"
        return None

    @torch.no_grad()
    def set_slot(self, slot: int, weights: ModuleWeights) -> None:
        """Copy one adapter module into `slot`, zeroing the padding."""
        problem = self.fits(weights)
        if problem is not None:
            raise ValueError(problem)
        spec = weights.spec
        d, r, n = spec.d, spec.r, spec.num_experts
        if (d, r, n) != self.maxima:  # padding to zero; a full-size adapter overwrites every element
            self._zero_weights(slot)
        self.S[slot, :d].copy_(weights.S)
        self.G[slot, :n].copy_(weights.G)
        self.router_bias[slot, :n] = 0.0 if weights.router_bias is None else weights.router_bias.to(self.G.dtype)
        self.P[slot, :n, :r, :d].copy_(weights.P)
        self.B[slot, :n, :, :r].copy_(weights.B)
        self.infos[slot] = SlotInfo(
            d=d, r=r, num_experts=n, top_k=spec.top_k, scale=spec.scale,
            router_temperature=spec.router_temperature,
            softmax_first=spec.router_norm == ROUTER_SOFTMAX_TOPK,
            has_router_bias=weights.router_bias is not None,
        )
        self._sync_layouts(slot)
        self._derived.clear()

    @torch.no_grad()
    def zero_slot(self, slot: int) -> None:
        """Make `slot` inactive and zero its weights."""
        self._zero_weights(slot)
        self._sync_layouts(slot)
        self._derived.clear()

    @torch.no_grad()
    def deactivate_slot(self, slot: int) -> None:
        """Make `slot` inactive without rewriting its weights (the cheap path of an unload or swap,
        which runs between engine steps): no token is routed to a released slot, its scale and top_k
        in `params()` are 0 for kernels that read them per token, and `set_slot` writes every element
        it needs."""
        if self.infos[slot] is None:
            return
        self.infos[slot] = None
        self._derived.clear()

    def _zero_weights(self, slot: int) -> None:
        self.S[slot].zero_()
        self.G[slot].zero_()
        self.router_bias[slot].fill_(float("-inf"))
        self.P[slot].zero_()
        self.B[slot].zero_()
        self.infos[slot] = None
