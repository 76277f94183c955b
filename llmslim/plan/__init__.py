"""`llmslim plan`: memory, placement and speed of a model in every format, from its config.json alone;
and the preflight check `from_pretrained` runs before it reads a weight."""

from __future__ import annotations

from llmslim.plan.hardware import Hardware, parse_size, this_machine
from llmslim.plan.known import KNOWN_CONFIGS
from llmslim.plan.planner import FormatPlan, Plan, Workload, plan_model
from llmslim.plan.preflight import PreflightError
from llmslim.plan.shapes import ModelShape, model_shape

__all__ = [
    "KNOWN_CONFIGS", "FormatPlan", "Hardware", "ModelShape", "Plan", "PreflightError", "Workload",
    "model_shape", "parse_size", "plan_model", "this_machine",
]  # fmt: skip
