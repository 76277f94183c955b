"""Loading benchmark: time and host memory of loading a causal LM, llmslim vs transformers (+ bitsandbytes).

Every load runs in a fresh child process (this script with `--child CASE MODEL_DIR`). The child
measures its RSS right after `import torch, transformers, llmslim` (the import baseline), the wall
time of the load call alone, and the model's footprint (bytes of the unique tensor storages it
holds: parameters, buffers and bitsandbytes' quant-state tensors). The parent reads the child's
peak RSS from `os.wait4`, which returns the resource usage of that one child.

The parent never imports torch (or anything large) before the last child has exited: on Linux a
child's peak RSS starts at its parent's peak RSS at the time of `exec`, so a large parent would
inflate every child's measurement. For the same reason the checkpoint and the SmolLM2 folder are
prepared in child processes. The checkpoint files are read once before the first load so that
every case reads them from the page cache.

    python benchmarks/bench_load.py                                   # everything, 2 repeats
    python benchmarks/bench_load.py --models smollm2 --repeats 1      # quick
    python benchmarks/bench_load.py --models tinyllama --cases llmslim-nf4,bnb-nf4

Writes benchmarks/results/bench_load.json and .png, prints a markdown table and puts it in
benchmarks/README.md between `<!-- bench_load:start -->` and `<!-- bench_load:end -->`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from _harness import (
    GIB,
    KIB,
    add_child_arguments,
    add_output_arguments,
    end_of_run,
    finish_child,
    fmt,
    machine_info,
    positive_int,
    publish,
    pyplot,
    ratio,
    read_json,
    recording_errors,
    run_child,
    save_figure,
    self_peak_rss_bytes,
    vm_kib,
)
from _models import MODELS, add_model_arguments, bnb_config, footprint_bytes, run_models, storage_spans, warm_page_cache

CASES: dict[str, str] = {
    "bf16": "transformers bf16",
    "llmslim-int8": "llmslim int8",
    "llmslim-nf4": "llmslim nf4",
    "llmslim-fp4": "llmslim fp4",
    "llmslim-nf4-hf": "llmslim nf4 (transformers door)",
    "bnb-int8": "transformers+bnb int8",
    "bnb-nf4": "transformers+bnb nf4",
}
TARGET_MODEL, TARGET_CASE, PEER_CASE, BASE_CASE = "tinyllama", "llmslim-nf4", "bnb-nf4", "bf16"
PEAK_SLACK_GIB = 0.5
LOAD_RATIO_TARGET = 0.5
README_BLOCKS = {"bench_load": "bench_load.json"}  # README marker -> the committed JSON it is rendered from (render.py)
README_SECTION = (
    "`benchmarks/bench_load.py` measures loading a causal LM with llmslim (int8 / nf4 / fp4, both doors) against "
    "transformers in bf16 and transformers + bitsandbytes (int8 / nf4), each load in a fresh process. Run it with "
    "`make bench` or `python benchmarks/bench_load.py` (see `--help`); the 1.1B checkpoint has random weights "
    "(`scripts/make_random_checkpoint.py`). Results: `benchmarks/results/bench_load.json` and `.png`."
)


# ----------------------------------------------------------------------------- child side


def mapped_ranges(folder: str) -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of files under `folder` (a memory-mapped checkpoint)."""
    prefix = str(Path(folder).resolve()) + os.sep
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(prefix):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def make_loader(case: str, path: Path):
    """A no-argument callable performing exactly the load call of `case` (configs are built beforehand)."""
    import torch
    from transformers import AutoModelForCausalLM

    import llmslim

    if case == "bf16":
        return lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    if case in ("llmslim-int8", "llmslim-nf4", "llmslim-fp4"):
        config = llmslim.SlimConfig(weights=case.removeprefix("llmslim-"))
        return lambda: llmslim.from_pretrained(path, config, progress=False)
    if case == "llmslim-nf4-hf":
        config = llmslim.SlimConfig(weights="nf4")
        return lambda: AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
    if case in ("bnb-int8", "bnb-nf4"):
        bnb = bnb_config(8 if case == "bnb-int8" else 4)
        return lambda: AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, device_map="cpu")
    raise ValueError(f"unknown case {case!r}")


def bytes_in_ranges(spans: dict[tuple[str, int], tuple[int, int]], ranges: list[tuple[int, int]]) -> int:
    """Bytes of the CPU storage spans that lie inside `ranges` (e.g. tensors viewing a memory-mapped file)."""
    total = 0
    for (device, _), (lo, hi) in spans.items():
        if device == "cpu":
            total += sum(max(0, min(hi, end) - max(lo, start)) for start, end in ranges)
    return total


