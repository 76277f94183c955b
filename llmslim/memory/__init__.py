"""Memory: activation checkpointing (per block, sqrt(n) segments, k segments; CPU offload) and its
memory model (what each policy keeps, which policy fits a budget) and measurement."""

from __future__ import annotations

from llmslim.memory.blocks import find_blocks
from llmslim.memory.checkpointing import (
    POLICIES,
    CheckpointingPlan,
    check_policy,
    checkpointing_plan,
    disable_checkpointing,
    enable_checkpointing,
    n_segments,
    segment_bounds,
)

__all__ = [
    "POLICIES",
    "CheckpointingPlan",
    "check_policy",
    "checkpointing_plan",
    "disable_checkpointing",
    "enable_checkpointing",
    "find_blocks",
    "n_segments",
    "segment_bounds",
]
