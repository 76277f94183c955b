"""GPU benchmark: load time, GPU memory and decode/prefill speed per weight format on CUDA.

llmslim's int8 / nf4 / int4 against transformers bf16 and transformers+bitsandbytes int8 / nf4 on the
random TinyLlama-1.1B shape, each case in a fresh child process (this script with `--child CASE
MODEL_DIR`). Per case the child

- loads the model with `device_map="cuda"`: wall seconds, `torch.cuda.max_memory_allocated` over
  the load, and the model's footprint counted from its tensors (scales and absmax included);
- times decode and prefill exactly as bench_speed.py does (batch 1, greedy, `generate`; decode
  tok/s without the prompt's forward), synchronising the GPU before each clock read;
- records the GPU peak over decode and prefill, and the greedy tokens of the prefill forward, which
  the parent compares with bf16's (top-1 agreement: a cheap check that the format computes the
  right thing on this device).

A first child measures the GPU's read bandwidth (a bf16 sum over 4 GiB) for the decode roofline.

Cases ending in `+compile` decode with a static cache and a compiled, CUDA-graph-captured step:
`llmslim.compile_decode` for llmslim, transformers' own compiled generation (static cache plus a
`CompileConfig`) for the others. They record the first call's seconds (compiling), the graph breaks
torch.compile met (`torch._dynamo` counters) and whether the greedy tokens equal the eager case's.

`qlora-*` cases train LoRA adapters (r 16, all linear layers, AdamW) on nf4 with double quantization
and gradient checkpointing, through plain peft (`prepare_model_for_kbit_training`, `get_peft_model`),
llmslim's load against transformers + bitsandbytes' in the same loop: seconds per step, tokens/s and
`torch.cuda.max_memory_allocated`, on the 1.1B shape and SmolLM2-135M's shape (random weights).

    python benchmarks/bench_gpu.py                         # on a machine with a CUDA GPU
    python benchmarks/bench_gpu.py --from-json /path/from/the/gpu/bench_gpu.json   # render it here

Writes bench_gpu.json and .png under --results-dir, prints a markdown table and puts it in
benchmarks/README.md between `<!-- bench_gpu:start -->` and `<!-- bench_gpu:end -->`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

from _harness import (
    GB,
    GIB,
    add_child_arguments,
    add_output_arguments,
    finish_child,
    fmt,
    machine_info,
    publish,
    pyplot,
    ratio,
    read_json,
    recording_errors,
    save_figure,
    write_json,
)
from _models import (
    DEFAULT_TINYLLAMA,
    TIMING_SETTINGS,
    add_timing_arguments,
    load_bf16,
    load_bnb,
    load_llmslim,
    prepare_tinyllama,
    random_ids,
    run_case,
    time_decode,
    timed,
    weight_bytes_per_token,
)

BANDWIDTH = "bandwidth"
README_BLOCKS = {"bench_gpu": "bench_gpu.json"}  # README marker -> the committed JSON it is rendered from (render.py)
README_SECTION = "## GPU load, memory and speed (`benchmarks/bench_gpu.py`)"


LOADERS = {
    "bf16": ("transformers bf16", partial(load_bf16, device_map="cuda")),
    "llmslim-int8": ("llmslim int8", partial(load_llmslim, weights="int8", device_map="cuda")),
    "llmslim-nf4": ("llmslim nf4", partial(load_llmslim, weights="nf4", device_map="cuda")),
    "llmslim-int4": ("llmslim int4", partial(load_llmslim, weights="int4", device_map="cuda")),
    "llmslim-int8-t6": ("llmslim int8, int8_threshold 6", partial(load_llmslim, weights="int8", int8_threshold=6.0, device_map="cuda")),
    "bnb-int8": ("transformers+bnb int8", partial(load_bnb, bits=8, device_map="cuda")),
    "bnb-nf4": ("transformers+bnb nf4", partial(load_bnb, bits=4, device_map="cuda")),
}
COMPILED = "+compile"
CASES = {**{case: (label, loader) for case, (label, loader) in LOADERS.items()}}
CASES.update({case + COMPILED: (label + ", compiled", loader) for case, (label, loader) in LOADERS.items() if case != "llmslim-int8-t6"})
QLORA_SHAPES = {"tinyllama": "1.1B shape", "smollm2": "SmolLM2-135M shape"}
QLORA_CASES = {f"qlora-{lib}-{shape}": (lib, shape) for shape in QLORA_SHAPES for lib in ("llmslim", "bnb")}
DEFAULT_CASES = [
    "bf16", "llmslim-nf4", "llmslim-int8", "llmslim-int4", "bnb-nf4", "bnb-int8",
    "bf16+compile", "llmslim-nf4+compile", "llmslim-int8+compile", "llmslim-int4+compile", "bnb-nf4+compile", "bnb-int8+compile",
    *QLORA_CASES,
]  # fmt: skip
BASE_CASE = "bf16"
PEERS = {
    "llmslim-int8-t6": "bnb-int8",
    "llmslim-nf4": "bnb-nf4",
    "llmslim-nf4+compile": "bnb-nf4",
}  # same format in transformers+bitsandbytes
# issue 22's targets: (name, case, measure, reference case or None, at least)
TARGETS = (
    ("nf4 compiled decode >= 400 tok/s", "llmslim-nf4+compile", "decode_tok_s", None, 400.0),
    ("nf4 compiled decode >= 5x bnb nf4 eager", "llmslim-nf4+compile", "decode_tok_s", "bnb-nf4", 5.0),
    ("int8 eager decode >= bnb int8 eager", "llmslim-int8", "decode_tok_s", "bnb-int8", 1.0),
    ("int8 compiled decode >= bnb int8 compiled", "llmslim-int8+compile", "decode_tok_s", "bnb-int8+compile", 1.0),
    ("int8 eager prefill >= bnb int8 eager", "llmslim-int8", "prefill_tok_s", "bnb-int8", 1.0),
    ("int4 eager decode >= nf4 eager", "llmslim-int4", "decode_tok_s", "llmslim-nf4", 1.0),
    ("int4 compiled decode >= nf4 compiled", "llmslim-int4+compile", "decode_tok_s", "llmslim-nf4+compile", 1.0),
    *(
        (f"QLoRA {QLORA_SHAPES[shape]}: step memory <= bnb+peft", f"qlora-llmslim-{shape}", "train_peak_gib", f"qlora-bnb-{shape}", None)
        for shape in QLORA_SHAPES
    ),
    *(
        (f"QLoRA {QLORA_SHAPES[shape]}: tokens/s >= bnb+peft", f"qlora-llmslim-{shape}", "tok_s", f"qlora-bnb-{shape}", 1.0)
        for shape in QLORA_SHAPES
    ),
)


# ----------------------------------------------------------------------------- child side


def child_bandwidth(repeats: int) -> dict:
    """GPU read bandwidth: a bf16 sum over 4 GiB (median of `repeats` after a warm-up)."""
    import torch

    data = torch.ones(2 * GIB, dtype=torch.bfloat16, device="cuda")

    def read():
        data.sum(dtype=torch.float32)
        torch.cuda.synchronize()

    read()
    times, _ = timed(read, max(repeats, 5))
    return {"read_gb_s": data.numel() * 2 / statistics.median(times) / GB, "device_name": torch.cuda.get_device_name()}


def child_case(case: str, model_dir: Path, args: argparse.Namespace) -> dict:
    import torch
    from torch._dynamo.utils import counters

    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = CASES[case][1](model_dir)
    torch.cuda.synchronize()
    result: dict = {"load_s": time.perf_counter() - start, "load_peak_gib": torch.cuda.max_memory_allocated() / GIB}
    model.eval()
    result.update(weight_bytes_per_token(model))
    result["devices"] = sorted({t.device.type for t in model.state_dict().values()})
    prompt, prefill = random_ids(model.config.vocab_size, args.prompt_tokens, args.prefill_tokens)
    prompt, prefill = prompt.cuda(), prefill.cuda()
    torch.cuda.reset_peak_memory_stats()
    if case.endswith(COMPILED):
        result.update(compile_generation(model, case, prompt, args.new_tokens))
    # generate reads each new token back to the host (its stopping check), so its clock needs no extra sync
    result.update(time_decode(model, prompt, args.new_tokens, args.repeats, torch.inference_mode))
    if case.endswith(COMPILED):
        result["graph_breaks"] = sum(counters["graph_break"].values())
        result["graph_break_reasons"] = list(counters["graph_break"])[:5]

    def forward():
        logits = model(prefill).logits  # (1, tokens, vocab)
        torch.cuda.synchronize()
        return logits

    with torch.inference_mode():
        forward()  # warm-up
        times, logits = timed(forward, args.repeats)
    seconds = statistics.median(times)
    result.update(prefill_s=seconds, prefill_s_runs=times, prefill_tokens=prefill.shape[1], prefill_tok_s=prefill.shape[1] / seconds)
    result["run_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    result["prefill_top1"] = logits[0].argmax(-1).tolist()  # (tokens,)
    return result


def compile_generation(model, case: str, prompt, new_tokens: int) -> dict:
    """Switch `model` to compiled static-cache generation and run the first (compiling) call: its seconds."""
    import torch
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    import llmslim

    if case.startswith("llmslim"):
        llmslim.compile_decode(model)
    else:  # transformers compiles the decode step on CUDA by itself once the cache is static
        model.generation_config.cache_implementation = "static"
        model.generation_config.compile_config = CompileConfig()
    model.generation_config.max_cache_len = prompt.shape[1] + new_tokens  # time_decode's size: one compile serves every call
    counters.clear()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return {"compile_s": time.perf_counter() - start}


def child_qlora(case: str, model_dir: Path, args: argparse.Namespace) -> dict:
    """LoRA training steps on an nf4 base through plain peft, llmslim's load or transformers + bitsandbytes'."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    library, _ = QLORA_CASES[case]
    torch.manual_seed(0)
    model = load_llmslim(model_dir, "nf4", device_map="cuda") if library == "llmslim" else load_bnb(model_dir, 4, device_map="cuda")
    result: dict = weight_bytes_per_token(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batch = torch.randint(0, model.config.vocab_size, (args.qlora_batch, args.qlora_tokens), generator=torch.Generator().manual_seed(0))
    batch = batch.cuda()
    model.train()

    def step() -> float:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # waits for the GPU

    torch.cuda.reset_peak_memory_stats()
    step()  # warm-up
    times, losses = timed_steps(step, args.qlora_steps)
    seconds = statistics.median(times)
    result.update(
        step_s=seconds,
        step_s_runs=times,
        tok_s=batch.numel() / seconds,
        train_peak_gib=torch.cuda.max_memory_allocated() / GIB,
        losses=losses,
        trainable_params=sum(p.numel() for p in trainable),
        batch=list(batch.shape),
    )
    return result


def timed_steps(step, count: int) -> tuple[list[float], list[float]]:
    times, values = [], []
    for _ in range(count):
        start = time.perf_counter()
        values.append(step())
        times.append(time.perf_counter() - start)
    return times, values


def child_main(case: str, model_dir: str, args: argparse.Namespace) -> int:
    # transformers >= 5.25 swaps in layers from the Hugging Face kernels hub by default where it can download them (an
    # H200 here has no network: every bf16 and bitsandbytes load failed on it); llmslim's loads use none, so none do
    os.environ.setdefault("USE_HUB_KERNELS", "0")
    result: dict = {}
    with recording_errors(result):
        if case == BANDWIDTH:
            result.update(child_bandwidth(args.repeats))
        elif case in QLORA_CASES:
            result.update(child_qlora(case, Path(model_dir), args))
        else:
            result.update(child_case(case, Path(model_dir), args))
    return finish_child(result, args.result)


# ----------------------------------------------------------------------------- parent side


def add_derived(cases: dict[str, dict], read_gb_s: float | None) -> None:
    """Ratios against bf16, the decode roofline, and top-1 agreement of the prefill with bf16's."""
    base = cases.get(BASE_CASE, {})
    for entry in cases.values():
        entry["decode_vs_bf16"] = ratio(entry.get("decode_tok_s"), base.get("decode_tok_s"))
        entry["prefill_vs_bf16"] = ratio(entry.get("prefill_tok_s"), base.get("prefill_tok_s"))
        entry["footprint_vs_bf16"] = ratio(entry.get("model_bytes"), base.get("model_bytes"))
        weight_bytes = entry.get("weight_bytes_per_token")
        roofline = None if read_gb_s is None or not weight_bytes else read_gb_s * GB / weight_bytes
        entry["roofline_fraction"] = ratio(entry.get("decode_tok_s"), roofline)
    for case, entry in cases.items():
        entry["top1_vs_bf16"] = agreement(entry.get("prefill_top1"), base.get("prefill_top1"))
        entry["top1_vs_peer"] = agreement(entry.get("prefill_top1"), cases.get(PEERS.get(case), {}).get("prefill_top1"))
        eager = cases.get(case.removesuffix(COMPILED), {}) if case.endswith(COMPILED) else {}
        if eager.get("tokens") and entry.get("tokens"):  # greedy tokens equal to the eager case's before the first difference
            same = [a == b for a, b in zip(eager["tokens"], entry["tokens"], strict=True)]
            entry["tokens_same_as_eager"] = same.index(False) if False in same else len(same)


def targets(cases: dict[str, dict]) -> list[dict]:
    """Issue 22's targets, each met or not (None where a case is missing)."""
    rows = []
    for name, case, measure, reference, at_least in TARGETS:
        value = cases.get(case, {}).get(measure)
        if reference is None:
            got, met = value, None if value is None else value >= at_least
        else:
            got = ratio(value, cases.get(reference, {}).get(measure))
            if at_least is None:  # a memory target: at most the reference's
                met = None if got is None else got <= 1.0
            else:
                met = None if got is None else got >= at_least
        rows.append({"target": name, "value": got, "met": met})
    return rows


def agreement(mine: list[int] | None, reference: list[int] | None) -> float | None:
    """Share of positions where two greedy token lists agree (None when either is missing)."""
    return sum(a == b for a, b in zip(mine, reference, strict=True)) / len(reference) if mine and reference else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child[0], args.child[1], args)
    if args.from_json:  # e.g. the JSON a GPU machine wrote: derive again, then write it here with the table and PNG
        report = read_json(args.from_json)
        add_derived(report["cases"], report["bandwidth"].get("read_gb_s"))
        return publish_report(report, args)
    settings = {k: getattr(args, k) for k in TIMING_SETTINGS}
    report: dict = {"machine": machine_info(), "settings": settings, "model": "TinyLlama-1.1B shape, random bf16 weights"}
    report["bandwidth"] = run_case(Path(__file__), BANDWIDTH, "-", args)
    print(f"[bandwidth] {report['bandwidth']}", file=sys.stderr, flush=True)
    folders = {"tinyllama": prepare_tinyllama(args.tinyllama.resolve(), args.timeout)}
    if any(case in QLORA_CASES and QLORA_CASES[case][1] == "smollm2" for case in args.cases):
        folders["smollm2"] = prepare_tinyllama(args.smollm2_shape.resolve(), args.timeout, shape="smollm2")
    qlora = [f"--qlora-{key}={getattr(args, 'qlora_' + key)}" for key in ("batch", "tokens", "steps")]
    cases: dict[str, dict] = {}
    report["cases"] = cases
    for case in args.cases:
        if case in QLORA_CASES:
            library, shape = QLORA_CASES[case]
            label = f"QLoRA {QLORA_SHAPES[shape]}, {'llmslim' if library == 'llmslim' else 'transformers+bnb'} + peft"
            cases[case] = {"label": label, **run_case(Path(__file__), case, folders[shape], args, qlora)}
        else:
            cases[case] = {"label": CASES[case][0], **run_case(Path(__file__), case, folders["tinyllama"], args)}
        hidden = ("prefill_top1", "tokens", "traceback", "decode_s_runs", "prefill_s_runs", "step_s_runs")
        print(f"[{case}] { {k: v for k, v in cases[case].items() if k not in hidden} }", file=sys.stderr, flush=True)
        write_json(args.results_dir / "bench_gpu.partial.json", report)  # what a run cut short still leaves
    add_derived(cases, report["bandwidth"].get("read_gb_s"))
    return publish_report(report, args)


