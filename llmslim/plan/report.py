"""A plan as text: one row per format, then the suggestion."""

from __future__ import annotations

from llmslim.plan.hardware import GiB
from llmslim.plan.planner import FormatPlan, Plan
from llmslim.quant.registry import FORMATS


def gib(nbytes: int | None) -> str:
    return "–" if nbytes is None else f"{nbytes / GiB:.2f}"


def _rate(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def format_table(plan: Plan) -> str:
    """A markdown table of every format: bytes in GiB, verdict, GPUs needed, tokens/s bound."""
    train = plan.workload.train
    extra = "train GiB" if train else "workspace GiB"
    header = (
        f"| format | weights GiB | KV cache GiB | activations GiB | {extra} | total GiB | verdict "
        "| 24 GiB GPUs (no offload / offload) | tok/s ≤ |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for name, fp in plan.formats.items():
        extra_bytes = (fp.training.total - fp.training.activation_bytes) if fp.training else fp.workspace_bytes
        acts = fp.training.activation_bytes if fp.training else fp.activation_bytes
        lines.append(
            f"| {name} | {gib(fp.weights.total)} | {gib(fp.kv_cache_bytes)} | {gib(acts)} | {gib(extra_bytes)} | {gib(fp.total_bytes)} | "
            f"{fp.placement.verdict} | {_count(fp.gpus_without_offload)} / {_count(fp.gpus_with_offload)} | {_rate(fp.tokens_per_s)} |"
        )
    return "\n".join(lines)


def _count(value: int | None) -> str:
    return "–" if value is None else str(value)


def render(plan: Plan) -> str:
    """The whole report: header, table, recommendation and notes."""
    s, w = plan.shape, plan.workload
    head = [
        f"{plan.model}: {s.model_type}, {s.n_params / 1e9:.2f}B parameters, {s.n_layers} layers, hidden {s.hidden}, "
        f"{s.n_heads} heads / {s.n_kv_heads} KV heads, vocab {s.vocab} ({plan.source})",
        f"{plan.hardware.describe()}; {f'training (QLoRA, rank {w.lora_rank}, {w.optimizer})' if w.train else 'inference'}, "
        f"context {w.context}, batch {w.batch}, float parts in {plan.dtype}",
        "",
        format_table(plan),
        "",
    ]
    return "\n".join(head + _suggestion(plan) + [f"note: {n}" for n in plan.notes])


def _suggestion(plan: Plan) -> list[str]:
    if plan.recommended is None:
        return ["does not fit in any format on this hardware: add GPU or CPU memory, or disk space for offload", ""]
    fp: FormatPlan = plan.formats[plan.recommended]
    lines = [f"suggested: {plan.recommended} ({fp.placement.verdict})", f"  {_call(fp)}"]
    if fp.training:
        lines.append(f"  checkpointing: {fp.training.policy} ({', '.join(f'{k} {gib(v)} GiB' for k, v in fp.training.policies.items())})")
    return lines + [""]


def _call(fp: FormatPlan) -> str:
    config = "SlimConfig(weights=None)" if fp.slim_config is None else _config_repr(fp.slim_config)  # None: a float model needs a config
    kwargs = "".join(f", {k}={v!r}" for k, v in fp.load_kwargs.items())
    return f"llmslim.from_pretrained(MODEL, {config}{kwargs})"


def _config_repr(config: dict) -> str:
    fields = [f"weights={config['weights']!r}"]
    if config.get("double_quant") is False and config["weights"] in FORMATS and FORMATS[config["weights"]].blockwise_absmax:
        fields.append("double_quant=False")
    return f"SlimConfig({', '.join(fields)})"