def dtype_bytes(model) -> dict[str, int]:
    """Bytes of parameters and buffers per dtype (shows which dtype the unquantized layers got)."""
    out: dict[str, int] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        name = str(tensor.dtype).removeprefix("torch.")
        out[name] = out.get(name, 0) + tensor.numel() * tensor.element_size()
    return out


def child_main(case: str, model_dir: str, result_file: str) -> int:
    """Load `model_dir` per `case` and write the measurements to `result_file` (JSON)."""
    import torch
    import transformers  # noqa: F401

    import llmslim  # noqa: F401

    result: dict = {"import_rss_kib": vm_kib("VmRSS"), "torch_threads": torch.get_num_threads()}
    with recording_errors(result):
        load = make_loader(case, Path(model_dir))
        start = time.perf_counter()
        model = load()
        result["load_s"] = time.perf_counter() - start
        result["rss_after_load_kib"] = vm_kib("VmRSS")
        result["rss_anon_after_load_kib"], result["rss_file_after_load_kib"] = vm_kib("RssAnon"), vm_kib("RssFile")
        spans, ranges = storage_spans(model), mapped_ranges(model_dir)
        result["footprint_bytes"] = footprint_bytes(spans)
        result["mapped_checkpoint_bytes"] = sum(end - start for start, end in ranges)
        result["footprint_in_mapped_checkpoint_bytes"] = bytes_in_ranges(spans, ranges)
        result["dtype_bytes"] = dtype_bytes(model)
        result["model_class"] = type(model).__name__
    result["hwm_kib"] = vm_kib("VmHWM")
    return finish_child(result, result_file)


# ----------------------------------------------------------------------------- parent side


