"""Mixture-of-experts benchmark: loading, memory and speed of a Qwen3-MoE per format, in RAM and beyond it.

Two random Qwen3-MoE checkpoints in Hub format (one bf16 tensor per expert, key names as
transformers saves them), written layer by layer in a child process (bounded memory):

- mid: hidden 1024, 8 layers, 64 experts (8 active) of width 512, vocab 32000: fits in RAM in bf16.
  transformers bf16, transformers + bitsandbytes nf4 (which leaves the fused 3-D experts in bf16)
  and llmslim int8 / nf4 / int4, then llmslim nf4 with its experts memory-mapped from its own save.
- beyond: the Qwen3-30B-A3B shape (hidden 2048, 128 experts, 8 active, width 768, 32 heads of 128,
  4 KV heads, vocab 151936) with 24 of its 48 layers: 29 GiB in bf16, more than this machine's RAM.
  llmslim nf4 from the bf16 checkpoint (read from disk: its pages are dropped from the page cache
  first), saved; then the save loaded with `offload="disk"` (experts memory-mapped in place).
  Decode only (no prefill).

Every case runs in a fresh child process (this script with `--child CASE MODEL_DIR`; the parent
never imports torch, see _harness.py). The child records the load time, its peak RSS at the end of
the load (`VmHWM`), its RSS split into anonymous and file-backed memory (sampled every 50 ms), the
footprint (bytes of the unique tensor storages), then decode (batch 1, greedy, `--new-tokens` new
tokens after a `--prompt-tokens` prompt; tok/s without the prompt's forward, as bench_speed) and
one `--prefill-tokens` forward. The roofline is the memory read bandwidth (bench_speed's
measurement, in its own child) over the bytes one decode step reads: every weight once, less the
input embedding, with only `experts_per_token / experts` of each layer's expert bytes.

    python benchmarks/bench_moe.py                          # both shapes, every case, 3 repeats
    python benchmarks/bench_moe.py --shape mid --repeats 1  # quick
    python benchmarks/bench_moe.py --shape tiny             # seconds: checks the script

Writes benchmarks/results/bench_moe.json and .png, prints a markdown table and puts it in
benchmarks/README.md between `<!-- bench_moe:start -->` and `<!-- bench_moe:end -->`. The generated
checkpoints (benchmarks/checkpoints/moe-*) are deleted at the end unless `--keep-checkpoints`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from _harness import (
    GB,
    GIB,
    KIB,
    REPO,
    add_child_arguments,
    add_output_arguments,
    add_threads_argument,
    end_of_run,
    finish_child,
    fmt,
    machine_info,
    parse_list,
    publish,
    pyplot,
    ratio,
    read_json,
    recording_errors,
    save_figure,
    vm_kib,
)
from _models import (
    TIMING_SETTINGS,
    add_timing_arguments,
    footprint_bytes,
    load_bf16,
    load_bnb,
    load_llmslim,
    random_ids,
    run_case,
    storage_keys,
    storage_spans,
    time_decode,
    warm_page_cache,
    weight_bytes_per_token,
)

CHECKPOINTS = REPO / "benchmarks" / "checkpoints"
WRITTEN_RECORD = "bench_moe_written.json"  # in a checkpoint folder: how long writing it took, and its peak RSS
BANDWIDTH, WRITE = "bandwidth", "write-checkpoint"  # child "cases" that measure the bandwidth / write a checkpoint
DISK_CASE, SAVING_CASE = "llmslim-nf4-disk", "llmslim-nf4"  # the disk case maps what the nf4 case saved
RAM_BUDGET_GIB = 4.0
MEMORY_CGROUP_ROOTS = (Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup"))  # cgroup v1's memory hierarchy, cgroup v2
CGROUP_LIMIT_FILES = ("memory.limit_in_bytes", "memory.max")  # v1, v2
CGROUP_PEAK_FILES = ("memory.max_usage_in_bytes", "memory.peak")  # v1, v2
PEAK_SLACK_GIB = 0.5
SAMPLE_S = 0.05
README_BLOCKS = {"bench_moe": "bench_moe.json"}  # README marker -> the committed JSON it is rendered from (render.py)
README_SECTION = (
    "## Mixture of experts (`benchmarks/bench_moe.py`)\n\n"
    "A random Qwen3-MoE checkpoint that fits in RAM (mid) and one of the Qwen3-30B-A3B shape that does not (beyond): "
    "load time, peak RSS, footprint, decode and prefill of transformers (bf16, + bitsandbytes nf4) and llmslim "
    "(int8 / nf4 / int4, and nf4 with its experts memory-mapped from disk), each case in a fresh process. "
    "Results: `benchmarks/results/bench_moe.json` and `.png`."
)


@dataclass(frozen=True)
class Shape:
    """A random Qwen3-MoE checkpoint: its dimensions and the cases run on it (`skipped`: cases left out, and why)."""

    description: str
    hidden: int
    layers: int
    experts: int
    active: int
    expert_width: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    cases: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)
    read_cold: bool = False  # drop the checkpoint's pages from the page cache before each case (it does not fit)
    prefill: bool = True  # time a prefill forward (the issue asks for it on mid only; beyond-RAM 4-bit prefill takes minutes here)

    def config(self):
        """transformers' Qwen3MoeConfig of this shape (child side)."""
        import transformers

        return transformers.Qwen3MoeConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            moe_intermediate_size=self.expert_width,
            num_experts=self.experts,
            num_experts_per_tok=self.active,
            norm_topk_prob=True,  # as Qwen3-30B-A3B
            tie_word_embeddings=False,
            dtype="bfloat16",
        )

    def shards(self) -> list[dict[str, tuple[int, ...]]]:
        """Tensor name -> shape per shard, in Hub layout: the embedding, one shard per layer, the final norm and head."""
        h, w, hd = self.hidden, self.expert_width, self.head_dim
        shards = [{"model.embed_tokens.weight": (self.vocab, h)}]
        for i in range(self.layers):
            p = f"model.layers.{i}"
            layer = {
                f"{p}.input_layernorm.weight": (h,),
                f"{p}.post_attention_layernorm.weight": (h,),
                f"{p}.self_attn.q_proj.weight": (self.heads * hd, h),
                f"{p}.self_attn.k_proj.weight": (self.kv_heads * hd, h),
                f"{p}.self_attn.v_proj.weight": (self.kv_heads * hd, h),
                f"{p}.self_attn.o_proj.weight": (h, self.heads * hd),
                f"{p}.self_attn.q_norm.weight": (hd,),
                f"{p}.self_attn.k_norm.weight": (hd,),
                f"{p}.mlp.gate.weight": (self.experts, h),
            }
            for e in range(self.experts):
                layer |= {
                    f"{p}.mlp.experts.{e}.gate_proj.weight": (w, h),
                    f"{p}.mlp.experts.{e}.up_proj.weight": (w, h),
                    f"{p}.mlp.experts.{e}.down_proj.weight": (h, w),
                }
            shards.append(layer)
        shards.append({"model.norm.weight": (h,), "lm_head.weight": (self.vocab, h)})
        return shards

    def bf16_bytes(self) -> int:
        return 2 * sum(math.prod(dims) for shard in self.shards() for dims in shard.values())


