"""Expert routing counts, accumulated by the kernels across steps until the engine harvests them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels.routing_log import RoutingLog


@dataclass
class RoutingStats:
    counts: dict[str, torch.Tensor] = field(default_factory=dict)
    """[num_slots, n_max] int64 per bank path: tokens routed to each expert, counted by the kernels themselves
    (Triton on the GPU, the native kernel on the CPU)."""
    log: RoutingLog = field(default_factory=RoutingLog)
    """The torch CPU path records its choices here instead; they are counted when drained."""
    enabled: bool = True

    def sink(self, path: str, backend: str) -> torch.Tensor | RoutingLog | None:
        """Where the module at `path` counts this step's choices on `backend`."""
        if not self.enabled:
            return None
        return self.log if backend == "cpu" else self.counts.get(path)
