"""Which adapter slot each token of a packed batch uses: built once per engine step, shared by every layer."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

NO_SLOT = -1  # a token on the base model: no adapter delta


@dataclass
class TokenSlots:
    """Which adapter slot each token of a packed batch uses, with grouping computed once per step.

    slots:    [T] int64, NO_SLOT (-1) for tokens on the base model
    order:    [T'] int64, indices of adapter tokens sorted by slot (stable), T' = adapter tokens
    segments: (slot, start, end) over `order`, one per distinct slot present
    segment_rows: per segment, the batch row of its first token when its tokens are consecutive
              rows of the batch (a prefill's prompt), else None: such a segment is a slice of x and y
    """

    slots: torch.Tensor
    order: torch.Tensor
    segments: list[tuple[int, int, int]]
    segment_rows: list[int | None] = field(default_factory=list, compare=False)
    # Kernel plans for this step, keyed by a bank's active slots: every module with the same active
    # slots (all of one adapter's targets, in every layer) shares one plan.
    plans: dict[Hashable, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_list(cls, slots: list[int], device: torch.device | str = "cpu") -> TokenSlots:
        slot_tensor = torch.tensor(slots, dtype=torch.int64, device=device)
        # Group on the host: the list is already there and this runs once per step.
        by_slot: dict[int, list[int]] = {}
        for index, slot in enumerate(slots):
            if slot != NO_SLOT:
                by_slot.setdefault(slot, []).append(index)
        order: list[int] = []
        segments: list[tuple[int, int, int]] = []
        segment_rows: list[int | None] = []
        for slot in sorted(by_slot):
            start, rows = len(order), by_slot[slot]
            order.extend(rows)
            segments.append((slot, start, len(order)))
            segment_rows.append(rows[0] if rows[-1] - rows[0] == len(rows) - 1 else None)  # ascending rows
        return cls(slot_tensor, torch.tensor(order, dtype=torch.int64, device=device), segments, segment_rows)

    @property
    def num_tokens(self) -> int:
        return self.slots.shape[0]

    @property
    def any_adapter(self) -> bool:
        return bool(self.segments)