MID_CASES = ("bf16", "bnb-nf4", "llmslim-int8", "llmslim-nf4", "llmslim-int4", DISK_CASE)
TOO_BIG = "not run: its bf16 experts (29 GiB) do not fit in this machine's RAM"
SHAPES: dict[str, Shape] = {
    "mid": Shape(
        "random Qwen3-MoE, hidden 1024, 8 layers, 64 experts (8 active) of width 512, 16 heads of 64, 4 KV heads, vocab 32000",
        hidden=1024,
        layers=8,
        experts=64,
        active=8,
        expert_width=512,
        heads=16,
        kv_heads=4,
        head_dim=64,
        vocab=32000,
        cases=MID_CASES,
    ),
    "beyond": Shape(
        "random Qwen3-30B-A3B shape with 24 of its 48 layers: hidden 2048, 128 experts (8 active) of width 768, "
        "32 heads of 128, 4 KV heads, vocab 151936",
        hidden=2048,
        layers=24,
        experts=128,
        active=8,
        expert_width=768,
        heads=32,
        kv_heads=4,
        head_dim=128,
        vocab=151936,
        cases=("llmslim-nf4", DISK_CASE),
        skipped={"bf16": TOO_BIG, "bnb-nf4": "not run: bitsandbytes leaves the experts in bf16 (29 GiB), more than this machine's RAM"},
        read_cold=True,
        prefill=False,
    ),
    "tiny": Shape(
        "tiny random Qwen3-MoE (checks the script)",
        hidden=64,
        layers=2,
        experts=8,
        active=2,
        expert_width=32,
        heads=4,
        kv_heads=2,
        head_dim=16,
        vocab=256,
        cases=MID_CASES,
    ),
}
DEFAULT_SHAPES = ("mid", "beyond")


# ----------------------------------------------------------------------------- the cases (child side)


