"""Expert choices of the torch CPU path, recorded during a step and counted when the engine harvests them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RoutingLog:
    """Expert choices recorded as they happen and counted only when read.

    The torch CPU path appends references to its routing tensors, so counting costs the step loop no
    arithmetic; `drain` counts everything recorded since the last call in one pass (the engine
    calls it about once a second, and before it reuses a slot). Past `max_entries` the records are
    folded into running totals, so memory stays bounded when nobody drains.
    """

    max_entries: int = 4096
    entries: list[tuple[list[int], torch.Tensor, torch.Tensor | None, int]] = field(default_factory=list)
    totals: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.int64))

    def record(self, slots: list[int], chosen: torch.Tensor, hits: torch.Tensor | None, num_experts: int) -> None:
        """slots: the m slots of a group; chosen [m, L, k] expert ids (< num_experts); hits [m, L, k] 0/1
        or None (all count)."""
        self.entries.append((slots, chosen, hits, num_experts))
        if len(self.entries) >= self.max_entries:
            self._fold()

    @torch.inference_mode()
    def _fold(self) -> None:
        # Always in inference mode: a fold may happen inside the forward (past max_entries) or outside
        # it (harvest), and a tensor made in inference mode may only be updated in inference mode.
        entries, self.entries = self.entries, []
        num_slots = max(max(slots) for slots, _, _, _ in entries) + 1
        width = max(n for _, _, _, n in entries)
        # The same groups recur in every layer: bucket by group, one concatenation and add per bucket.
        buckets: dict[tuple[tuple[int, ...], bool], list[tuple[torch.Tensor, torch.Tensor | None]]] = {}
        for slots, chosen, hits, _ in entries:
            buckets.setdefault((tuple(slots), hits is None), []).append((chosen, hits))
        plain: list[torch.Tensor] = []
        weighted: list[torch.Tensor] = []
        weights: list[torch.Tensor] = []
        for (slots, unweighted), members in buckets.items():
            m = len(slots)
            base = torch.tensor(slots, dtype=torch.int64).view(m, 1) * width
            index = (base + torch.cat([c.reshape(m, -1) for c, _ in members], dim=1).cpu()).reshape(-1)
            if unweighted:
                plain.append(index)
            else:
                weighted.append(index)
                weights.append(torch.cat([h.reshape(m, -1) for _, h in members], dim=1).cpu().reshape(-1))
        counts = torch.zeros(num_slots * width, dtype=torch.int64)
        if plain:
            counts += torch.bincount(torch.cat(plain), minlength=num_slots * width)
        if weighted:
            counts.index_add_(0, torch.cat(weighted), torch.cat(weights))
        rows, cols = max(num_slots, self.totals.shape[0]), max(width, self.totals.shape[1])
        if self.totals.shape != (rows, cols):
            grown = torch.zeros(rows, cols, dtype=torch.int64)
            grown[:self.totals.shape[0], :self.totals.shape[1]] = self.totals
            self.totals = grown
        self.totals[:num_slots, :width] += counts.view(num_slots, width)

    @torch.inference_mode()
    def drain(self, num_slots: int) -> torch.Tensor:
        """Tokens per (slot, expert) since the last drain: [num_slots, max experts seen] int64, on the CPU."""
        if self.entries:
            self._fold()
        totals, self.totals = self.totals, torch.zeros(0, 0, dtype=torch.int64)
        out = torch.zeros(num_slots, totals.shape[1], dtype=torch.int64)
        out[:min(num_slots, totals.shape[0])] = totals[:num_slots]
        return out