def run_load(case: str, model_dir: Path, timeout: float) -> dict:
    """One load of `case` in a fresh process: its own measurements plus its peak RSS from `os.wait4`."""
    parent_peak = self_peak_rss_bytes()
    run = run_child(Path(__file__), ["--child", case, str(model_dir)], timeout)
    return run.merged(peak_rss_kib=run.peak_rss_bytes // KIB, parent_maxrss_kib=parent_peak // KIB, exit_code=run.exit_code)


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin"))


def summarize(case: str, runs: list[dict]) -> dict:
    """Median load time, max peak RSS, median import RSS, footprint over the successful runs of a case."""
    good = [r for r in runs if "error" not in r]
    entry: dict = {"label": CASES[case], "repeats": len(runs), "runs": runs}
    if not good:
        entry["error"] = runs[-1]["error"]
        entry.update(load_s=None, peak_rss_gib=None, import_rss_gib=None, footprint_gib=None)
        return entry
    if len(good) < len(runs):
        entry["error"] = f"{len(runs) - len(good)} of {len(runs)} runs failed: {next(r['error'] for r in runs if 'error' in r)}"
    peak = max(r["peak_rss_kib"] for r in good) * KIB / GIB
    imported = statistics.median(r["import_rss_kib"] for r in good) * KIB / GIB
    footprint = good[-1]["footprint_bytes"] / GIB
    entry.update(
        load_s=statistics.median(r["load_s"] for r in good),
        load_s_runs=[r["load_s"] for r in good],
        peak_rss_gib=peak,
        import_rss_gib=imported,
        peak_minus_import_gib=peak - imported,
        footprint_gib=footprint,
        peak_minus_footprint_gib=peak - footprint,
        dtype_bytes=good[-1]["dtype_bytes"],
        mapped_checkpoint_gib=good[-1]["mapped_checkpoint_bytes"] / GIB,
        footprint_in_mapped_checkpoint_gib=good[-1]["footprint_in_mapped_checkpoint_bytes"] / GIB,
        rss_anon_after_load_gib=good[-1]["rss_anon_after_load_kib"] * KIB / GIB,
        rss_file_after_load_gib=good[-1]["rss_file_after_load_kib"] * KIB / GIB,
    )
    return entry


def add_ratios(cases: dict[str, dict]) -> None:
    """Ratios against bf16 (time, peak RSS, footprint) and against transformers+bnb nf4 (time)."""
    base, peer = cases.get(BASE_CASE, {}), cases.get(PEER_CASE, {})
    for entry in cases.values():
        entry["ratios"] = {
            "load_vs_bf16": ratio(entry.get("load_s"), base.get("load_s")),
            "peak_rss_vs_bf16": ratio(entry.get("peak_rss_gib"), base.get("peak_rss_gib")),
            "footprint_vs_bf16": ratio(entry.get("footprint_gib"), base.get("footprint_gib")),
            "load_vs_bnb_nf4": ratio(entry.get("load_s"), peer.get("load_s")),
        }


def targets(cases: dict[str, dict]) -> dict:
    """The issue's targets for llmslim nf4: peak RSS <= footprint + 0.5 GiB; load time <= 0.5 x bnb nf4's."""
    entry = cases.get(TARGET_CASE)
    if not entry or entry.get("load_s") is None:
        return {"evaluated": False, "why": f"{TARGET_CASE} was not measured (or failed)"}
    out: dict = {"evaluated": True, "peak_slack_gib": PEAK_SLACK_GIB, "load_ratio_target": LOAD_RATIO_TARGET}
    limit = entry["footprint_gib"] + PEAK_SLACK_GIB
    out["peak_rss_gib"], out["peak_limit_gib"] = entry["peak_rss_gib"], limit
    out["peak_rss_met"] = entry["peak_rss_gib"] <= limit
    out["peak_above_import_gib"] = entry["peak_minus_import_gib"]
    out["peak_above_import_met"] = entry["peak_minus_import_gib"] <= limit
    load_ratio = entry["ratios"]["load_vs_bnb_nf4"]
    out["load_vs_bnb_nf4"] = load_ratio
    out["load_met"] = None if load_ratio is None else load_ratio <= LOAD_RATIO_TARGET
    return out


def run_model(name: str, path: Path, cases: list[str], repeats: int, timeout: float) -> dict:
    """All cases for one model, repeats interleaved (repeat 1 of every case, then repeat 2, ...)."""
    warm_page_cache(path)
    runs: dict[str, list[dict]] = {case: [] for case in cases}
    for repeat in range(repeats):
        for case in cases:
            result = run_load(case, path, timeout)
            runs[case].append(result)
            print(f"[{name}] {case:15s} {repeat + 1}/{repeats}: {describe_run(result)}", file=sys.stderr, flush=True)
    entries = {case: summarize(case, runs[case]) for case in cases}
    add_ratios(entries)
    return {
        "path": str(path),
        "description": MODELS[name],
        "checkpoint_gib": checkpoint_bytes(path) / GIB,
        "cases": entries,
        "targets": targets(entries),
    }


def describe_run(result: dict) -> str:
    if "error" in result:
        return f"ERROR {result['error'][:200]}"
    return (
        f"load {result['load_s']:.2f} s, peak {result['peak_rss_kib'] * KIB / GIB:.2f} GiB, "
        f"import {result['import_rss_kib'] * KIB / GIB:.2f} GiB, footprint {result['footprint_bytes'] / GIB:.3f} GiB"
    )


# ----------------------------------------------------------------------------- reporting


def markdown(report: dict) -> str:
    """Markdown tables (one per model) with a footnote on the targets."""
    info = report["machine"]
    lines = [
        f"Measured {info['date']} on {info['cpu']}, {info['nproc']} cores, {info['total_ram_gib']:.0f} GiB RAM; "
        f"torch {info['versions']['torch']}, transformers {info['versions']['transformers']}, "
        f"bitsandbytes {info['versions']['bitsandbytes']}; {report['repeats']} repeat(s): median load time, max peak RSS.",
        "",
    ]
    for name, model in report["models"].items():
        if "error" in model:
            lines += [f"**{name}**: skipped ({model['error']})", ""]
            continue
        lines += [f"**{name}**: {model['description']}, checkpoint {model['checkpoint_gib']:.2f} GiB", ""]
        lines += [
            "| case | load s | × bf16 | × bnb nf4 | peak RSS GiB | import RSS GiB | peak − import GiB | footprint GiB | footprint × bf16 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for entry in model["cases"].values():
            if entry.get("load_s") is None:
                lines.append(f"| {entry['label']} | error: {entry['error'][:120]} | | | | | | | |")
                continue
            r = entry["ratios"]
            lines.append(
                f"| {entry['label']} | {entry['load_s']:.2f} | {fmt(r['load_vs_bf16'])} | {fmt(r['load_vs_bnb_nf4'])} | "
                f"{entry['peak_rss_gib']:.2f} | {entry['import_rss_gib']:.2f} | {entry['peak_minus_import_gib']:.2f} | "
                f"{entry['footprint_gib']:.3f} | {fmt(r['footprint_vs_bf16'])} |"
            )
        lines += ["", footnote(name, model["targets"]), *mmap_notes(model["cases"]), ""]
    lines.append(
        "Peak RSS: the child process's `ru_maxrss` (from `os.wait4`); import RSS: its RSS after "
        "`import torch, transformers, llmslim`; footprint: bytes of the unique tensor storages the loaded model holds."
    )
    return "\n".join(lines)


def mmap_notes(cases: dict[str, dict]) -> list[str]:
    """A note per case whose loaded model still memory-maps the checkpoint."""
    notes = []
    for entry in cases.values():
        mapped, in_mapped = entry.get("mapped_checkpoint_gib") or 0, entry.get("footprint_in_mapped_checkpoint_gib") or 0
        if mapped < 0.01:
            continue
        note = (
            f"\n{entry['label']}: keeps {mapped:.2f} GiB of the checkpoint memory-mapped after loading, {in_mapped:.2f} GiB of its "
            f"tensors being views of that mapping (RSS after load: {entry['rss_anon_after_load_gib']:.2f} GiB anonymous, "
            f"{entry['rss_file_after_load_gib']:.2f} GiB file-backed; file-backed pages count in peak RSS)."
        )
        if in_mapped >= 0.5 * entry["footprint_gib"]:
            note += " Its weights are paged in when first used, so its load time and peak RSS leave out reading and holding them."
        notes.append(note)
    return notes


def footnote(name: str, t: dict) -> str:
    scope = (
        "Targets (the issue's, for the 1.1B model)"
        if name == TARGET_MODEL
        else "Targets (for information: the issue sets them for the 1.1B model)"
    )
    if not t.get("evaluated"):
        return f"{scope}: not evaluated ({t.get('why')})."

    def met(flag: bool | None) -> str:
        return "not measured" if flag is None else ("**met**" if flag else "**not met**")

    load = "–" if t["load_vs_bnb_nf4"] is None else f"{t['load_vs_bnb_nf4']:.2f}×"
    return (
        f"{scope}, llmslim nf4: peak RSS ≤ footprint + {t['peak_slack_gib']} GiB = {t['peak_limit_gib']:.2f} GiB: "
        f"{t['peak_rss_gib']:.2f} GiB {met(t['peak_rss_met'])} (peak above the import baseline {t['peak_above_import_gib']:.2f} GiB: "
        f"{met(t['peak_above_import_met'])}); load time ≤ {t['load_ratio_target']}× transformers+bnb nf4's: {load} {met(t['load_met'])}."
    )


def plot(report: dict, path: Path) -> None:
    """Grouped bars per model row: load time; peak RSS, peak above import, footprint."""
    plt = pyplot()
    models = {n: m for n, m in report["models"].items() if "cases" in m}
    if not models:
        return
    fig, axes = plt.subplots(len(models), 2, figsize=(14, 4.5 * len(models)), squeeze=False)
    for row, (name, model) in enumerate(models.items()):
        labels = [e["label"].replace(" (", "\n(").replace("transformers+", "tf+") for e in model["cases"].values()]
        entries = list(model["cases"].values())
        xs = range(len(entries))
        ax = axes[row][0]
        ax.bar(xs, [e["load_s"] or 0 for e in entries], color="tab:blue")
        for x, e in zip(xs, entries, strict=True):
            ax.text(x, e["load_s"] or 0, "error" if e["load_s"] is None else f"{e['load_s']:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set(title=f"{name}: load time (median of {report['repeats']})", ylabel="seconds")
        ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
        ax = axes[row][1]
        width = 0.27
        series = [("peak RSS", "peak_rss_gib", "tab:red"), ("peak − import baseline", "peak_minus_import_gib", "tab:orange")]
        series.append(("footprint", "footprint_gib", "tab:green"))
        for i, (label, key, color) in enumerate(series):
            ax.bar([x + (i - 1) * width for x in xs], [e.get(key) or 0 for e in entries], width, label=label, color=color)
        ax.set(title=f"{name}: memory", ylabel="GiB")
        ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, CASES)
    parser.add_argument("--repeats", type=positive_int, default=2, help="loads per case (median time, max peak; default 2)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a child is killed (default 900)")
    add_output_arguments(parser, "bench_load")
    add_child_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child[0], args.child[1], args.result)
    if args.from_json:
        return publish_report(read_json(args.from_json), args, write=False)
    report: dict = {"machine": machine_info(), "repeats": args.repeats, "cases": args.cases}
    report["models"] = run_models(args, lambda name, path: run_model(name, path, args.cases, args.repeats, args.timeout))
    return publish_report(end_of_run(report), args)


def publish_report(report: dict, args: argparse.Namespace, write: bool = True) -> int:
    """Write the JSON and PNG, print the markdown table and put it in the README."""
    section = None if args.no_readme else README_SECTION
    print(publish("bench_load", report, args.results_dir, markdown, plot, section, write))
    return 0


if __name__ == "__main__":
    sys.exit(main())