def load_disk(path: Path):
    """A saved llmslim checkpoint with its quantized experts memory-mapped in place (`offload="disk"`)."""
    import llmslim

    return llmslim.from_pretrained(path, offload="disk", progress=False)


@dataclass(frozen=True)
class Case:
    label: str
    load: Callable  # model folder -> model


CASES: dict[str, Case] = {
    "bf16": Case("transformers bf16", load_bf16),
    "bnb-nf4": Case("transformers+bnb nf4 (experts stay bf16)", partial(load_bnb, bits=4)),
    "llmslim-int8": Case("llmslim int8", partial(load_llmslim, weights="int8")),
    "llmslim-nf4": Case("llmslim nf4", partial(load_llmslim, weights="nf4")),
    "llmslim-int4": Case("llmslim int4", partial(load_llmslim, weights="int4")),
    DISK_CASE: Case("llmslim nf4, experts on disk (offload='disk')", load_disk),
}


# ----------------------------------------------------------------------------- writing a checkpoint (child side)


def hub_layout(shape: Shape) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor transformers' `save_pretrained` writes for a Qwen3-MoE of `shape`'s layers and experts.

    Built from a copy of the shape with tiny widths (the names depend only on the layers and experts).
    """
    import tempfile

    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    tiny = replace(shape, hidden=16, expert_width=8, heads=2, kv_heads=1, head_dim=8, vocab=32)
    with tempfile.TemporaryDirectory() as tmp:
        AutoModelForCausalLM.from_config(tiny.config(), dtype=torch.bfloat16).save_pretrained(tmp)
        layout = {}
        for file in sorted(Path(tmp).glob("*.safetensors")):
            with safe_open(file, "pt") as handle:
                layout |= {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    mine = {name: dims for shard in tiny.shards() for name, dims in shard.items()}
    if layout != mine:
        raise AssertionError(f"Shape.shards() differs from transformers' save: {sorted(set(layout) ^ set(mine))[:5]} ...")
    return layout


def write_checkpoint(shape: Shape, folder: Path) -> dict:
    """Random bf16 weights of `shape` in Hub format, one safetensors shard per layer (memory: one layer at a time).

    Norm weights are ones; every other weight is normal with std 0.02 (the router too: its logits
    then have a std near 1, so routing spreads over the experts).
    """
    import torch
    from safetensors.torch import save_file

    start = time.perf_counter()
    hub_layout(shape)  # the names written below are transformers' own
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shape.config().save_pretrained(partial)
    generator = torch.Generator().manual_seed(0)
    shards, weight_map, total = shape.shards(), {}, 0
    for i, shard in enumerate(shards):
        tensors = {name: random_weight(name, dims, generator) for name, dims in shard.items()}
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, partial / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    os.replace(partial, folder)
    return {"write_s": time.perf_counter() - start, "checkpoint_bytes": total, "shards": len(shards), "tensors": len(weight_map)}


def random_weight(name: str, dims: tuple[int, ...], generator):
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(dims, dtype=torch.bfloat16)
    return torch.empty(dims, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=generator)


# ----------------------------------------------------------------------------- measuring a case (child side)


class RssSampler:
    """Peaks of this process's anonymous and file-backed RSS, sampled every `SAMPLE_S` s in a thread."""

    def __init__(self):
        self.peak_anon_kib = self.peak_file_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def sample(self) -> None:
        self.peak_anon_kib = max(self.peak_anon_kib, vm_kib("RssAnon"))
        self.peak_file_kib = max(self.peak_file_kib, vm_kib("RssFile"))

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.sample()

    def peaks(self, prefix: str) -> dict:
        self.sample()
        return {f"{prefix}_peak_anon_kib": self.peak_anon_kib, f"{prefix}_peak_file_kib": self.peak_file_kib}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def expert_bytes(model) -> dict:
    """Bytes of the experts' weights (every tensor of an experts module with a leading expert dimension) and the bytes
    one decode step reads: `weight_bytes_per_token` with only `experts_per_token / experts` of the expert bytes."""
    import itertools

    from llmslim.quant.experts import experts_modules

    keys: set = set()
    experts = 0
    for _, module in experts_modules(model):
        experts = module.num_experts
        for tensor in itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)):
            if tensor.dim() and tensor.shape[0] == module.num_experts:
                keys |= storage_keys(tensor)
    total = sum(size for _, _, size in keys)
    read = weight_bytes_per_token(model)
    active = model.config.num_experts_per_tok
    routed = read["weight_bytes_per_token"] - total * (1 - active / experts) if experts else read["weight_bytes_per_token"]
    return {**read, "expert_bytes": total, "experts": experts, "experts_per_token": active, "routed_bytes_per_token": routed}