def publish_report(report: dict, args: argparse.Namespace) -> int:
    """Write the JSON and PNG (if matplotlib is here), print the table and put it in the README; 1 if a case failed."""
    report["targets"] = targets(report["cases"])
    print(publish("bench_gpu", report, args.results_dir, markdown, plot, None if args.no_readme else README_SECTION))
    return 0 if all("error" not in e for e in report["cases"].values()) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    every = [*CASES, *QLORA_CASES]
    parser.add_argument("--cases", type=lambda s: s.split(","), default=DEFAULT_CASES, help=f"comma list of {','.join(every)}")
    add_timing_arguments(parser, timeout=600)
    parser.add_argument("--tinyllama", type=Path, default=DEFAULT_TINYLLAMA, help="random 1.1B checkpoint folder (created if missing)")
    parser.add_argument(
        "--smollm2-shape", type=Path, default=DEFAULT_TINYLLAMA.parent / "smollm2-shape-random", help="random SmolLM2-135M-shaped folder"
    )
    parser.add_argument("--qlora-batch", type=int, default=4, help="QLoRA sequences per step")
    parser.add_argument("--qlora-tokens", type=int, default=512, help="QLoRA tokens per sequence")
    parser.add_argument("--qlora-steps", type=int, default=5, help="QLoRA timed steps (after one warm-up)")
    add_output_arguments(parser, "bench_gpu", "no measuring: re-derive and render this bench_gpu.json into --results-dir")
    add_child_arguments(parser)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.cases) - set(every))
    if unknown:
        parser.error(f"unknown case(s) {unknown}: choose from {','.join(every)}")
    return args


