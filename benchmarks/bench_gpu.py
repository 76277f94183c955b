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

    python benchmarks/bench_gpu.py                         # on a machine with a CUDA GPU
    python benchmarks/bench_gpu.py --from-json /path/from/the/gpu/bench_gpu.json   # render it here

Writes bench_gpu.json and .png under --results-dir, prints a markdown table and puts it in
benchmarks/README.md between `<!-- bench_gpu:start -->` and `<!-- bench_gpu:end -->`.
"""

from __future__ import annotations

import argparse
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


CASES = {
    "bf16": ("transformers bf16", partial(load_bf16, device_map="cuda")),
    "llmslim-int8": ("llmslim int8", partial(load_llmslim, weights="int8", device_map="cuda")),
    "llmslim-nf4": ("llmslim nf4", partial(load_llmslim, weights="nf4", device_map="cuda")),
    "llmslim-int4": ("llmslim int4", partial(load_llmslim, weights="int4", device_map="cuda")),
    "llmslim-int8-t6": ("llmslim int8, int8_threshold 6", partial(load_llmslim, weights="int8", int8_threshold=6.0, device_map="cuda")),
    "bnb-int8": ("transformers+bnb int8", partial(load_bnb, bits=8, device_map="cuda")),
    "bnb-nf4": ("transformers+bnb nf4", partial(load_bnb, bits=4, device_map="cuda")),
}
BASE_CASE = "bf16"
PEERS = {"llmslim-int8-t6": "bnb-int8", "llmslim-nf4": "bnb-nf4"}  # the same format and settings in transformers+bitsandbytes


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
    # generate reads each new token back to the host (its stopping check), so its clock needs no extra sync
    result.update(time_decode(model, prompt, args.new_tokens, args.repeats, torch.inference_mode))

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


def child_main(case: str, model_dir: str, args: argparse.Namespace) -> int:
    result: dict = {}
    with recording_errors(result):
        result.update(child_bandwidth(args.repeats) if case == BANDWIDTH else child_case(case, Path(model_dir), args))
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
    path = prepare_tinyllama(args.tinyllama.resolve(), args.timeout)
    cases: dict[str, dict] = {}
    for case in args.cases:
        cases[case] = {"label": CASES[case][0], **run_case(Path(__file__), case, path, args)}
        shown = {k: v for k, v in cases[case].items() if k not in ("prefill_top1", "traceback", "decode_s_runs", "prefill_s_runs")}
        print(f"[{case}] {shown}", file=sys.stderr, flush=True)
    add_derived(cases, report["bandwidth"].get("read_gb_s"))
    report["cases"] = cases
    return publish_report(report, args)


def publish_report(report: dict, args: argparse.Namespace) -> int:
    """Write the JSON and PNG (if matplotlib is here), print the table and put it in the README; 1 if a case failed."""
    print(publish("bench_gpu", report, args.results_dir, markdown, plot, None if args.no_readme else README_SECTION))
    return 0 if all("error" not in e for e in report["cases"].values()) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=lambda s: s.split(","), default=list(CASES), help=f"comma list of {','.join(CASES)}")
    add_timing_arguments(parser, timeout=600)
    parser.add_argument("--tinyllama", type=Path, default=DEFAULT_TINYLLAMA, help="random 1.1B checkpoint folder (created if missing)")
    add_output_arguments(parser, "bench_gpu", "no measuring: re-derive and render this bench_gpu.json into --results-dir")
    add_child_arguments(parser)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}: choose from {','.join(CASES)}")
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
    for entry in report["cases"].values():
        if "error" in entry:
            lines.append(f"| {entry['label']} | error: {entry['error'][:120]} | | | | | | | | | | |")
            continue
        lines.append(
            f"| {entry['label']} | {entry['load_s']:.1f} | {entry['model_bytes'] / GIB:.3f} | {entry['load_peak_gib']:.2f} | "
            f"{entry['run_peak_gib']:.2f} | {entry['decode_tok_s']:.1f} | {fmt(entry['decode_vs_bf16'])} | "
            f"{fmt(entry['roofline_fraction'] and 100 * entry['roofline_fraction'], '.1f', '%')} | {entry['prefill_tok_s']:.0f} | "
            f"{fmt(entry['prefill_vs_bf16'])} | {fmt(entry['top1_vs_bf16'], '.3f')} | {fmt(entry['top1_vs_peer'], '.3f')} |"
        )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    good = {k: e for k, e in report["cases"].items() if "error" not in e}
    labels = [e["label"] for e in good.values()]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (
        ("decode tok/s", [e["decode_tok_s"] for e in good.values()]),
        ("prefill tok/s (512 tokens)", [e["prefill_tok_s"] for e in good.values()]),
        ("GPU GiB: footprint / load peak", None),
    )
    for ax, (title, values) in zip(axes, panels, strict=True):
        if values is None:
            y = range(len(labels))
            ax.barh([i + 0.2 for i in y], [e["model_bytes"] / GIB for e in good.values()], height=0.4, label="footprint")
            ax.barh([i - 0.2 for i in y], [e["load_peak_gib"] for e in good.values()], height=0.4, label="load peak")
            ax.legend()
        else:
            ax.barh(labels, values)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_title(title)
    fig.suptitle(f"{report['model']} on {report['bandwidth'].get('device_name', 'GPU')}")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