def child_case(case: str, model_dir: Path, args: argparse.Namespace) -> dict:
    """Load `model_dir` per `case`, count its bytes, time decode and prefill, and save it (nf4, for the disk case)."""
    import torch
    import transformers  # noqa: F401
    from bench_load import bytes_in_ranges, mapped_ranges
    from bench_speed import time_prefill

    import llmslim
    from llmslim.quant import kernels

    torch.set_num_threads(args.threads)
    result: dict = {"import_rss_kib": vm_kib("VmRSS"), "torch_threads": torch.get_num_threads()}
    result["llmslim_avx512_bf16_kernels"] = kernels.decode_kernels()  # without them 4-bit experts run a scalar loop
    sampler = RssSampler().start()
    try:
        start = time.perf_counter()
        model = CASES[case].load(model_dir).eval()
        result["load_s"] = time.perf_counter() - start
        result["load_hwm_kib"] = vm_kib("VmHWM")
        result |= sampler.peaks("load")
        result["rss_anon_after_load_kib"], result["rss_file_after_load_kib"] = vm_kib("RssAnon"), vm_kib("RssFile")
        spans, ranges = storage_spans(model), mapped_ranges(str(model_dir))
        result["footprint_bytes"] = footprint_bytes(spans)
        result["footprint_in_mapped_checkpoint_bytes"] = bytes_in_ranges(spans, ranges)
        result |= expert_bytes(model)
        prompt, prefill = random_ids(model.config.vocab_size, args.prompt_tokens, args.prefill_tokens)
        result |= time_decode(model, prompt, args.new_tokens, args.repeats, torch.inference_mode)
        if not args.no_prefill:
            result |= time_prefill(model, prefill, args.repeats, torch.inference_mode)
        result |= sampler.peaks("run")
        result["hwm_kib"] = vm_kib("VmHWM")
    finally:
        sampler.stop()
    if args.save_to:
        start = time.perf_counter()
        llmslim.save_pretrained(model, args.save_to, overwrite=True)
        result["save_s"] = time.perf_counter() - start
        result["saved_bytes"] = folder_bytes(Path(args.save_to))
    return result


def child_main(case: str, model_dir: str, args: argparse.Namespace) -> int:
    result: dict = {}
    if args.memory_cgroup:  # first: every page this process touches from here on is charged to the limited cgroup
        join_cgroup(Path(args.memory_cgroup))
    with recording_errors(result):
        if case == BANDWIDTH:
            from bench_speed import child_bandwidth

            result |= child_bandwidth(args.repeats, args.threads)
        elif case == WRITE:
            result |= write_checkpoint(SHAPES[args.shape[0]], Path(model_dir))
        else:
            result |= child_case(case, Path(model_dir), args)
    if args.memory_cgroup:
        result["cgroup_peak_bytes"] = cgroup_peak(Path(args.memory_cgroup))
    return finish_child(result, args.result)


def join_cgroup(folder: Path) -> None:
    (folder / "cgroup.procs").write_text(str(os.getpid()))


def cgroup_peak(folder: Path) -> int | None:
    """The most memory the cgroup held (its processes' anonymous memory and the page cache charged to it)."""
    for name in CGROUP_PEAK_FILES:
        if (folder / name).exists():
            return int((folder / name).read_text())
    return None


# ----------------------------------------------------------------------------- parent side


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def drop_from_page_cache(folder: Path) -> None:
    """Write back and drop the page-cache pages of `folder`'s files (these files only), so the next read is from disk."""
    for file in folder.iterdir():
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


@contextmanager
def memory_cgroup(limit_bytes: int) -> Iterator[Path | None]:
    """A memory cgroup of this run's own, limited to `limit_bytes` (anonymous memory and page cache together, as the
    kernel charges them), removed afterwards; None where this machine lets us make none (not root, no memory controller).
    """
    for root in MEMORY_CGROUP_ROOTS:
        folder = root / f"llmslim-bench-moe-{os.getpid()}"
        try:
            folder.mkdir()
        except OSError:
            continue
        try:
            limit = next((folder / name for name in CGROUP_LIMIT_FILES if (folder / name).exists()), None)
            if limit is None:
                continue
            limit.write_text(str(limit_bytes))
            yield folder
            return
        finally:
            folder.rmdir()  # ours, and empty: its one process has exited
    yield None


