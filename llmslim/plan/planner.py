"""Will a model fit, in which format, on which devices, and how fast can it decode at best?

`plan_model(config, hardware, workload)` counts, for every format of `PLAN_FORMATS`, the exact
weight bytes (`weights.py`), the KV cache, activations and, for training, LoRA state and
checkpointed activations (`memory.py`); then places the decoder blocks: all on the GPUs (split
across them like accelerate's device map), else on one GPU with the rest streamed from CPU RAM or
disk (llmslim's quantized offload), or on the CPU with disk offload. A mixture-of-experts model with
quantized experts is offloaded as llmslim's loader does it: every routed expert in CPU RAM or
memory-mapped from disk (where it also runs), everything else on the compute device. Decoding is
memory-bound, so the tokens/s ceiling is the batch divided by the time to read every weight a step
uses (all of them; of a MoE layer's routed experts, the ones its tokens chose) and the KV cache once,
from wherever each lives.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from llmslim.plan.hardware import CPU_RESERVE, GPU_RESERVE, GiB, Hardware
from llmslim.plan.known import KNOWN_CONFIGS
from llmslim.plan.memory import (
    OPTIMIZER_BYTES,
    PARALLEL_MODES,
    ProcessMemory,
    TrainingMemory,
    activation_bytes,
    cpu_layout_bytes,
    decode_head_bytes,
    kv_cache_bytes,
    process_memory,
    prompt_workspace_bytes,
    training_memory,
)
from llmslim.plan.shapes import ModelShape, model_shape
from llmslim.plan.weights import PLAN_FORMATS, WeightBytes, dtype_bytes, format_config, iter_tensor_bytes, weight_bytes

QUALITY_ORDER = ("bf16", "int8", "nf4+dq", "int4", "nf4")  # best first; nf4 without double quant only loses bytes
REFERENCE_GPU = 24 * GiB  # "how many 24 GB GPUs" when no --gpu is given


@dataclass
class Workload:
    """What the model will do.

    Args:
        context: tokens per sequence (prompt and generated).
        batch: sequences at once.
        train: QLoRA fine-tuning (LoRA on every quantized layer) instead of inference.
        lora_rank: rank of the LoRA factors.
        optimizer: `adamw` (two float32 moments), `adamw8bit` (bitsandbytes' 8-bit, paged) or `sgd`.
        dtype: float dtype of the tensors kept unquantized and of activations (default: the config's, else bfloat16).
        parallel: with `train`, "none" (one process; the blocks split across the GPUs), "ddp" or "fsdp" (one
            process per GPU, or `processes` CPU processes; `batch` is per process).
        processes: training processes for ddp / fsdp (default: one per GPU, else 1).
    """

    context: int = 4096
    batch: int = 1
    train: bool = False
    lora_rank: int = 16
    optimizer: str = "adamw"
    dtype: str | None = None
    parallel: str = "none"
    processes: int | None = None

    def __post_init__(self) -> None:
        for name in ("context", "batch", "lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.optimizer not in OPTIMIZER_BYTES:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZER_BYTES)}, got {self.optimizer!r}")
        if self.dtype is not None:
            dtype_bytes(self.dtype)
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {list(PARALLEL_MODES)}, got {self.parallel!r}")
        if self.parallel != "none" and not self.train:
            raise ValueError(f"parallel={self.parallel!r} plans training processes: add train=True (--train)")
        if self.processes is not None and (isinstance(self.processes, bool) or not isinstance(self.processes, int) or self.processes < 1):
            raise ValueError(f"processes must be an integer >= 1, got {self.processes!r}")


@dataclass
class Placement:
    """Where the blocks go: `block_devices[i]` is a GPU index, `"cpu"` or `"disk"`; bytes per device.

    `experts_device`: `"cpu"` or `"disk"` when a MoE model's routed experts are offloaded apart from their
    blocks (`used[experts_device]` holds their bytes); `expert_cache`: RAM the page cache has left for the hot
    ones of disk-mapped experts.
    """

    verdict: str
    fits: bool
    compute: str
    block_devices: list
    outer_device: int | str
    used: dict[str, int]
    capacity: dict[str, int]
    offload_budget: int | None = None
    experts_device: str | None = None
    expert_cache: int = 0

    @property
    def offloads(self) -> bool:
        """Some weights live off the compute device (CPU RAM behind a GPU, or disk)."""
        return self.experts_device is not None or bool({"cpu", "disk"} & (set(self.block_devices) - {self.outer_device}))

    @property
    def uses_disk(self) -> bool:
        return self.experts_device == "disk" or "disk" in self.block_devices


@dataclass
class FormatPlan:
    """One format's numbers (bytes) and placement."""

    format: str
    slim_config: dict | None
    weights: WeightBytes
    kv_cache_bytes: int
    activation_bytes: int
    workspace_bytes: int
    training: TrainingMemory | None
    placement: Placement
    gpus_without_offload: int | None
    gpus_with_offload: int | None
    tokens_per_s: float | None
    device_map: dict
    load_kwargs: dict
    decode_bytes: int = 0
    process: ProcessMemory | None = None

    @property
    def total_bytes(self) -> int:
        extra = self.training.total if self.training else self.workspace_bytes
        return self.weights.total + self.kv_cache_bytes + self.activation_bytes + extra

    def to_dict(self) -> dict:
        w = self.weights
        return {
            "weight_bytes": w.total,
            "weight_breakdown": {"codes": w.codes, "scales": w.scales, "kept": w.kept, "buffers": w.buffers, "experts": w.experts},
            "block_bytes": sorted(set(w.per_block)),
            "outer_bytes": w.outer,
            "decode_bytes_per_token": self.decode_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "activation_bytes": self.activation_bytes,
            "workspace_bytes": self.workspace_bytes,
            "training": None if self.training is None else asdict(self.training) | {"total_bytes": self.training.total},
            "per_process": None if self.process is None else asdict(self.process) | {"total_bytes": self.process.total},
            "total_bytes": self.total_bytes,
            "verdict": self.placement.verdict,
            "fits": self.placement.fits,
            "devices": {d: {"used_bytes": self.placement.used.get(d, 0), "capacity_bytes": c} for d, c in self.placement.capacity.items()},
            "experts_device": self.placement.experts_device,
            "expert_cache_bytes": self.placement.expert_cache,
            "gpus_24gib_without_offload": self.gpus_without_offload,
            "gpus_with_offload": self.gpus_with_offload,
            "tokens_per_s": self.tokens_per_s,
            "slim_config": self.slim_config,
            "device_map": self.device_map,
            "load_kwargs": self.load_kwargs,
        }


@dataclass
class Plan:
    """The plan of one model on one machine for one workload, every format."""

    model: str
    source: str
    shape: ModelShape
    hardware: Hardware
    workload: Workload
    dtype: str
    formats: dict[str, FormatPlan]
    recommended: str | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        s = self.shape
        return {
            "model": self.model,
            "source": self.source,
            "architecture": {
                "model_type": s.model_type, "params": s.n_params, "active_params": s.active_params, "layers": s.n_layers,
                "hidden": s.hidden, "heads": s.n_heads, "kv_heads": s.n_kv_heads, "head_dim": s.head_dim, "intermediate": s.intermediate,
                "vocab": s.vocab, "experts": s.experts, "experts_per_token": s.experts_per_token, "tied_embeddings": s.tied_embeddings,
                "dtype": self.dtype,
            },
            "hardware": {
                "gpus": self.hardware.gpus, "cpu": self.hardware.cpu, "disk": self.hardware.disk, "bandwidth": self.hardware.bandwidth,
            },
            "workload": asdict(self.workload),
            "formats": {name: fp.to_dict() for name, fp in self.formats.items()},
            "recommended": self.recommended,
            "notes": self.notes,
        }  # fmt: skip

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def load_config(model: str | Path) -> tuple[dict, str, str]:
    """(config dict, display name, source) of a bundled name, a model folder or a config.json file.

    Raises:
        ValueError: naming the value and the bundled names when it is none of these.
    """
    key = str(model).lower()
    if key in KNOWN_CONFIGS:
        config = KNOWN_CONFIGS[key]
        return {k: v for k, v in config.items() if not k.startswith("_")}, key, f"bundled ({config['_source']})"
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text()), path.parent.name if path.name == "config.json" else path.stem, str(path)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}): give a Hugging Face config.json") from err
    raise ValueError(
        f"{str(model)!r} is neither a model folder, a config.json file nor a bundled model: choose from {sorted(KNOWN_CONFIGS)}"
    )


