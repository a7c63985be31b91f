"""Adapters resident in the model's batched slot tensors (the device tier).

Each slot holds one adapter version. A name points at its current slot; requests take a reference
on the slot they start with, so a reload (the new version goes to another slot) or an unload never
changes weights under a running request: the old slot is cleared when its last request ends.
When every slot is taken, or the adapters in slots would pass their memory budget, the least
recently used slot with no request and no pin is evicted.

A slot costs nothing until an adapter is in it: a module's bank holds a table row per slot and a
reference to each active adapter's packed module (`kernels.packed`). On the CPU the kernels read that
module where the host tier holds it, so activation copies no weights; on a GPU each bank copies the
module to the device. All of this runs on the engine thread, between steps.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters.format import MaloraAdapter
from ..context import StepContext
from ..kernels.packed import pack_adapter
from ..kernels.slot_bank import SlotBank
from ..kernels.token_slots import NO_SLOT
from ..layers import MaloraLinear
from ..patching import wrap_linears, wrapped_layers
from .errors import SlotMemoryError
from .routing_stats import RoutingStats

log = logging.getLogger(__name__)


class NoFreeSlotError(RuntimeError):
    """Every adapter slot holds an adapter that is in use or pinned (or their bytes fill the budget)."""

    def __init__(self, message: str, dropped_cache_keys: list[int] | None = None) -> None:
        super().__init__(message)
        self.dropped_cache_keys = dropped_cache_keys or []
        """Activations evicted before the attempt gave up: their cached K/V must still be forgotten."""


@dataclass
class SlotState:
    name: str
    version: int
    adapter: MaloraAdapter
    cache_key: int  # unique per activation: the prefix-cache namespace of this slot's K/V
    num_bytes: int  # of the adapter's packed weights
    device_bytes: int = 0  # of the copies the banks made of them (a GPU); 0 where they are read in place
    pinned: bool = False
    refs: int = 0  # requests running on this slot
    retired: bool = False  # replaced or unloaded: cleared once `refs` reaches 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class AdapterSlots:
    model: nn.Module
    context: StepContext  # handed to the layers this wraps
    routing: RoutingStats  # the kernels' routing counters, harvested here
    num_slots: int
    slots: list[SlotState | None] = field(default_factory=list)
    current: dict[str, int] = field(default_factory=dict)  # name -> slot of its newest version
    num_evictions: int = 0
    num_activations: int = 0
    """Adapter versions written into a slot (cold activations: a version already in its slot is not counted)."""
    activation_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=4096))
    """Seconds of each activation (packing, evictions, bank writes), drained by the metrics layer from another
    thread: a deque, whose append and popleft are atomic."""
    memory_budget: int | None = None
    """Bytes of adapters in slots at most (each counted once, at its packed size); LRU eviction keeps them within."""

    def __post_init__(self) -> None:
        param = next(self.model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.slots = [None] * self.num_slots
        self._activations = itertools.count(1)
        # Expert routing counts harvested from slots being cleared, until the next `harvest_expert_counts`.
        self._harvested: dict[str, list[int]] = {}
        # Routing counts collected from the kernels' counters and the RoutingLog, not yet attributed to
        # an adapter name: [num_slots, most experts seen] int64, on the CPU.
        self._pending = torch.zeros(self.num_slots, 0, dtype=torch.int64)
        # The same, layer by layer (the kernels count per layer; the torch path's RoutingLog only in total):
        # path -> [num_slots, width], and per adapter name once attributed (`harvest_layer_counts`).
        self._pending_layers: dict[str, torch.Tensor] = {}
        self._harvested_layers: dict[str, dict[str, list[int]]] = {}
        self._layers: dict[str, MaloraLinear] | None = None
        # Bumped at every write into the banks (and every wrap of a layer): what was derived from them before
        # (the fast decode path's kernel calls) is stale after.
        self.generation = 0

    # ---- queries ----
    def state(self, name: str) -> SlotState | None:
        slot = self.current.get(name)
        return None if slot is None else self.slots[slot]

    def is_resident(self, name: str, version: int | None = None) -> bool:
        state = self.state(name)
        return state is not None and (version is None or state.version == version)

    def layers(self) -> dict[str, MaloraLinear]:
        """The model's wrapped layers; walking the model's modules costs ~1 ms, so the result is kept
        until `_write` wraps more."""
        if self._layers is None:
            self._layers = wrapped_layers(self.model)
        return self._layers

    # ---- references held by requests ----
    def acquire(self, name: str | None) -> tuple[int, int | None]:
        """(slot, cache key) for a new request on `name`'s current version; NO_SLOT for the base model."""
        if name is None:
            return NO_SLOT, None
        slot = self.current[name]
        state = self.slots[slot]
        assert state is not None
        state.refs += 1
        state.last_used = time.monotonic()
        return slot, state.cache_key

    def release(self, slot: int) -> list[int]:
        """Drop a request's reference; returns cache keys whose slot was cleared (to drop from the prefix cache)."""
        if slot == NO_SLOT:
            return []
        state = self.slots[slot]
        assert state is not None and state.refs > 0, f"release of unreferenced slot {slot}"
        state.refs -= 1
        state.last_used = time.monotonic()
        if state.retired and state.refs == 0:
            return [self._empty_slot(slot)]
        return []

    # ---- activation ----
    def pick_slot(self) -> int:
        """A free slot, else the least recently used evictable one; raises NoFreeSlotError."""
        for slot, state in enumerate(self.slots):
            if state is None:
                return slot
        idle = [(s.last_used, slot) for slot, s in enumerate(self.slots)
                if s is not None and s.refs == 0 and not s.pinned]
        if not idle:
            raise NoFreeSlotError(f"all {self.num_slots} adapter slots hold adapters in use or pinned")
        return min(idle)[1]

    @torch.no_grad()
    def activate(
        self, name: str, adapter: MaloraAdapter, version: int = 0, pinned: bool = False
    ) -> tuple[int, list[int]]:
        """Put `adapter` in a slot as `name`'s current version (packed first, unless the host tier packed it).

        Returns (slot, cache keys dropped): keys of activations evicted or retired here, whose
        cached K/V blocks must be forgotten.
        """
        state = self.state(name)
        if state is not None and state.version == version:
            state.pinned = state.pinned or pinned
            return self.current[name], []
        started = time.perf_counter()
        adapter = pack_adapter(adapter)
        num_bytes = adapter.num_bytes()
        dropped: list[int] = []
        try:
            self._make_room(name, num_bytes, dropped)
            slot = self.pick_slot()
        except NoFreeSlotError as exc:
            exc.dropped_cache_keys = dropped + exc.dropped_cache_keys
            raise
        evicted = self.slots[slot]
        if evicted is not None:
            dropped.append(self._evict(slot))
        device_bytes = self._write(slot, adapter)
        previous = self.current.get(name)
        self.slots[slot] = SlotState(name, version, adapter, next(self._activations), num_bytes, device_bytes,
                                     pinned=pinned)
        self.current[name] = slot
        if previous is not None:
            dropped.extend(self._retire(previous))
        self.num_activations += 1
        self.activation_seconds.append(time.perf_counter() - started)
        log.info("adapter %s v%d active in slot %d (%d modules, %.1f MiB)", name, version, slot,
                 len(adapter.modules), num_bytes / 2**20)
        return slot, dropped

    @property
    def active_bytes(self) -> int:
        """Bytes of the adapters in slots (packed size, each counted once; retired ones still running included).
        Safe to read from another thread (a snapshot of the slot list)."""
        return sum(state.num_bytes for state in list(self.slots) if state is not None)

    @property
    def device_copy_bytes(self) -> int:
        """Bytes the banks hold as copies of adapters in slots (on a GPU); 0 on the CPU, where they read in place."""
        return sum(state.device_bytes for state in list(self.slots) if state is not None)

    def _evict(self, slot: int) -> int:
        """Empty an idle slot whose adapter is still current; returns its cache key."""
        evicted = self.slots[slot]
        assert evicted is not None
        if self.current.get(evicted.name) == slot:
            del self.current[evicted.name]
            self.num_evictions += 1
            log.info("evicted adapter %s from slot %d", evicted.name, slot)
        return self._empty_slot(slot)

    def _make_room(self, name: str, num_bytes: int, dropped: list[int]) -> None:
        """Evict least recently used idle adapters until `num_bytes` more fit the memory budget; the cache keys
        of those evicted go to `dropped` (also when it then gives up with NoFreeSlotError)."""
        budget = self.memory_budget
        if budget is None:
            return
        if num_bytes > budget:
            raise SlotMemoryError(f"adapter {name!r} needs {num_bytes / 2**20:.1f} MiB, more than the whole budget "
                                  f"for adapters in slots ({budget / 2**20:.0f} MiB, --adapter-bank-memory)",
                                  param="model")
        while self.active_bytes + num_bytes > budget:
            idle = [(s.last_used, slot) for slot, s in enumerate(self.slots)
                    if s is not None and s.refs == 0 and not s.pinned]
            if not idle:  # a request waits for running ones to end, as for a free slot
                raise NoFreeSlotError(
                    f"adapter {name!r} ({num_bytes / 2**20:.1f} MiB) does not fit the budget for adapters in slots "
                    f"({budget / 2**20:.0f} MiB, --adapter-bank-memory) until adapters in use there are released")
            dropped.append(self._evict(min(idle)[1]))

    def deactivate(self, name: str) -> list[int]:
        """Stop serving `name` to new requests; its slot is cleared once running requests end."""
        slot = self.current.pop(name)
        return self._retire(slot)

    def _retire(self, slot: int) -> list[int]:
        state = self.slots[slot]
        assert state is not None
        state.retired = True
        return [self._empty_slot(slot)] if state.refs == 0 else []

    def harvest_expert_counts(self) -> dict[str, list[int]]:
        """Tokens routed to each expert since the last harvest, by adapter name (summed over layers).

        Reads and zeroes the kernels' counters; call it at most about once a second.
        """
        self._collect_counts()
        for slot, state in enumerate(self.slots):
            if state is not None:
                self._harvest_slot(slot, state)
        harvested, self._harvested = self._harvested, {}
        return harvested

    def harvest_layer_counts(self) -> dict[str, dict[str, list[int]]]:
        """Per adapter name and adapted layer, tokens routed to each expert, as attributed by the harvests since
        the last call (call it right after `harvest_expert_counts`). Layers the torch CPU path ran are absent:
        it records choices without their layer."""
        harvested, self._harvested_layers = self._harvested_layers, {}
        return harvested

    @torch.inference_mode()
    def _collect_counts(self) -> None:
        """Move every layer's counters (and the torch CPU path's RoutingLog) into `_pending`, all slots
        at once: one sum per counter width, not a few ops per layer and slot (a harvest a second on
        120 layers and 8 slots cost ~2% of the engine's steps that way)."""
        by_width: dict[int, list[tuple[str, torch.Tensor]]] = {}
        for path, counts in self.routing.counts.items():
            by_width.setdefault(counts.shape[1], []).append((path, counts))
        collected = []
        for group in by_width.values():
            stacked = torch.stack([counts for _, counts in group]).cpu()  # [layers, num_slots, width]
            collected.append(stacked.sum(0))
            for (path, counts), layer in zip(group, stacked):
                self._pending_layers[path] = _add_widths(self._pending_layers.get(path), layer)
                counts.zero_()
        collected.append(self.routing.log.drain(self.num_slots))
        width = max(c.shape[1] for c in collected)
        if self._pending.shape[1] < width:
            grown = torch.zeros(self.num_slots, width, dtype=torch.int64)
            grown[:, :self._pending.shape[1]] = self._pending
            self._pending = grown
        for counts in collected:
            self._pending[:, :counts.shape[1]] += counts

    @torch.inference_mode()  # `_pending` may have been grown in inference mode
    def _harvest_slot(self, slot: int, state: SlotState) -> None:
        """Attribute `slot`'s collected counts to its adapter's name."""
        n = max((w.spec.num_experts for w in state.adapter.modules.values()), default=self._pending.shape[1])
        merged = self._harvested.setdefault(state.name, [])
        merged.extend([0] * (n - len(merged)))  # versions of one name may have different N
        for expert, value in enumerate(self._pending[slot, :n].tolist()):
            merged[expert] += value
        self._pending[slot] = 0
        for path, pending in self._pending_layers.items():
            counts = pending[slot, :n].tolist()
            if any(counts):
                kept = self._harvested_layers.setdefault(state.name, {}).setdefault(path, [0] * n)
                kept.extend([0] * (n - len(kept)))
                for expert, value in enumerate(counts):
                    kept[expert] += value
                pending[slot] = 0

    def _empty_slot(self, slot: int) -> int:
        """Free `slot`: its routing counts harvested, every bank's slot deactivated; returns its cache key."""
        state = self.slots[slot]
        assert state is not None
        self.generation += 1
        self._collect_counts()
        self._harvest_slot(slot, state)
        for layer in self.layers().values():
            if layer.bank is not None:
                layer.bank.deactivate_slot(slot)
        self.slots[slot] = None
        return state.cache_key

    def _write(self, slot: int, adapter: MaloraAdapter) -> int:
        """Point every layer's slot at `adapter`'s modules; returns the bytes of the copies the banks made."""
        self.generation += 1
        copied = 0
        if not self.layers().keys() >= adapter.modules.keys():
            wrap_linears(self.model, adapter.modules, self.context)
            self._layers = None
        for path, layer in self.layers().items():
            weights = adapter.modules.get(path)
            if weights is None:
                if layer.bank is not None:
                    layer.bank.deactivate_slot(slot)
                continue
            if layer.bank is None:
                # On a GPU the bank keeps device copies in the model's dtype; on the CPU it reads in place.
                storage = None if self.device.type == "cpu" else self.dtype
                layer.bank = SlotBank(layer.in_features, layer.out_features, self.num_slots, self.device, storage)
            self._count_experts(layer.path, weights.spec.num_experts)
            layer.bank.set_slot(slot, weights)
            if layer.bank.module(slot) is not weights.packed:
                copied += layer.bank.module(slot).num_bytes
        return copied

    def _count_experts(self, path: str, num_experts: int) -> None:
        """The kernels' routing counters of a layer, [num_slots, N] for the most experts it has seen (the torch
        CPU path records to the RoutingLog instead); allocated even while counting is off, so that turning it
        on later counts."""
        old = self.routing.counts.get(path)
        if old is not None and old.shape[1] >= num_experts:
            return
        counts = torch.zeros(self.num_slots, num_experts, dtype=torch.int64, device=self.device)
        if old is not None:
            counts[:, :old.shape[1]] = old
        self.routing.counts[path] = counts


def _add_widths(kept: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """kept + new over [num_slots, width] counts whose widths may differ (a layer's counters grow when an adapter
    with more experts arrives)."""
    if kept is None:
        return new.clone()
    width = max(kept.shape[1], new.shape[1])
    total = torch.zeros(kept.shape[0], width, dtype=kept.dtype)
    total[:, :kept.shape[1]] += kept
    total[:, :new.shape[1]] += new
    return total