def child(case: str, folder: Path | str, args: argparse.Namespace, extra: list[str]) -> dict:
    """`run_case` with the wall time of the whole child (start, load, measurements, exit)."""
    start = time.perf_counter()
    out = run_case(Path(__file__), case, folder, args, [f"--threads={args.threads}", *extra])
    return out | {"wall_s": time.perf_counter() - start}


def prepare_checkpoint(name: str, args: argparse.Namespace) -> tuple[Path, dict]:
    """The random checkpoint of shape `name` (written in a child if missing) and what writing it took."""
    folder = CHECKPOINTS / f"moe-{name}-random"
    record = folder / WRITTEN_RECORD
    if (folder / "config.json").exists():
        return folder, {"reused": True, **(json.loads(record.read_text()) if record.exists() else {})}
    print(f"[{name}] writing the random checkpoint to {folder} ...", file=sys.stderr, flush=True)
    written = child(WRITE, folder, args, [f"--shape={name}"])
    if "error" not in written:
        record.write_text(json.dumps(written) + "\n")  # a later run that reuses the checkpoint reports what writing it took
    return folder, written


def run_shape(name: str, args: argparse.Namespace, read_gb_s: float | None) -> dict:
    """Every case of `args.cases` on shape `name`, each in its own child; the checkpoints deleted after, unless kept."""
    shape = SHAPES[name]
    folder, written = prepare_checkpoint(name, args)
    out: dict = {"description": shape.description, "path": str(folder), "written": written, "cases": {}}
    if "error" in written:
        return out | {"error": written["error"]}
    out["checkpoint_bytes"] = folder_bytes(folder)
    saved = CHECKPOINTS / f"moe-{name}-random-llmslim-nf4"
    if not shape.read_cold:
        warm_page_cache(folder)
    for case in args.cases:
        if case in shape.skipped:
            out["cases"][case] = {"label": CASES[case].label, "skipped": shape.skipped[case]}
            continue
        if case not in shape.cases:
            continue
        out["cases"][case] = run_one(name, case, folder, saved, args)
    out["bandwidth_read_gb_s"] = read_gb_s
    add_derived(out["cases"], read_gb_s)
    out["targets"] = evaluate_targets(name, out["cases"])
    failed = [case for case, entry in out["cases"].items() if "error" in entry]
    if failed and not args.keep_checkpoints:
        print(f"[{name}] {', '.join(failed)} failed: keeping {folder} and {saved} for a rerun", file=sys.stderr, flush=True)
    out["checkpoints_deleted"] = [] if args.keep_checkpoints or failed else delete_checkpoints(folder, saved)
    return out


def run_one(name: str, case: str, folder: Path, saved: Path, args: argparse.Namespace) -> dict:
    entry: dict = {"label": CASES[case].label}
    extra = [f"--save-to={saved}"] if case == SAVING_CASE and DISK_CASE in args.cases else []
    extra += [] if SHAPES[name].prefill else ["--no-prefill"]
    source = saved if case == DISK_CASE else folder
    if case == DISK_CASE and not (saved / "config.json").exists():
        entry["error"] = f"no saved nf4 checkpoint at {saved}: run it with {SAVING_CASE}"
    else:
        if case == DISK_CASE or SHAPES[name].read_cold:
            drop_from_page_cache(source)  # the expert pages come from disk
            entry["read_cold"] = True
        if case != DISK_CASE:
            entry |= child(case, source, args, extra)
        else:  # under the RAM budget: the page cache of the mapped experts counts, and is reclaimed when it is full
            with memory_cgroup(int(RAM_BUDGET_GIB * GIB)) as cgroup:
                budget = [f"--memory-cgroup={cgroup}"] if cgroup else []
                entry |= child(case, source, args, extra + budget) | {"ram_budget_enforced": cgroup is not None}
    print(f"[{name}] {case:16s} {describe(entry)}", file=sys.stderr, flush=True)
    return entry


def delete_checkpoints(*folders: Path) -> list[str]:
    deleted = []
    for folder in folders:
        if folder.exists():
            shutil.rmtree(folder)
            deleted.append(str(folder))
    return deleted