def plan_model(model: str | Path | dict, hardware: Hardware, workload: Workload | None = None) -> Plan:
    """Plan `model` (a bundled name, a folder, a config.json path or a config dict) on `hardware`."""
    workload = workload or Workload()
    config, name, source = (model, _dict_name(model), "config dict") if isinstance(model, dict) else load_config(model)
    shape = model_shape(config, name)
    dtype = workload.dtype or _config_dtype(shape)
    formats = {fmt: plan_format(shape, fmt, hardware, workload, dtype) for fmt in PLAN_FORMATS}
    notes = list(shape.notes) + _notes(shape, workload)
    return Plan(name, source, shape, hardware, workload, dtype, formats, _recommend(formats), notes)


def _dict_name(config: dict) -> str:
    name = config.get("_name_or_path") or config.get("model_type")
    return name if isinstance(name, str) and name else "model"


def _config_dtype(shape: ModelShape) -> str:
    dtype = str(shape.dtype or "bfloat16").removeprefix("torch.")
    return dtype if dtype in ("bfloat16", "float16", "float32") else "bfloat16"


def _notes(shape: ModelShape, workload: Workload) -> list[str]:
    notes = [
        f"nf4+dq+emb/4: the input embedding factorized at rank hidden/4 = {max(1, shape.hidden // 4)} (ALBERT; tied heads through the "
        "factors); a pretrained model needs healing after it (`llmslim compress --heal-steps`), see benchmarks/bench_compress.py"
    ]
    if shape.max_context and workload.context > shape.max_context:
        notes.append(f"context {workload.context} is longer than the model's {shape.max_context} positions")
    return notes


