"""Per-module adapter slots: a `SlotBank` holds, for one target linear layer, which adapter module each
slot serves and a table of where its weights lie, so that one kernel call serves tokens of many adapters.

No weights are copied into the bank, and nothing is padded: each slot points at its adapter's packed
module (`kernels.packed`), on the CPU the very buffer the host tier holds. A bank with `storage_dtype`
or on another device (CUDA) keeps its own copy of each active module there instead (activation copies
that adapter's bytes, no more).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..adapters.format import ModuleWeights
from .packed import DTYPE_CODES, PackedModule, packed

MAX_DERIVED = 256  # cached derived values per bank (group sets seen since the last slot write)
META_FIELDS = 5  # d, r, N, top_k, dtype code


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
    dtype: torch.dtype


@dataclass
class SlotTables:
    """What the kernels read per slot, as numpy arrays (a slot write is a few element stores, no torch op)
    and tensors over the same memory on the CPU, or copies on the bank's device refreshed after writes."""

    addresses: np.ndarray  # [num_slots, 4] int64: sgt, pt, bt, bias (kernels/packed.py); 0 when inactive
    meta: np.ndarray  # [num_slots, 5] int32: d, r, N, top_k (0: inactive), dtype code
    fmeta: np.ndarray  # [num_slots, 3] float32: scale, 1 / router temperature, softmax-then-top-k

    @classmethod
    def empty(cls, num_slots: int) -> SlotTables:
        return cls(np.zeros((num_slots, 4), np.int64), np.zeros((num_slots, META_FIELDS), np.int32),
                   np.zeros((num_slots, 3), np.float32))

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        host = tuple(torch.from_numpy(a) for a in (self.addresses, self.meta, self.fmeta))
        return host if device.type == "cpu" else tuple(t.to(device) for t in host)  # type: ignore[return-value]


@dataclass
class SlotBank:
    """The adapter module of each of `num_slots` slots for one target linear layer (d_in -> d_out).

    A slot whose adapter does not target this module is inactive (`infos[slot] is None`) and its tokens
    get no delta here. An inactive slot holds no reference to any weights.
    """

    d_in: int
    d_out: int
    num_slots: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    storage_dtype: torch.dtype | None = None
    """None: every adapter is read in its own dtype where it lies. Else each active module is copied to
    `device` in this dtype (what a GPU bank does: the kernel reads one dtype from device memory)."""
    infos: list[SlotInfo | None] = field(init=False)
    modules: list[PackedModule | None] = field(init=False, repr=False)
    tables: SlotTables = field(init=False, repr=False)
    _copied: list[bool] = field(init=False, repr=False)  # per slot: the bank made its own copy of the module
    # Values computed from the slots (active slots, maxima, a group's routing constants, the kernels'
    # views of the tables), dropped at every slot write.
    _derived: dict[Hashable, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.infos = [None] * self.num_slots
        self.modules = [None] * self.num_slots
        self.tables = SlotTables.empty(self.num_slots)
        self._copied = [False] * self.num_slots

    def derived(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """`compute()` cached under `key` until the next slot write (bounded: cleared when full)."""
        value = self._derived.get(key)
        if value is None:
            if len(self._derived) >= MAX_DERIVED:
                self._derived.clear()
            value = self._derived[key] = compute()
        return value

    # ---- what the kernels read ----
    def table_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(addresses, meta, fmeta) as tensors on the bank's device."""
        return self.derived("tables", lambda: self.tables.tensors(self.device))

    @property
    def active_slots(self) -> tuple[int, ...]:
        return self.derived("active", lambda: tuple(s for s, info in enumerate(self.infos) if info is not None))

    @property
    def maxima(self) -> tuple[int, int, int]:
        """(d_max, r_max, n_max) over the active slots (0 when none is)."""

        def compute() -> tuple[int, int, int]:
            infos = [i for i in self.infos if i is not None]
            return (max((i.d for i in infos), default=0), max((i.r for i in infos), default=0),
                    max((i.num_experts for i in infos), default=0))

        return self.derived("maxima", compute)

    def module(self, slot: int) -> PackedModule:
        """The packed module of an active slot."""
        module = self.modules[slot]
        if module is None:
            raise ValueError(f"slot {slot} is inactive")
        return module

    def copied_bytes(self) -> int:
        """Bytes of the modules this bank holds copies of (a GPU bank, or one with `storage_dtype`); on the
        CPU every slot points at its adapter's own buffer and this is 0."""
        return sum(m.num_bytes for m, copied in zip(self.modules, self._copied) if m is not None and copied)

    # ---- slot writes (between engine steps) ----
    def fits(self, weights: ModuleWeights) -> str | None:
        """None when `weights` fit this bank's module, else a message saying why not."""
        if weights.d_in != self.d_in or weights.d_out != self.d_out:
            return f"module is {weights.d_out}x{weights.d_in}, bank is {self.d_out}x{self.d_in}"
        return None

    @torch.no_grad()
    def set_slot(self, slot: int, weights: ModuleWeights) -> None:
        """Point `slot` at `weights`' packed module: on the CPU, without copying when they are packed
        (`kernels.packed.pack_adapter`); otherwise a packed copy is made (on the bank's device and in
        its storage dtype where those differ)."""
        problem = self.fits(weights)
        if problem is not None:
            raise ValueError(problem)
        source = packed(weights)
        module = source.to(self.device, self.storage_dtype or source.dtype)
        spec = weights.spec
        self.modules[slot] = module
        self._copied[slot] = module is not weights.packed
        self.infos[slot] = SlotInfo(
            d=spec.d, r=spec.r, num_experts=spec.num_experts, top_k=spec.top_k, scale=spec.scale,
            router_temperature=spec.router_temperature, softmax_first=module.softmax_first,
            has_router_bias=module.has_router_bias, dtype=module.dtype,
        )
        tables = self.tables
        tables.addresses[slot] = module.addresses()
        tables.meta[slot] = (spec.d, spec.r, spec.num_experts, spec.top_k, DTYPE_CODES[module.dtype])
        tables.fmeta[slot] = (spec.scale, 1.0 / spec.router_temperature, float(module.softmax_first))
        self._derived.clear()

    def deactivate_slot(self, slot: int) -> None:
        """Make `slot` inactive and drop its reference to the weights (the kernels skip top_k 0)."""
        if self.infos[slot] is None:
            return
        self.infos[slot] = None
        self.modules[slot] = None
        self._copied[slot] = False
        self.tables.addresses[slot] = 0
        self.tables.meta[slot] = 0
        self.tables.fmeta[slot] = 0.0
        self._derived.clear()