def add_derived(cases: dict[str, dict], read_gb_s: float | None) -> None:
    """GiB figures, ratios to bf16 and the decode roofline (read bandwidth / routed bytes per token)."""
    for entry in cases.values():
        if "load_s" not in entry:
            continue
        entry["load_peak_gib"] = entry["load_hwm_kib"] * KIB / GIB
        entry["footprint_gib"] = entry["footprint_bytes"] / GIB
        entry["load_peak_minus_footprint_gib"] = entry["load_peak_gib"] - entry["footprint_gib"]
        routed = entry["routed_bytes_per_token"]
        entry["roofline_tok_s"] = None if read_gb_s is None else read_gb_s * GB / routed
        entry["roofline_fraction"] = ratio(entry.get("decode_tok_s"), entry["roofline_tok_s"])
    base = cases.get("bf16", {})
    for entry in cases.values():
        entry["footprint_vs_bf16"] = ratio(entry.get("footprint_bytes"), base.get("footprint_bytes"))
        entry["decode_vs_bf16"] = ratio(entry.get("decode_tok_s"), base.get("decode_tok_s"))
        entry["prefill_vs_bf16"] = ratio(entry.get("prefill_tok_s"), base.get("prefill_tok_s"))


def target(text: str, value: float | None, limit: float, at_most: bool = False, note: str = "") -> dict:
    met = None if value is None else (value <= limit if at_most else value >= limit)
    return {"text": text, "value": value, "limit": limit, "met": met, "note": note}


def evaluate_targets(shape: str, cases: dict[str, dict]) -> list[dict]:
    """The issue's targets for llmslim nf4 on `shape` (mid and beyond), with the measured values."""
    nf4, disk = cases.get("llmslim-nf4", {}), cases.get(DISK_CASE, {})
    peak = target(
        f"load peak RSS ≤ footprint + {PEAK_SLACK_GIB} GiB (GiB over the footprint)",
        nf4.get("load_peak_minus_footprint_gib"),
        PEAK_SLACK_GIB,
        at_most=True,
    )
    if shape == "beyond":
        return [
            peak,
            target("decode ≥ 50% of the roofline (fraction)", nf4.get("roofline_fraction"), 0.5),
            disk_target(disk),
        ]
    return [
        target("footprint ≤ 0.30× transformers bf16's (×)", nf4.get("footprint_vs_bf16"), 0.30, at_most=True),
        peak,
        target("decode ≥ 3× transformers bf16's (×)", nf4.get("decode_vs_bf16"), 3.0),
    ]


def disk_target(disk: dict) -> dict:
    """With its experts on disk, the model generates within `RAM_BUDGET_GIB`: a memory cgroup's limit where one could be
    made (page cache included), else only its anonymous RSS is checked."""
    generated = bool(disk.get("decode_tok_s"))
    if disk.get("ram_budget_enforced"):
        peak = disk.get("cgroup_peak_bytes")
        return target(
            f"with experts on disk, in a memory cgroup limited to {RAM_BUDGET_GIB:g} GiB (page cache included): it generates "
            "(peak GiB the cgroup held)",
            peak / GIB if generated and peak is not None else None,
            RAM_BUDGET_GIB,
            at_most=True,
            note=f"{fmt(disk.get('decode_tok_s'))} tok/s" if generated else "it did not generate",
        )
    anon = disk.get("run_peak_anon_kib")
    return target(
        f"with experts on disk: anonymous RSS ≤ {RAM_BUDGET_GIB:g} GiB while it generates (GiB)",
        None if anon is None or not generated else anon * KIB / GIB,
        RAM_BUDGET_GIB,
        at_most=True,
        note="budget not enforced (no memory cgroup could be made): file-backed (page cache) pages come on top",
    )


def describe(entry: dict) -> str:
    if "skipped" in entry:
        return entry["skipped"]
    if "error" in entry:
        return f"ERROR {entry['error'][:300]}"
    return (
        f"load {entry['load_s']:.1f} s, peak {entry['load_hwm_kib'] * KIB / GIB:.2f} GiB, footprint {entry['footprint_bytes'] / GIB:.3f} "
        f"GiB, decode {fmt(entry.get('decode_tok_s'))} tok/s, prefill {fmt(entry.get('prefill_tok_s'), '.1f')} tok/s "
        f"({entry['wall_s']:.0f} s)"
    )


# ----------------------------------------------------------------------------- reporting


