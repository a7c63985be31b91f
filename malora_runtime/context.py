"""The per-step context: what the model runner tells every layer about the batch it runs.

One object per model, filled by `ModelRunner.run` before the forward and cleared after it. Wrapped linears
(`layers.MaloraLinear`) read the tokens' adapter slots, the delta's backend and where routing is counted;
the paged attention (`engine.attention`) reads where each token's K/V goes and what it attends to. Model
code passes nothing extra. Long-lived state (routing counters, KV pool, slot banks) lives elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine.attention import AttentionMetadata
    from .engine.routing_stats import RoutingStats
    from .kernels.token_slots import TokenSlots


@dataclass
class StepContext:
    token_slots: TokenSlots | None = None
    """Adapter slot of each token of the packed batch ([T]); None outside a step."""
    attention: AttentionMetadata | None = None
    """KV indices written and read by each token."""
    backend: str | None = None
    """The MALoRA delta's kernel backend, resolved once per step (`kernels.dispatch.choose_backend`)."""
    routing: RoutingStats | None = None
    """Where the kernels count expert choices; None: not counted this step."""

    def clear(self) -> None:
        self.token_slots = self.attention = self.backend = self.routing = None