def markdown(report: dict) -> str:
    info, s, bw = report["machine"], report["settings"], report["bandwidth"]
    v = info["versions"]
    lines = [
        f"Measured {info['date']} on {bw.get('device_name', 'a CUDA GPU')} ({info['nproc']} CPU cores); torch {v['torch']}, "
        f"transformers {v['transformers']}, bitsandbytes {v['bitsandbytes']}; GPU read bandwidth "
        f"{fmt(bw.get('read_gb_s'), '.0f')} GB/s (bf16 sum over 4 GiB). {report['model']}.",
        "",
        f"Decode: batch 1, {s['prompt_tokens']}-token prompt, {s['new_tokens']} new tokens greedy, without the prompt's forward; "
        f"prefill: one forward of {s['prefill_tokens']} tokens; median of {s['repeats']} after a warm-up, each case in a fresh "
        "process. Load peak: `torch.cuda.max_memory_allocated` over `from_pretrained`; run peak: over decode and prefill. "
        f"Footprint: the model's tensors. Top-1: share of the {s['prefill_tokens']} prefill positions whose greedy token equals bf16's, "
        "or that of transformers+bitsandbytes in the same format (llmslim nf4 vs bnb nf4). The weights are random, so the logits "
        "are nearly flat and any 4-bit rounding moves the top-1 token: bf16 agreement is low for both libraries' 4-bit formats; "
        "the same-format column is the correctness check.",
        "",
        "| case | load s | footprint GiB | load peak GiB | run peak GiB | decode tok/s | × bf16 | % roofline "
        "| prefill tok/s | × bf16 | top-1 vs bf16 | top-1 vs bnb |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    eager = {k: e for k, e in report["cases"].items() if not k.endswith(COMPILED) and k not in QLORA_CASES}
    compiled = {k: e for k, e in report["cases"].items() if k.endswith(COMPILED)}
    qlora = {k: e for k, e in report["cases"].items() if k in QLORA_CASES}
    for entry in eager.values():
        if "error" in entry:
            lines.append(f"| {entry['label']} | error: {entry['error'][:120]} | | | | | | | | | | |")
            continue
        lines.append(
            f"| {entry['label']} | {entry['load_s']:.1f} | {entry['model_bytes'] / GIB:.3f} | {entry['load_peak_gib']:.2f} | "
            f"{entry['run_peak_gib']:.2f} | {entry['decode_tok_s']:.1f} | {fmt(entry['decode_vs_bf16'])} | "
            f"{fmt(entry['roofline_fraction'] and 100 * entry['roofline_fraction'], '.1f', '%')} | {entry['prefill_tok_s']:.0f} | "
            f"{fmt(entry['prefill_vs_bf16'])} | {fmt(entry['top1_vs_bf16'], '.3f')} | {fmt(entry['top1_vs_peer'], '.3f')} |"
        )
    if compiled:
        lines += [
            "",
            "Compiled decode (static cache, `torch.compile` mode reduce-overhead: CUDA graphs): `llmslim.compile_decode` for llmslim, "
            "transformers' own compiled generation for the others. First call: the seconds of the first `generate` (compiling). "
            "Graph breaks: torch.compile's count over the run. Same as eager: how many of the decoded tokens equal the eager "
            "case's before the first difference. The random weights make the logits nearly flat, and the compiled case rounds "
            "differently (attention over the static cache, fused kernels), which flips near-ties early; tests/test_gpu.py "
            "checks compiled against eager logits step by step instead.",
            "",
            "| case | first call s | decode tok/s | × bf16 eager | % roofline | graph breaks | same as eager |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for entry in compiled.values():
            if "error" in entry:
                lines.append(f"| {entry['label']} | error: {entry['error'][:120]} | | | | | |")
                continue
            same = entry.get("tokens_same_as_eager")
            same = "–" if same is None else f"{same}/{len(entry['tokens'])}"
            lines.append(
                f"| {entry['label']} | {entry['compile_s']:.1f} | {entry['decode_tok_s']:.1f} | {fmt(entry['decode_vs_bf16'])} | "
                f"{fmt(entry['roofline_fraction'] and 100 * entry['roofline_fraction'], '.1f', '%')} | {entry['graph_breaks']} | "
                f"{same} |"
            )
    if qlora:
        lines += [
            "",
            "QLoRA through plain peft on nf4 with double quantization (`prepare_model_for_kbit_training`, gradient checkpointing, "
            "LoRA r 16 on all linear layers, AdamW): llmslim's load against transformers + bitsandbytes' in the same loop; "
            "median step after a warm-up; peak: `torch.cuda.max_memory_allocated` over the steps.",
            "",
            "| case | batch | step s | tokens/s | peak GiB | loss first → last |",
            "|---|---|---:|---:|---:|---|",
        ]
        for entry in qlora.values():
            if "error" in entry:
                lines.append(f"| {entry['label']} | error: {entry['error'][:120]} | | | | |")
                continue
            batch = "x".join(str(n) for n in entry["batch"])
            lines.append(
                f"| {entry['label']} | {batch} | {entry['step_s']:.3f} | {entry['tok_s']:.0f} | {entry['train_peak_gib']:.2f} | "
                f"{entry['losses'][0]:.3f} → {entry['losses'][-1]:.3f} |"
            )
    if report.get("targets"):
        lines += ["", "Issue 22's targets (– where a case it needs is missing from this run):", ""]
        lines += ["| target | measured | met |", "|---|---:|---|"]
        for row in report["targets"]:
            met = "–" if row["met"] is None else "MET" if row["met"] else "not met"
            lines.append(f"| {row['target']} | {fmt(row['value'])} | {met} |")
    if report.get("notes"):
        lines += ["", *(f"- {note}" for note in report["notes"])]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    decode = {k: e for k, e in report["cases"].items() if "error" not in e and "decode_tok_s" in e}
    eager = {k: e for k, e in decode.items() if not k.endswith(COMPILED)}
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    panels = (
        ("decode tok/s (batch 1)", decode, [e["decode_tok_s"] for e in decode.values()]),
        ("prefill tok/s (512 tokens)", eager, [e["prefill_tok_s"] for e in eager.values()]),
        ("GPU GiB: footprint / load peak", eager, None),
    )
    for ax, (title, cases, values) in zip(axes, panels, strict=True):
        labels = [e["label"] for e in cases.values()]
        if values is None:
            y = range(len(labels))
            ax.barh([i + 0.2 for i in y], [e["model_bytes"] / GIB for e in cases.values()], height=0.4, label="footprint")
            ax.barh([i - 0.2 for i in y], [e["load_peak_gib"] for e in cases.values()], height=0.4, label="load peak")
            ax.legend()
        else:
            ax.barh(labels, values)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_title(title)
    fig.suptitle(f"{report['model']} on {report['bandwidth'].get('device_name', 'GPU')}")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