def markdown(report: dict) -> str:
    """One table per shape, the disk-offload memory, the targets and how long each part took."""
    info, s, bw = report["machine"], report["settings"], report["bandwidth"]
    v = info["versions"]
    bandwidth = f"{bw['read_gb_s']:.1f} GB/s read" if "read_gb_s" in bw else f"not measured ({bw.get('error')})"
    lines = [
        f"Measured {info['date']} on {info['cpu']}, {info['nproc']} cores, {info['total_ram_gib']:.0f} GiB RAM, "
        f"{s['threads']} threads; torch {v['torch']}, transformers {v['transformers']}, bitsandbytes {v['bitsandbytes']}; "
        f"memory bandwidth {bandwidth} (bench_speed's measurement). Decode: batch 1, {s['prompt_tokens']}-token prompt, "
        f"{s['new_tokens']} new tokens greedy, tok/s without the prompt's forward; prefill: one forward of "
        f"{s['prefill_tokens']} tokens; median of {s['repeats']} run(s), each case in a fresh process. Load peak: `VmHWM` "
        "at the end of the load (file-backed pages included). % roofline: decode tok/s over bandwidth / bytes read per "
        "token (every weight once, less the input embedding, only the routed share of the experts). " + kernel_note(report),
        "",
    ]
    for name, shape in report["shapes"].items():
        checkpoint = f", checkpoint {shape['checkpoint_bytes'] / GIB:.2f} GiB" if "checkpoint_bytes" in shape else ""
        lines += [f"**{name}**: {shape['description']}{checkpoint}", ""]
        if "error" in shape:
            lines += [f"error: {shape['error']}", ""]
            continue
        lines += [*shape_table(shape["cases"]), "", *notes(shape), ""]
    return "\n".join(lines).rstrip()


def kernel_note(report: dict) -> str:
    """Whether llmslim's AVX-512 BF16 4-bit kernels ran (as the children found), which decides the 4-bit experts' speed."""
    found = [
        e["llmslim_avx512_bf16_kernels"]
        for s in report["shapes"].values()
        for e in s["cases"].values()
        if "llmslim_avx512_bf16_kernels" in e
    ]
    if not found:
        return ""
    if found[0]:
        return " llmslim's AVX-512 BF16 kernels ran on this CPU."
    simd = report["machine"].get("simd")
    path = "its AVX2 path" if simd and {"avx2", "fma"} <= set(simd) else "its AVX2 path if the CPU has AVX2 and FMA, else its scalar loop"
    return f" This CPU has no AVX-512 BF16, so llmslim's 4-bit expert matmul (`mm_4bit`, on each routed expert's stored layout) ran {path}."


