"""Adapters resident in the model's batched slot tensors: name -> slot, and the per-layer banks.

Banks are sized by what is loaded: when an adapter with a larger d, r or N (or a module no resident
adapter targeted before) arrives, the affected banks are re-allocated larger and the old slots copied
over. That happens between steps, so the step loop never sees a half-written bank.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters.format import MaloraAdapter
from ..kernels.slots import NO_SLOT, SlotBank
from ..layers import BatchContext, MaloraLinear
from ..patching import wrap_linears

log = logging.getLogger(__name__)


class NoFreeSlotError(RuntimeError):
    """Every adapter slot holds an adapter."""


@dataclass
class ResidentAdapter:
    name: str
    slot: int
    adapter: MaloraAdapter
    version: int = 0


@dataclass
class AdapterSlots:
    """Which adapter sits in which slot of the model's banks."""

    model: nn.Module
    context: BatchContext
    num_slots: int
    by_name: dict[str, ResidentAdapter] = field(default_factory=dict)

    def __post_init__(self) -> None:
        param = next(self.model.parameters())
        self.dtype = param.dtype
        self.device = param.device

    def slot_of(self, name: str | None) -> int:
        if name is None:
            return NO_SLOT
        return self.by_name[name].slot

    def free_slots(self) -> list[int]:
        used = {r.slot for r in self.by_name.values()}
        return [s for s in range(self.num_slots) if s not in used]

    def layers(self) -> dict[str, MaloraLinear]:
        return {p: m for p, m in self.model.named_modules() if isinstance(m, MaloraLinear)}

    @torch.no_grad()
    def activate(self, name: str, adapter: MaloraAdapter, slot: int | None = None) -> ResidentAdapter:
        """Copy `adapter` into a slot (a free one, or `slot`, replacing what was there)."""
        if slot is None:
            if name in self.by_name:
                slot = self.by_name[name].slot
            else:
                free = self.free_slots()
                if not free:
                    raise NoFreeSlotError(f"all {self.num_slots} adapter slots are in use")
                slot = free[0]
        wrap_linears(self.model, adapter.modules, self.context)
        layers = self.layers()
        for path, layer in layers.items():
            weights = adapter.modules.get(path)
            if weights is None:
                if layer.bank is not None:
                    layer.bank.clear_slot(slot)
                continue
            weights = weights.to(self.device, self.dtype)
            layer.bank = self._bank_that_fits(layer, weights)
            layer.bank.set_slot(slot, weights)
        previous = self.by_name.get(name)
        resident = ResidentAdapter(name, slot, adapter, version=previous.version + 1 if previous else 0)
        for other in [n for n, r in self.by_name.items() if r.slot == slot and n != name]:
            del self.by_name[other]
        self.by_name[name] = resident
        log.info("adapter %s active in slot %d (%d modules)", name, slot, len(adapter.modules))
        return resident

    @torch.no_grad()
    def deactivate(self, name: str) -> None:
        resident = self.by_name.pop(name)
        for layer in self.layers().values():
            if layer.bank is not None:
                layer.bank.clear_slot(resident.slot)

    def _bank_that_fits(self, layer: MaloraLinear, weights) -> SlotBank:
        bank = layer.bank
        spec = weights.spec
        if bank is not None and bank.fits(weights) is None:
            return bank
        d_max, r_max, n_max = bank.maxima if bank is not None else (0, 0, 0)
        grown = SlotBank.allocate(
            self.num_slots, layer.in_features, layer.out_features,
            max(d_max, spec.d), max(r_max, spec.r), max(n_max, spec.num_experts), self.dtype, self.device,
        )
        if bank is not None:
            _copy_bank(bank, grown)
        if self.context.count_experts:
            self.context.expert_counts[layer.path] = torch.zeros(self.num_slots, grown.maxima[2], dtype=torch.int64,
                                                                 device=self.device)
        return grown


def _copy_bank(old: SlotBank, new: SlotBank) -> None:
    d, r, n = old.maxima
    new.S[:, :d].copy_(old.S)
    new.G[:, :n].copy_(old.G)
    new.router_bias[:, :n].copy_(old.router_bias)
    new.P[:, :n, :r, :d].copy_(old.P)
    new.B[:, :n, :, :r].copy_(old.B)
    for name in ("scale", "top_k", "router_temperature", "softmax_first"):
        getattr(new, name).copy_(getattr(old, name))
    new.infos = list(old.infos)
