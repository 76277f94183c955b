"""A plan as text: one row per format, then the suggestion (and, for a MoE model, what a token reads and where the experts go)."""

from __future__ import annotations

from llmslim.plan.hardware import GiB
from llmslim.plan.planner import FormatPlan, Placement, Plan
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
    if plan.workload.parallel != "none":
        return _process_table(plan)
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


def _process_table(plan: Plan) -> str:
    """Training processes (DDP / FSDP): what each one holds."""
    mode = plan.workload.parallel.upper()
    header = (
        f"| format | weights GiB (all) | {mode} processes | weights GiB / process | train GiB / process | gathered GiB / process "
        f"| total GiB / process | verdict | least 24 GiB GPUs |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for name, fp in plan.formats.items():
        p = fp.process
        lines.append(
            f"| {name} | {gib(fp.weights.total)} | {p.processes} | {gib(p.weights)} | {gib(p.training)} | {gib(p.gathered)} | "
            f"{gib(p.total)} | {fp.placement.verdict} | {_count(fp.gpus_without_offload)} |"
        )
    return "\n".join(lines)


def _count(value: int | None) -> str:
    return "–" if value is None else str(value)


def render(plan: Plan) -> str:
    """The whole report: header, table, recommendation and notes."""
    s, w = plan.shape, plan.workload
    head = [
        f"{plan.model}: {s.model_type}, {_params(s)}, {s.n_layers} layers, hidden {s.hidden}, "
        f"{s.n_heads} heads / {s.n_kv_heads} KV heads, vocab {s.vocab} ({plan.source})",
        f"{plan.hardware.describe()}; {f'training (QLoRA, rank {w.lora_rank}, {w.optimizer})' if w.train else 'inference'}, "
        f"context {w.context}, batch {w.batch}, float parts in {plan.dtype}",
        "",
        format_table(plan),
        "",
    ]
    return "\n".join(head + _per_token(plan) + _suggestion(plan) + [f"note: {n}" for n in plan.notes])


def _params(shape) -> str:
    total = f"{shape.n_params / 1e9:.2f}B parameters"
    if not shape.experts:
        return total
    return f"{total}, {shape.active_params / 1e9:.2f}B active per token ({shape.experts_per_token} of {shape.experts} routed experts)"


def _per_token(plan: Plan) -> list[str]:
    """MoE: the weight bytes one decoded token reads per format (only its routed experts of each layer)."""
    if not plan.shape.experts:
        return []
    reads = ", ".join(f"{name} {gib(fp.decode_bytes)}" for name, fp in plan.formats.items())
    return [f"weights read per decoded token (GiB, batch 1, the routed experts only): {reads}", ""]


def _suggestion(plan: Plan) -> list[str]:
    if plan.recommended is None:
        return ["does not fit in any format on this hardware: add GPU or CPU memory, or disk space for offload", ""]
    fp: FormatPlan = plan.formats[plan.recommended]
    lines = [f"suggested: {plan.recommended} ({fp.placement.verdict})", f"  {_call(fp)}"]
    if fp.process is not None:
        preset = "fsdp2_gpu.yaml" if fp.process.parallel == "fsdp" else "ddp_cpu.yaml"
        script = "YOUR_SCRIPT (see examples/qlora_accelerate.py)"
        lines.append(f"  launch: accelerate launch --config_file examples/accelerate/{preset} {script}")
    if fp.placement.experts_device is not None:
        lines += _experts_apart(fp.placement)
    if fp.training:
        lines.append(f"  checkpointing: {fp.training.policy} ({', '.join(f'{k} {gib(v)} GiB' for k, v in fp.training.policies.items())})")
    return lines + [""]


def _experts_apart(p: Placement) -> list[str]:
    """Bytes on each side of a MoE placement with the experts offloaded."""
    where = "in CPU RAM" if p.experts_device == "cpu" else "memory-mapped from disk"
    runs = "" if p.compute == "cpu" else " (each runs on the CPU, where it is)"
    lines = [
        f"  experts: {gib(p.used.get(p.experts_device, 0))} GiB quantized, {where}{runs}; {p.compute}: "
        f"{gib(p.used.get(p.compute, 0))} GiB for attention, routers, shared experts, embeddings, KV cache and activations"
    ]
    if p.experts_device == "disk":
        experts = p.used.get("disk", 0)
        share = min(1.0, p.expert_cache / experts) if experts else 1.0
        lines.append(
            f"  page cache: {gib(p.expert_cache)} GiB of RAM left keeps the hot experts ({share:.0%} of them); a quantized "
            "llmslim checkpoint is mapped in place, a float one is quantized once to offload_dir"
        )
    return lines


def _call(fp: FormatPlan) -> str:
    config = "SlimConfig(weights=None)" if fp.slim_config is None else _config_repr(fp.slim_config)  # None: a float model needs a config
    kwargs = "".join(f", {k}={v!r}" for k, v in fp.load_kwargs.items())
    return f"llmslim.from_pretrained(MODEL, {config}{kwargs})"


def _config_repr(config: dict) -> str:
    fields = [f"weights={config['weights']!r}"]
    if config.get("double_quant") is False and config["weights"] in FORMATS and FORMATS[config["weights"]].blockwise_absmax:
        fields.append("double_quant=False")
    return f"SlimConfig({', '.join(fields)})"