def shape_table(cases: dict[str, dict]) -> list[str]:
    lines = [
        "| case | load s | load peak GiB | footprint GiB | × bf16 | decode tok/s | × bf16 | % roofline | prefill tok/s | × bf16 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in cases.values():
        if "load_s" not in e:
            why = e.get("skipped") or f"error: {e.get('error', '')[:160]}"
            lines.append(f"| {e['label']} | {why.replace('|', '/')} | | | | | | | | |")
            continue
        roof = e["roofline_fraction"]
        lines.append(
            f"| {e['label']} | {e['load_s']:.1f} | {e['load_peak_gib']:.2f} | {e['footprint_gib']:.3f} | {fmt(e['footprint_vs_bf16'])} | "
            f"{fmt(e.get('decode_tok_s'))} | {fmt(e['decode_vs_bf16'])} | {fmt(None if roof is None else 100 * roof, '.0f', '%')} | "
            f"{fmt(e.get('prefill_tok_s'), '.1f')} | {fmt(e['prefill_vs_bf16'])} |"
        )
    return lines


def notes(shape: dict) -> list[str]:
    """Memory of the mapped cases, the targets, and the time each part took."""
    out = []
    for e in shape["cases"].values():
        mapped = e.get("footprint_in_mapped_checkpoint_bytes") or 0
        if mapped >= 0.01 * GIB:
            out.append(
                f"{e['label']}: {mapped / GIB:.2f} GiB of its tensors are views of the memory-mapped checkpoint; peak RSS "
                f"{e['run_peak_anon_kib'] * KIB / GIB:.2f} GiB anonymous and {e['run_peak_file_kib'] * KIB / GIB:.2f} GiB "
                f"file-backed over the whole run (load, decode, prefill), {e['load_peak_anon_kib'] * KIB / GIB:.2f} GiB "
                "anonymous at load" + ("; its files were dropped from the page cache before it started." if e.get("read_cold") else ".")
            )
            out.append("")
    if any("load_s" in e and "prefill_tok_s" not in e for e in shape["cases"].values()):
        out += ["Prefill not timed on this shape (the issue asks for decode only).", ""]
    out += ["Targets (the issue's, llmslim nf4):", ""]
    for t in shape.get("targets", []):
        verdict = "not measured" if t["met"] is None else ("**met**" if t["met"] else "**not met**")
        value = "" if t["value"] is None else f"{t['value']:.2f} (limit {t['limit']:g}) "
        out.append(f"- {t['text']}: {value}{verdict}" + (f"; {t['note']}" if t["note"] else ""))
    out += ["", "Time taken: " + time_taken(shape)]
    return out


def time_taken(shape: dict) -> str:
    written = shape["written"]
    reused = " (in an earlier run)" if written.get("reused") else ""
    parts = [f"writing the checkpoint{reused} {fmt(written.get('wall_s'), '.0f')} s, peak RSS {fmt(written.get('peak_rss_gib'))} GiB"]
    for e in shape["cases"].values():
        if "wall_s" in e:
            save = f", of which saving {e['save_s']:.0f} s" if "save_s" in e else ""
            parts.append(f"{e['label']} {e['wall_s']:.0f} s{save}")
    deleted = "; checkpoints deleted after the run" if shape.get("checkpoints_deleted") else ""
    return ", ".join(parts) + f" (each case: its whole child process){deleted}."


def plot(report: dict, path: Path) -> None:
    """Per shape: memory (load peak, footprint), decode tok/s against its roofline, prefill tok/s."""
    plt = pyplot()
    shapes = {n: s for n, s in report["shapes"].items() if s.get("cases")}
    if not shapes:
        return
    fig, axes = plt.subplots(len(shapes), 3, figsize=(16, 4.8 * len(shapes)), squeeze=False)
    for row, (name, shape) in enumerate(shapes.items()):
        entries = [e for e in shape["cases"].values() if "load_s" in e]
        labels = [e["label"].replace(" (", "\n(").replace(", ", ",\n") for e in entries]
        xs = list(range(len(entries)))
        ax = axes[row][0]
        ax.bar([x - 0.2 for x in xs], [e["load_peak_gib"] for e in entries], 0.4, label="load peak RSS", color="tab:red")
        ax.bar([x + 0.2 for x in xs], [e["footprint_gib"] for e in entries], 0.4, label="footprint", color="tab:green")
        ax.set(title=f"{name}: memory", ylabel="GiB")
        ax.legend(fontsize=8)
        ax = axes[row][1]
        bars = ax.bar(xs, [e.get("decode_tok_s") or 0 for e in entries], color="tab:blue", label="decode")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        roof = [e.get("roofline_tok_s") for e in entries]
        ax.scatter(
            [x for x, r in zip(xs, roof, strict=True) if r], [r for r in roof if r], marker="_", s=600, color="black", label="roofline"
        )
        ax.set(title=f"{name}: decode (batch 1)", ylabel="tok/s")
        ax.legend(fontsize=8)
        ax = axes[row][2]
        bars = ax.bar(xs, [e.get("prefill_tok_s") or 0 for e in entries], color="tab:orange")
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set(title=f"{name}: prefill ({report['settings']['prefill_tokens']} tokens)", ylabel="tok/s")
        for ax in axes[row]:
            ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=7)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape",
        default=",".join(DEFAULT_SHAPES),
        type=lambda v: parse_list(v, SHAPES, "shape"),
        help=f"comma list of {','.join(SHAPES)} (default {','.join(DEFAULT_SHAPES)}; tiny checks the script)",
    )
    parser.add_argument(
        "--cases", default=",".join(CASES), type=lambda v: parse_list(v, CASES, "case"), help=f"comma list: {','.join(CASES)}"
    )
    add_timing_arguments(parser, timeout=7200)
    add_threads_argument(parser)
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep the generated checkpoints (default: delete them at the end)")
    parser.add_argument("--save-to", help=argparse.SUPPRESS)  # child: save the loaded model there
    parser.add_argument("--no-prefill", action="store_true", help=argparse.SUPPRESS)  # child: decode only
    parser.add_argument("--memory-cgroup", help=argparse.SUPPRESS)  # child: join this (limited) memory cgroup first
    add_output_arguments(parser, "bench_moe")
    add_child_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child[0], args.child[1], args)
    if args.from_json:
        return publish_report(read_json(args.from_json), args, write=False)
    settings = {k: getattr(args, k) for k in (*TIMING_SETTINGS, "threads")}
    report: dict = {"machine": machine_info(), "settings": settings, "cases": args.cases, "shapes": {}}
    report["bandwidth"] = child(BANDWIDTH, "-", args, [])
    print(f"[bandwidth] {report['bandwidth'].get('read_gb_s') or report['bandwidth'].get('error')}", file=sys.stderr, flush=True)
    for name in args.shape:
        report["shapes"][name] = run_shape(name, args, report["bandwidth"].get("read_gb_s"))
    return publish_report(end_of_run(report), args)


def publish_report(report: dict, args: argparse.Namespace, write: bool = True) -> int:
    section = None if args.no_readme else README_SECTION
    print(publish("bench_moe", report, args.results_dir, markdown, plot, section, write))
    return 0


if __name__ == "__main__":
    sys.exit(main())