def plan_format(shape: ModelShape, fmt: str, hardware: Hardware, workload: Workload, dtype: str) -> FormatPlan:
    """Bytes, placement and tokens/s bound of `shape` in format `fmt`."""
    config = format_config(fmt, shape)
    float_dtype = "bfloat16" if config is None else dtype
    size = dtype_bytes(float_dtype)
    weights = weight_bytes(shape, config, float_dtype)
    kv = 0 if workload.train else kv_cache_bytes(shape, workload.context, workload.batch, size)  # training runs without a cache
    training = _training(shape, config, workload, size) if workload.train else None
    acts = 0 if training else activation_bytes(shape, workload.context, workload.batch, size)  # a whole prompt: the widest forward
    cpu_inference = not hardware.gpus and not workload.train
    workspace = prompt_workspace_bytes(
        weights,
        size,
        config and config.weights,
        workload.context * workload.batch,
        cpu=cpu_inference,
        half_gemm=hardware.cpu_half_gemm,
    )
    if cpu_inference:
        workspace += decode_head_bytes(shape, config)  # the int8 copy a float head decodes through
    fixed = acts + (training.total if training else workspace)
    kv_block = kv // max(shape.n_layers, 1)
    # resident NF4/FP4 layers on a CPU also hold their CPU layout's absmax copy (routed experts never do): spread it
    # over the blocks
    copy = cpu_layout_bytes(weights, config and config.weights, config.block_size if config else 64) if cpu_inference else 0
    dense = [b - e for b, e in zip(weights.per_block, weights.per_block_experts, strict=True)]
    spread = [b + copy * d // (sum(dense) or 1) for b, d in zip(weights.per_block, dense, strict=True)]
    placed = replace(weights, per_block=spread) if copy else weights
    workspace += copy
    placement = place(placed, kv_block, fixed, hardware, allow_offload=not workload.train)
    if training and workload.parallel != "none":
        return _parallel_plan(shape, fmt, config, weights, training, hardware, workload)
    return FormatPlan(
        format=fmt,
        slim_config=None if config is None else config.to_dict(),
        weights=weights,
        kv_cache_bytes=kv,
        activation_bytes=acts,
        workspace_bytes=workspace,
        training=training,
        placement=placement,
        gpus_without_offload=gpus_needed(weights, kv_block, fixed, hardware.gpus[0] if hardware.gpus else REFERENCE_GPU),
        gpus_with_offload=1 if not workload.train and _fits_one_gpu_with_offload(weights, kv_block, fixed, hardware) else None,
        tokens_per_s=None if workload.train else tokens_per_s(shape, weights, kv, placement, hardware, workload.batch),
        device_map=device_map(shape, placement),
        load_kwargs=load_kwargs(placement, float_dtype if config is None else None),
        decode_bytes=decode_bytes(shape, weights),
    )


def _parallel_plan(
    shape: ModelShape, fmt: str, config, weights: WeightBytes, training: TrainingMemory, hardware: Hardware, workload: Workload
) -> FormatPlan:
    """Training with `workload.parallel` processes: each holds `process_memory`; it fits when that fits every one's device."""
    processes = workload.processes or max(1, len(hardware.gpus))
    memory = process_memory(weights, training, workload.parallel, processes)
    capacity = _capacity(hardware)
    mode = workload.parallel.upper()
    if hardware.gpus:
        if processes > len(hardware.gpus):
            verdict, fits, used = f"{processes} processes need {processes} GPUs, {len(hardware.gpus)} given", False, {}
        else:
            used = {f"gpu{i}": memory.total for i in range(processes)}
            fits = all(memory.total <= capacity[device] for device in used)
            verdict = f"{mode} on {processes} GPUs" if fits else f"does not fit: {mode} needs {memory.total / GiB:.2f} GiB per GPU"
        compute = "gpu0"
    else:
        used = {"cpu": memory.total * processes}
        fits = used["cpu"] <= capacity["cpu"]
        verdict = f"{mode} on {processes} CPU processes" if fits else f"does not fit: {processes} {mode} processes need more CPU RAM"
        compute = "cpu"
    reference = REFERENCE_GPU - GPU_RESERVE if not hardware.gpus else capacity["gpu0"]
    smallest = next((n for n in range(1, 257) if process_memory(weights, training, workload.parallel, n).total <= reference), None)
    if workload.parallel == "ddp" and smallest is not None:
        smallest = 1  # DDP does not split the model: one GPU that holds it all is the least
    return FormatPlan(
        format=fmt,
        slim_config=None if config is None else config.to_dict(),
        weights=weights,
        kv_cache_bytes=0,
        activation_bytes=0,
        workspace_bytes=0,
        training=training,
        placement=Placement(verdict, fits, compute, [], compute, used, capacity),  # no device map: each process holds its part
        gpus_without_offload=smallest,
        gpus_with_offload=None,
        tokens_per_s=None,
        device_map={},
        load_kwargs={},
        decode_bytes=decode_bytes(shape, weights),
        process=memory,
    )


def _training(shape: ModelShape, config, workload: Workload, size: int) -> TrainingMemory:
    selected = [(lin.in_features, lin.out_features) for lin in shape.linears if config is None or config.selects(lin.name)]
    return training_memory(shape, selected, workload.context, workload.batch, size, workload.lora_rank, workload.optimizer)


# ----------------------------------------------------------------------------- placement


def place(weights: WeightBytes, kv_block: int, fixed: int, hardware: Hardware, allow_offload: bool = True) -> Placement:
    """All blocks on the GPUs; else one GPU streaming the rest from CPU RAM / disk; CPU-only: RAM then disk.

    A MoE model with quantized experts that does not fit whole keeps its routed experts apart instead
    (`_place_experts_apart`), as llmslim's loader offloads it. Training never offloads: llmslim's offload
    serves forward passes only.
    """
    apart = weights.expert_codes > 0  # quantized experts: the loader offloads them, never whole blocks
    if hardware.gpus:
        spread = _place_on_gpus(weights, kv_block, fixed, hardware)
        offload = _place_experts_apart if apart else _place_with_offload
        placement = spread if spread.fits else offload(weights, kv_block, fixed, hardware, compute=0)
    elif apart and not _fits_whole(weights, kv_block, fixed, _capacity(hardware)["cpu"]):
        placement = _place_experts_apart(weights, kv_block, fixed, hardware, compute="cpu")
    else:
        placement = _place_with_offload(weights, kv_block, fixed, hardware, compute="cpu")
    if not allow_offload and placement.fits and placement.offloads:
        return Placement(
            "does not fit without offload (offload serves inference only)", False, placement.compute, [], 0, {}, placement.capacity
        )
    return placement


def _capacity(hardware: Hardware) -> dict[str, int]:
    capacity = {f"gpu{i}": max(0, g - GPU_RESERVE) for i, g in enumerate(hardware.gpus)}
    return capacity | {"cpu": max(0, hardware.cpu - CPU_RESERVE), "disk": hardware.disk}


def _place_on_gpus(weights: WeightBytes, kv_block: int, fixed: int, hardware: Hardware) -> Placement:
    capacity = _capacity(hardware)
    free = [capacity[f"gpu{i}"] for i in range(len(hardware.gpus))]
    free[0] -= weights.outer + fixed
    devices, gpu = [], 0
    for block in weights.per_block:
        while gpu < len(free) and free[gpu] < block + kv_block:
            gpu += 1
        if gpu == len(free):
            return Placement("does not fit on the GPUs", False, "gpu0", [], 0, {}, capacity)
        free[gpu] -= block + kv_block
        devices.append(gpu)
    used = {f"gpu{i}": capacity[f"gpu{i}"] - f for i, f in enumerate(free)}
    n = len(set(devices) | {0})
    verdict = f"fits on {n} GPU{'s' if n > 1 else ''}" if free[0] >= 0 else "does not fit on the GPUs"
    return Placement(verdict, free[0] >= 0, "gpu0", devices, 0, used, capacity)


def _place_with_offload(weights: WeightBytes, kv_block: int, fixed: int, hardware: Hardware, compute: int | str) -> Placement:
    """Compute device holds outer tensors, activations, every layer's KV, staging for two streamed blocks, then resident blocks."""
    capacity = _capacity(hardware)
    device = f"gpu{compute}" if compute != "cpu" else "cpu"
    n = len(weights.per_block)
    base = weights.outer + fixed + kv_block * n
    if base + sum(weights.per_block) <= capacity[device]:
        return Placement(
            f"fits in {'CPU RAM' if device == 'cpu' else 'one GPU'}",
            True,
            device,
            [compute] * n,
            compute,
            {device: base + sum(weights.per_block)},
            capacity,
        )
    staging = 2 * max(weights.per_block, default=0)
    room = capacity[device] - base - staging
    devices, used = [], {device: base + staging, "cpu": 0, "disk": 0}
    for block in weights.per_block:
        where = _first_room(block, room, used, capacity, device, compute)
        room -= block if where == compute else 0
        used[device if where == compute else where] += block
        devices.append(where)
    fits = base + staging <= capacity[device] and used["disk"] <= capacity["disk"] and (device == "cpu" or used["cpu"] <= capacity["cpu"])
    verdict = f"fits with {'disk' if 'disk' in devices else 'CPU'} offload" if fits else _why_not(base + staging, capacity[device], device)
    budget = capacity[device] - fixed - kv_block * n  # weights allowed on the compute device: outer, staging, resident blocks
    return Placement(verdict, fits, device, devices, compute, {k: v for k, v in used.items() if v}, capacity, offload_budget=max(budget, 0))


def _fits_whole(weights: WeightBytes, kv_block: int, fixed: int, capacity: int) -> bool:
    return weights.outer + sum(weights.per_block) + fixed + kv_block * len(weights.per_block) <= capacity


def _place_experts_apart(weights: WeightBytes, kv_block: int, fixed: int, hardware: Hardware, compute: int | str) -> Placement:
    """A MoE model's routed experts in CPU RAM (behind a GPU, when they fit there) or memory-mapped from disk;
    attention, routers, shared experts, embeddings, the KV cache and activations on the compute device.

    This is what `from_pretrained(..., offload="cpu"|"disk")` does with quantized experts
    (`offload.placement.ExpertOffloadPlan`): the experts move as a whole, each runs where its weights are. On
    disk, the RAM the compute device leaves is page cache for the experts the tokens keep choosing.
    """
    capacity = _capacity(hardware)
    device = "cpu" if compute == "cpu" else f"gpu{compute}"
    n = len(weights.per_block)
    experts = sum(weights.per_block_experts)
    resident = weights.outer + sum(weights.per_block) - experts + fixed + kv_block * n
    tier = "cpu" if device != "cpu" and experts <= capacity["cpu"] else "disk"
    fits = resident <= capacity[device] and (tier == "cpu" or experts <= capacity["disk"])
    if fits:
        verdict = f"fits with experts {'in CPU RAM' if tier == 'cpu' else 'on disk'}"
    elif resident > capacity[device]:
        verdict = (
            f"does not fit: {device} needs {resident / GiB:.1f} GiB for attention, routers, shared experts, embeddings, "
            "KV cache and activations"
        )
    else:
        verdict = "does not fit: not enough disk for the experts"
    cache = capacity["cpu"] - (resident if device == "cpu" else 0) if tier == "disk" else 0
    return Placement(
        verdict, fits, device, [compute] * n, compute, {device: resident, tier: experts}, capacity,
        experts_device=tier, expert_cache=max(cache, 0),
    )  # fmt: skip


def _why_not(needed: int, capacity: int, device: str) -> str:
    if needed > capacity:
        return f"does not fit: {device} needs {needed / GiB:.1f} GiB for embeddings, KV cache, activations and 2 streamed blocks"
    return "does not fit: not enough CPU RAM and disk for the offloaded blocks"


def _first_room(block: int, room: int, used: dict[str, int], capacity: dict[str, int], device: str, compute) -> int | str:
    if block <= room:
        return compute
    if device != "cpu" and used["cpu"] + block <= capacity["cpu"]:
        return "cpu"
    return "disk"


def gpus_needed(weights: WeightBytes, kv_block: int, fixed: int, gpu_bytes: int) -> int | None:
    """GPUs of `gpu_bytes` needed to hold everything with no offload (None if a block alone does not fit one)."""
    free = gpu_bytes - GPU_RESERVE
    count, room = 1, free - weights.outer - fixed
    if room < 0:
        return None
    for block in weights.per_block:
        if block + kv_block > free:
            return None
        if block + kv_block > room:
            count, room = count + 1, free
        room -= block + kv_block
    return count


def _fits_one_gpu_with_offload(weights: WeightBytes, kv_block: int, fixed: int, hardware: Hardware) -> bool:
    gpu = (hardware.gpus[0] if hardware.gpus else REFERENCE_GPU) - GPU_RESERVE
    if weights.expert_codes:  # quantized experts leave as a whole, to CPU RAM or disk
        room = max(hardware.cpu - CPU_RESERVE, hardware.disk)
        return weights.resident + fixed + kv_block * len(weights.per_block) <= gpu and weights.experts <= room
    staging = 2 * max(weights.per_block, default=0)
    offloaded = weights.total - weights.outer
    return (
        weights.outer + fixed + kv_block * len(weights.per_block) + staging <= gpu
        and offloaded <= hardware.cpu - CPU_RESERVE + hardware.disk
    )


# ----------------------------------------------------------------------------- speed and suggestions


def tokens_per_s(shape: ModelShape, weights: WeightBytes, kv: int, placement: Placement, hardware: Hardware, batch: int) -> float | None:
    """Decode ceiling: `batch` tokens per step; a step reads every weight it uses once from where it lives (of the
    routed experts, the share its tokens choose, `routed_share`), and the KV cache."""
    if not placement.fits:
        return None
    bw = hardware.bandwidth
    compute_bw = bw["cpu"] if placement.compute == "cpu" else bw["gpu"]
    tier_bw = {"cpu": bw["cpu"] if placement.compute == "cpu" else bw["pcie"], "disk": bw["disk"]}
    share, all_experts = routed_share(shape, batch), sum(weights.per_block_experts)
    seconds = (weights.outer - weights.input_embedding + kv) / compute_bw
    for block, experts, where in zip(weights.per_block, weights.per_block_experts, placement.block_devices, strict=True):
        block_bw = tier_bw.get(where, compute_bw)
        seconds += (block - experts) / block_bw + experts * share * _expert_read_time(placement, bw, block_bw, all_experts)
    return batch / seconds


def _expert_read_time(placement: Placement, bw: dict[str, float], block_bw: float, expert_bytes: int) -> float:
    """Seconds per byte of a routed expert: with its block; in CPU RAM (experts run where they are); disk-mapped, read
    from the page cache for the share of the experts it holds (uniform routing: real routing favours some, so more hit)."""
    if placement.experts_device is None:
        return 1 / block_bw
    if placement.experts_device == "cpu":
        return 1 / bw["cpu"]
    hit = min(1.0, placement.expert_cache / max(expert_bytes, 1))
    return hit / bw["cpu"] + (1 - hit) / bw["disk"]


def routed_share(shape: ModelShape, batch: int = 1) -> float:
    """Expected share of a MoE layer's routed experts a decode step of `batch` tokens reads: each token chooses
    `experts_per_token` of `experts`; uniform, independent routing reads 1 - (1 - k/E)^batch of them (k/E for one token)."""
    if not shape.experts:
        return 1.0
    return 1 - (1 - min(shape.experts_per_token, shape.experts) / shape.experts) ** batch


def decode_bytes(shape: ModelShape, weights: WeightBytes, batch: int = 1) -> int:
    """Weight bytes a decode step of `batch` tokens reads: everything but the input embedding (one row per token)
    and, of the routed experts, the chosen ones (`routed_share`)."""
    dense = weights.total - weights.experts - weights.input_embedding
    return dense + round(weights.experts * routed_share(shape, batch))


def _block_prefix(shape: ModelShape, index: int) -> str:
    names = [lin.name for lin in shape.block_linears[index]] + [t.name for t in shape.block_tensors[index]]
    head, sep, _ = names[0].partition(f".{index}.")
    return f"{head}.{index}" if sep else names[0].rpartition(".")[0]


def device_map(shape: ModelShape, placement: Placement) -> dict:
    """A transformers / accelerate device map for the placement (module name -> GPU index, "cpu" or "disk")."""
    if not placement.block_devices:
        return {}
    outer = {lin.name for lin in shape.outer_linears} | {t.name.rpartition(".")[0] for t in shape.outer_tensors if t.dtype is None}
    mapping: dict = {name: placement.outer_device for name in sorted(outer)}
    mapping.update({_block_prefix(shape, i): d for i, d in enumerate(placement.block_devices)})
    if placement.experts_device is not None:
        mapping.update({e.name.rpartition(".")[0]: placement.experts_device for e in shape.expert_specs if e.quantized})
    return mapping


def load_kwargs(placement: Placement, dtype: str | None) -> dict:
    """Keyword arguments of `llmslim.from_pretrained` that realise the placement (besides the SlimConfig)."""
    if not placement.fits:
        return {}
    kwargs: dict = {} if dtype is None else {"dtype": dtype}
    devices = set(placement.block_devices)
    compute = "cpu" if placement.compute == "cpu" else f"cuda:{placement.outer_device}"
    if placement.experts_device is not None:  # the loader's expert offload: experts apart, no budget
        kwargs |= {"device_map": compute, "offload": placement.experts_device}
        return kwargs | ({"offload_dir": "OFFLOAD_DIR"} if placement.experts_device == "disk" else {})
    if devices <= {placement.outer_device}:
        return kwargs | {"device_map": compute}
    if "cpu" in devices or "disk" in devices:
        kwargs |= {"device_map": compute, "offload": "disk" if "disk" in devices else "cpu", "offload_budget": placement.offload_budget}
        return kwargs | ({"offload_dir": "OFFLOAD_DIR"} if "disk" in devices else {})
    return kwargs | {"device_map": "auto"}


def _recommend(formats: dict[str, FormatPlan]) -> str | None:
    """The best-quality format that fits without offload; else the fastest that fits with it."""
    for fmt in QUALITY_ORDER:
        p = formats.get(fmt)
        if p and p.placement.fits and not p.placement.offloads:
            return fmt
    fitting = [p for p in formats.values() if p.placement.fits and p.format in QUALITY_ORDER]  # factorized: needs healing first
    return max(fitting, key=lambda p: (not p.placement.uses_disk, p.tokens_per_s or 0)).format if fitting else None


def tensor_table(shape: ModelShape, fmt: str, dtype: str) -> dict[str, int]:
    """Bytes of every tensor of `shape` in format `fmt` (`--tensors`)."""
    config = format_config(fmt, shape)
    return {name: nbytes for name, _, nbytes in iter_tensor_bytes(shape, config, "bfloat16" if config is None else dtype)}
