"""Adapter shapes the memory and offline benchmarks share: name -> (targets, N, r, d, top_k)."""

from __future__ import annotations

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Four different shapes (issue 21's report): every slot of a padded bank would be sized for the largest.
MIXED_SHAPES: dict[str, tuple[list[str], int, int, int, int]] = {
    "alpha": (ATTENTION, 4, 8, 16, 2),
    "beta": (["q_proj", "v_proj"], 8, 4, 32, 2),
    "gamma": (ALL_PROJECTIONS, 1, 16, 16, 1),
    "delta": (["gate_proj", "up_proj", "down_proj"], 6, 8, 24, 2),
}
# The offline benchmark's MALoRA adapter.
OFFLINE_SHAPE = (ATTENTION, 4, 8, 16, 2)
