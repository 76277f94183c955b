"""Scale benchmark: load random-init Llama-shaped checkpoints from ~1B to past this machine's RAM.

For each shape (1b: TinyLlama-1.1B, 3b: OpenLLaMA-3B, 7b: Llama-2-7B, 13b: Llama-2-13B, whose bf16
checkpoint, ~26 GB, is larger than 24 GB of RAM) it writes a random bf16 checkpoint tensor by
tensor, shard by shard (never the whole model in memory), then loads it in nf4 in a fresh child
process through llmslim and, where the bf16 checkpoint fits in RAM, through transformers +
bitsandbytes: peak RSS (`os.wait4`), load time, footprint (bytes of the model's tensors), and a
few generated tokens. The largest shape then runs with llmslim's disk offload under a budget
smaller than its quantized size (`offload="disk"`), generating tokens; the child records the
offload manager's own accounting and its peak RSS. On the 1b shape the planner (`llmslim plan`)
is checked against the loaded model in every format (weights within 1%).

Each checkpoint is deleted after its runs (`--keep` keeps them); free disk is checked first.

    python benchmarks/bench_scale.py                      # 1b,3b,7b,13b (~50 GB written, ~40 min here)
    python benchmarks/bench_scale.py --sizes 1b --no-bnb  # quick check

Writes benchmarks/results/bench_scale.json and .png and the table between `<!-- bench_scale:start -->`
and `<!-- bench_scale:end -->` in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from _harness import (
    GIB,
    KIB,
    REPO,
    RESULTS_DIR,
    finish_child,
    machine_info,
    publish,
    pyplot,
    recording_errors,
    run_child,
    save_figure,
    vm_kib,
)
from _models import bnb_config, footprint_bytes, storage_spans

README_BLOCKS = {"bench_scale": "bench_scale.json"}  # README marker -> the committed JSON it is rendered from (render.py)
README_SECTION = "## Scale (`benchmarks/bench_scale.py`)"
SHARD_BYTES = 2 * 10**9
_COMMON = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000, rms_norm_eps=1e-5, torch_dtype="bfloat16")
_COMMON.update(tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
SHAPES: dict[str, dict] = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
    "3b": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32, num_key_value_heads=32),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40),
}
PROMPT_TOKENS, NEW_TOKENS = 8, 4
PLAN_FORMATS = ("bf16", "int8", "nf4", "nf4+dq", "int4")


# ----------------------------------------------------------------------------- checkpoint writing (child)


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Llama checkpoint's tensors, in the order transformers saves them."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}"
        out += [
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
        ]
        out += [(f"{p}.self_attn.o_proj.weight", (h, h)), (f"{p}.mlp.gate_proj.weight", (i, h)), (f"{p}.mlp.up_proj.weight", (i, h))]
        out += [
            (f"{p}.mlp.down_proj.weight", (h, i)),
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
        ]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_checkpoint(folder: Path, shape: str, seed: int = 0) -> Path:
    """A random bf16 checkpoint of `shape`, written shard by shard (at most one shard in memory)."""
    import torch
    from safetensors.torch import save_file

    config = {**_COMMON, **SHAPES[shape]}
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, str]] = []
    shard: dict = {}
    shard_bytes, total = 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        shards.append({k: name for k in shard})
        shard, shard_bytes = {}, 0

    for name, dims in tensor_shapes(config):
        tensor = torch.ones(dims, dtype=torch.bfloat16) if len(dims) == 1 else (torch.randn(dims, generator=gen) * 0.02).to(torch.bfloat16)
        nbytes = tensor.numel() * 2
        if shard and shard_bytes + nbytes > SHARD_BYTES:
            flush()
        shard[name], shard_bytes, total = tensor, shard_bytes + nbytes, total + nbytes
    flush()
    _finish_checkpoint(tmp, folder, config, shards, total)
    return folder


def _finish_checkpoint(tmp: Path, folder: Path, config: dict, shards: list[dict[str, str]], total: int) -> None:
    n = len(shards)
    weight_map = {}
    for i, names in enumerate(shards):
        new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(tmp / next(iter(names.values())), tmp / new)
        weight_map.update({k: new for k in names})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


# ----------------------------------------------------------------------------- loads (child)


def child_load(case: str, model_dir: str, budget: int | None, offload_dir: str | None) -> dict:
    """Load per `case`, generate a few tokens; the measurements as a dict."""
    import torch

    import llmslim  # noqa: F401

    result: dict = {"import_rss_kib": vm_kib("VmRSS")}
    start = time.perf_counter()
    model = _load(case, Path(model_dir), budget, offload_dir)
    result["load_s"] = time.perf_counter() - start
    result["rss_after_load_kib"] = vm_kib("VmRSS")
    result["footprint_bytes"] = footprint_bytes(storage_spans(model))
    ids = torch.randint(3, 32000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS
        )
    result["generate_s"] = time.perf_counter() - start
    result["generated"] = out[0, PROMPT_TOKENS:].tolist()
    from llmslim.offload import offload_manager

    manager = offload_manager(model)
    if manager is not None:
        result["offload"] = {"blocks": len(manager.order), "peak_streamed_bytes": manager.peak_resident_bytes, "budget_bytes": budget}
    return result


def _load(case: str, path: Path, budget: int | None, offload_dir: str | None):
    import llmslim

    nf4 = llmslim.SlimConfig(weights="nf4")
    if case == "llmslim-nf4":
        return llmslim.from_pretrained(path, nf4, progress=False)
    if case == "llmslim-nf4-disk":
        return llmslim.from_pretrained(path, nf4, progress=False, offload="disk", offload_budget=budget, offload_dir=offload_dir)
    if case == "bnb-nf4":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(4), device_map="cpu")
    raise ValueError(f"unknown case {case!r}")


def child_plan_check(model_dir: str) -> dict:
    """Planner weight bytes against the loaded model's, every format (the issue's 1% check)."""
    import torch

    import llmslim
    from llmslim.plan import Workload, plan_model, this_machine
    from llmslim.plan.weights import format_config

    plan = plan_model(model_dir, this_machine(gpus=[]), Workload(context=2048))
    out = {}
    for fmt in PLAN_FORMATS:
        config = format_config(fmt) or llmslim.SlimConfig(weights=None)
        model = llmslim.from_pretrained(model_dir, config, dtype=torch.bfloat16 if fmt == "bf16" else None, progress=False)
        measured = footprint_bytes(storage_spans(model))
        planned = plan.formats[fmt].weights.total
        out[fmt] = {"planned_bytes": planned, "measured_bytes": measured, "error": planned / measured - 1}
        del model
    return out


def child_main(args: argparse.Namespace) -> int:
    result: dict = {}
    with recording_errors(result):
        if args.child == "write":
            result["path"] = str(write_checkpoint(Path(args.model), args.shape))
        elif args.child == "plan-check":
            result["formats"] = child_plan_check(args.model)
        else:
            result.update(child_load(args.child, args.model, args.budget, args.offload_dir))
    result["hwm_kib"] = vm_kib("VmHWM")
    return finish_child(result, args.result)


# ----------------------------------------------------------------------------- parent


def run_step(argv: list[str], timeout: float) -> dict:
    """This script as a child with `argv`; its result plus its peak RSS from `os.wait4`."""
    run = run_child(Path(__file__), argv, timeout, tail_lines=3)
    return run.merged(peak_rss_kib=run.peak_rss_bytes // KIB)


def checkpoint_gib(shape: str) -> float:
    config = {**_COMMON, **SHAPES[shape]}
    return sum(2 * _numel(dims) for _, dims in tensor_shapes(config)) / GIB


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def run_shape(shape: str, args: argparse.Namespace, largest: bool) -> dict:
    """Write the checkpoint, load it per case, disk-offload it when it is the largest; delete it."""
    folder = args.workdir / f"llama-{shape}-random"
    entry: dict = {"shape": shape, "checkpoint_gib": checkpoint_gib(shape), "cases": {}}
    start = time.perf_counter()
    written = run_step(["--child", "write", "--shape", shape, "--model", str(folder)], args.timeout)
    entry["write_s"] = time.perf_counter() - start
    if "error" in written:
        entry["error"] = written["error"]
        return entry
    log(f"[{shape}] wrote {entry['checkpoint_gib']:.1f} GiB in {entry['write_s']:.0f} s")
    cases = ["llmslim-nf4"] + (["bnb-nf4"] if args.bnb and entry["checkpoint_gib"] < args.bnb_max_gib else [])
    for case in cases:
        entry["cases"][case] = run_step(["--child", case, "--model", str(folder)], args.timeout)
        log(f"[{shape}] {case}: {describe(entry['cases'][case])}")
    if shape == "1b" and args.plan_check:
        entry["plan_check"] = run_step(["--child", "plan-check", "--model", str(folder)], args.timeout)
        log(f"[{shape}] plan check: {json.dumps(entry['plan_check'].get('formats', entry['plan_check']))[:300]}")
    if largest:
        entry["cases"]["llmslim-nf4-disk"] = run_disk_offload(folder, entry, args)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return entry


def run_disk_offload(folder: Path, entry: dict, args: argparse.Namespace) -> dict:
    """The largest model with disk offload, its budget a fraction of the nf4 footprint."""
    footprint = entry["cases"].get("llmslim-nf4", {}).get("footprint_bytes") or int(entry["checkpoint_gib"] * GIB * 0.28)
    budget = int(footprint * args.offload_fraction)
    offload_dir = args.workdir / f"{folder.name}-offload"
    result = run_step(
        ["--child", "llmslim-nf4-disk", "--model", str(folder), "--budget", str(budget), "--offload-dir", str(offload_dir)], args.timeout
    )
    shutil.rmtree(offload_dir, ignore_errors=True)
    log(f"[{entry['shape']}] disk offload, budget {budget / GIB:.2f} GiB: {describe(result)}")
    return result


def describe(r: dict) -> str:
    if "error" in r:
        return f"ERROR {r['error'][:300]}"
    return (
        f"load {r['load_s']:.1f} s, peak RSS {r['peak_rss_kib'] / 2**20:.2f} GiB, import {r['import_rss_kib'] / 2**20:.2f} GiB, "
        f"footprint {r['footprint_bytes'] / GIB:.2f} GiB, {NEW_TOKENS} tokens in {r['generate_s']:.1f} s"
    )


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_disk(shapes: list[str], workdir: Path) -> None:
    need = max(checkpoint_gib(s) for s in shapes) * 1.35 + 1  # the largest checkpoint + its nf4 offload copy
    free = shutil.disk_usage(workdir).free / GIB
    if free < need:
        raise SystemExit(
            f"bench_scale: {workdir} has {free:.0f} GiB free, the largest shape needs ~{need:.0f} GiB: free space or drop sizes"
        )


# ----------------------------------------------------------------------------- report


def targets(report: dict) -> dict:
    """llmslim peak RSS - footprint flat across sizes; the >RAM shape loads and generates; disk offload within budget."""
    rows = [
        (s["shape"], s["cases"]["llmslim-nf4"])
        for s in report["shapes"]
        if "error" not in s.get("cases", {}).get("llmslim-nf4", {"error": 1})
    ]
    overhead = {shape: (r["peak_rss_kib"] * 1024 - r["footprint_bytes"]) / GIB for shape, r in rows}
    out: dict = {"llmslim_peak_minus_footprint_gib": overhead}
    if len(overhead) > 1:
        out["overhead_growth_gib"] = max(overhead.values()) - min(overhead.values())
        out["overhead_flat"] = out["overhead_growth_gib"] <= report["slack_gib"]
    big = [s for s in report["shapes"] if s["checkpoint_gib"] > report["machine"]["total_ram_gib"]]
    if big:
        case = big[0]["cases"].get("llmslim-nf4", {})
        out["beyond_ram_loads_and_generates"] = "error" not in case and bool(case.get("generated"))
    for s in report["shapes"]:
        disk = s.get("cases", {}).get("llmslim-nf4-disk")
        if disk and "error" not in disk:
            budget = disk["offload"]["budget_bytes"]
            above_import = disk["peak_rss_kib"] * 1024 - disk["import_rss_kib"] * 1024
            out["disk_offload"] = {
                "shape": s["shape"], "budget_gib": budget / GIB, "peak_above_import_gib": above_import / GIB,
                "within_budget_plus_slack": above_import <= budget + report["slack_gib"] * GIB,
            }  # fmt: skip
    return out


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Measured {m['date']} on {m['cpu']}, {m['nproc']} cores, {m['total_ram_gib']:.0f} GiB RAM. Random-init Llama shapes, "
        f"bf16 checkpoints; nf4 with double quantization; {NEW_TOKENS} tokens generated after an {PROMPT_TOKENS}-token prompt.",
        "",
        "| shape | checkpoint GiB | loader | load s | peak RSS GiB | footprint GiB | peak − footprint GiB | generate s |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for s in report["shapes"]:
        if "error" in s:
            lines.append(f"| {s['shape']} | {s['checkpoint_gib']:.1f} | error: {s['error'][:100]} | | | | | |")
        for case, r in s.get("cases", {}).items():
            if "error" in r:
                lines.append(f"| {s['shape']} | {s['checkpoint_gib']:.1f} | {case} | error: {r['error'][:100]} | | | | |")
                continue
            peak, foot = r["peak_rss_kib"] / 2**20, r["footprint_bytes"] / GIB
            label = case + (f" (budget {r['offload']['budget_bytes'] / GIB:.2f} GiB)" if "offload" in r else "")
            cells = [
                s["shape"],
                f"{s['checkpoint_gib']:.1f}",
                label,
                f"{r['load_s']:.1f}",
                f"{peak:.2f}",
                f"{foot:.2f}",
                f"{peak - foot:.2f}",
            ]
            lines.append("| " + " | ".join([*cells, f"{r['generate_s']:.1f}"]) + " |")
    lines += ["", "Targets: " + json.dumps(report["targets"])]
    for s in report["shapes"]:
        check = s.get("plan_check", {}).get("formats")
        if check:
            cells = ", ".join(f"{fmt} {v['error'] * 100:+.2f}%" for fmt, v in check.items())
            lines += ["", f"Planner weight bytes vs loaded model, {s['shape']} shape: {cells}"]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Peak RSS and footprint against checkpoint size, per loader."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for case, color in (("llmslim-nf4", "tab:blue"), ("bnb-nf4", "tab:red"), ("llmslim-nf4-disk", "tab:green")):
        points = [
            (s["checkpoint_gib"], s["cases"][case]) for s in report["shapes"] if "error" not in s.get("cases", {}).get(case, {"error": 1})
        ]
        if points:
            ax.plot([p[0] for p in points], [r["peak_rss_kib"] / 2**20 for _, r in points], "o-", color=color, label=f"{case} peak RSS")
    points = [
        (s["checkpoint_gib"], s["cases"]["llmslim-nf4"])
        for s in report["shapes"]
        if "error" not in s.get("cases", {}).get("llmslim-nf4", {"error": 1})
    ]
    if points:
        ax.plot([p[0] for p in points], [r["footprint_bytes"] / GIB for _, r in points], "k--", label="nf4 footprint")
    ax.axhline(report["machine"]["total_ram_gib"], color="gray", lw=0.8, ls=":", label="machine RAM")
    ax.set(xlabel="bf16 checkpoint size (GiB)", ylabel="GiB", title="Peak RSS of an nf4 load against model size")
    ax.legend(fontsize=8)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1b,3b,7b,13b", help="comma list of shapes: " + ",".join(SHAPES))
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "checkpoints", help="where checkpoints are written")
    parser.add_argument("--no-bnb", dest="bnb", action="store_false", help="skip transformers + bitsandbytes")
    parser.add_argument("--bnb-max-gib", type=float, default=14.0, help="largest bf16 checkpoint tf+bnb loads (it maps the file)")
    parser.add_argument("--no-plan-check", dest="plan_check", action="store_false", help="skip the planner check on the 1b shape")
    parser.add_argument("--offload-fraction", type=float, default=0.5, help="disk-offload budget as a share of the nf4 footprint")
    parser.add_argument("--slack-gib", type=float, default=0.5, help="constant the targets allow above footprint / budget")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--offload-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in SHAPES]
    if unknown or not args.sizes:
        parser.error(f"--sizes must be among {list(SHAPES)}, got {unknown or args.sizes}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    check_disk(args.sizes, args.workdir)
    report: dict = {"machine": machine_info(), "slack_gib": args.slack_gib, "shapes": []}
    largest = max(args.sizes, key=checkpoint_gib)
    for shape in sorted(args.sizes, key=checkpoint_gib):
        report["shapes"].append(run_shape(shape, args, largest=shape == largest))
    report["targets"] = targets(report)
    print(publish("bench_scale", report, args.results_dir, markdown, plot, None if args.no_readme else README_SECTION))
    return 0


if __name__ == "__main__":
    sys.exit(main())
