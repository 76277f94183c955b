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
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
README = REPO / "benchmarks" / "README.md"
DEFAULT_TINYLLAMA = REPO / "benchmarks" / "checkpoints" / "tinyllama-1.1b-random"
MARK_START, MARK_END = "<!-- bench_load:start -->", "<!-- bench_load:end -->"
GIB = 2**30
KIB = 2**10

CASES: dict[str, str] = {
    "bf16": "transformers bf16",
    "llmslim-int8": "llmslim int8",
    "llmslim-nf4": "llmslim nf4",
    "llmslim-fp4": "llmslim fp4",
    "llmslim-nf4-hf": "llmslim nf4 (transformers door)",
    "bnb-int8": "transformers+bnb int8",
    "bnb-nf4": "transformers+bnb nf4",
}
MODELS: dict[str, str] = {
    "tinyllama": "TinyLlama-1.1B shape, random bf16 weights",
    "smollm2": "SmolLM2-135M-Instruct (embedded model, bf16)",
}
TARGET_MODEL, TARGET_CASE, PEER_CASE, BASE_CASE = "tinyllama", "llmslim-nf4", "bnb-nf4", "bf16"
PEAK_SLACK_GIB = 0.5
LOAD_RATIO_TARGET = 0.5


# ----------------------------------------------------------------------------- child side


def vm_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


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
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import llmslim

    if case == "bf16":
        return lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    if case in ("llmslim-int8", "llmslim-nf4", "llmslim-fp4"):
        config = llmslim.SlimConfig(weights=case.removeprefix("llmslim-"))
        return lambda: llmslim.from_pretrained(path, config, progress=False)
    if case == "llmslim-nf4-hf":
        config = llmslim.SlimConfig(weights="nf4")
        return lambda: AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
    if case == "bnb-int8":
        bnb8 = BitsAndBytesConfig(load_in_8bit=True)
        return lambda: AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb8, device_map="cpu")
    if case == "bnb-nf4":
        bnb4 = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
        )
        return lambda: AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb4, device_map="cpu")
    raise ValueError(f"unknown case {case!r}")


def model_tensors(model):
    """Every tensor the model holds: parameters, buffers, and bitsandbytes quant-state / SCB tensors."""
    for param in model.parameters():
        yield param
        state = getattr(param, "quant_state", None)  # bitsandbytes Params4bit
        if state is not None:
            yield from (state.absmax, state.code, getattr(state, "offset", None))
            nested = getattr(state, "state2", None)
            if nested is not None:
                yield from (nested.absmax, nested.code)
        yield getattr(param, "SCB", None)  # bitsandbytes Int8Params
    yield from model.buffers()


def storage_spans(model) -> dict[tuple[str, int], tuple[int, int]]:
    """(device, storage address) -> the address span its tensors cover, for every storage the model uses.

    Per storage the span its tensors cover is kept, not the whole storage, so a tensor viewing a
    larger (e.g. memory-mapped) buffer counts only its own bytes; tied weights count once.
    """
    import torch

    spans: dict[tuple[str, int], tuple[int, int]] = {}
    for tensor in model_tensors(model):
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        storage = tensor.untyped_storage()
        start = storage.data_ptr() + tensor.storage_offset() * tensor.element_size()
        contiguous = tensor.is_contiguous()
        end = start + tensor.numel() * tensor.element_size() if contiguous else storage.data_ptr() + storage.nbytes()
        key = (tensor.device.type, storage.data_ptr())
        lo, hi = spans.get(key, (start, end))
        spans[key] = (min(lo, start), max(hi, end))
    return spans


def footprint_bytes(spans: dict[tuple[str, int], tuple[int, int]]) -> int:
    """Bytes of the unique storages the model's tensors use (see `storage_spans`)."""
    return sum(hi - lo for lo, hi in spans.values())


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
    try:
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
    except Exception as err:
        result["error"] = f"{type(err).__name__}: {err}".strip()
        result["traceback"] = traceback.format_exc()
    result["hwm_kib"] = vm_kib("VmHWM")
    write_atomic(Path(result_file), json.dumps(result))
    return 1 if "error" in result else 0


# ----------------------------------------------------------------------------- parent side


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `path` via a temporary file in the same folder and `os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def run_child(case: str, model_dir: Path, timeout: float) -> dict:
    """One load of `case` in a fresh process: its own measurements plus its peak RSS from `os.wait4`."""
    with tempfile.TemporaryDirectory(prefix="bench_load-") as tmp:
        result_file, log_file = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case, str(model_dir), "--result", str(result_file)]
        parent_maxrss_kib = self_maxrss_kib()
        with open(log_file, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        status, usage, timed_out = wait_child(proc, timeout)
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
        result.update(peak_rss_kib=usage.ru_maxrss, parent_maxrss_kib=parent_maxrss_kib, exit_code=os.waitstatus_to_exitcode(status))
        if timed_out:
            result["error"] = f"timed out after {timeout:g} s (killed)"
        elif "error" not in result and (result["exit_code"] != 0 or "load_s" not in result):
            tail = log_file.read_text(errors="replace").strip().splitlines()[-5:]
            result["error"] = f"child exited with {result['exit_code']}: " + " | ".join(tail)
        return result


def wait_child(proc: subprocess.Popen, timeout: float):
    """Reap `proc` with `os.wait4` (its own rusage), killing it after `timeout` s: (status, rusage, timed_out)."""
    deadline = time.monotonic() + timeout
    timed_out = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            timed_out = True
            break
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    return status, usage, timed_out


def self_maxrss_kib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_python(code: str, timeout: float) -> str:
    """Run `code` in a fresh interpreter (keeps torch out of this process); its last stdout line."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    return proc.stdout.strip().splitlines()[-1]


def prepare_tinyllama(path: Path, timeout: float) -> Path:
    """The random 1.1B checkpoint, written by scripts/make_random_checkpoint.py's function if missing."""
    if (path / "config.json").exists():
        return path
    print(f"writing the random 1.1B checkpoint to {path} (once) ...", file=sys.stderr, flush=True)
    scripts = str(REPO / "scripts")
    code = (
        f"import sys; sys.path.insert(0, {scripts!r})\n"
        f"from make_random_checkpoint import make_checkpoint\n"
        f"print(make_checkpoint({str(path)!r}))"
    )
    return Path(run_python(code, timeout))


def prepare_smollm2(path: Path | None, timeout: float) -> Path:
    """The SmolLM2 folder: `path`, or the embedded default model converted by `llmslim.models.resolve(None)`."""
    if path is not None:
        return path
    return Path(run_python("from llmslim.models import resolve; print(resolve(None))", timeout))


def warm_page_cache(path: Path) -> None:
    """Read every file of `path` once so that all cases read the checkpoint from the page cache."""
    for file in sorted(path.iterdir()):
        if file.is_file():
            with open(file, "rb") as handle:
                while handle.read(16 * 2**20):
                    pass


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


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


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


def machine_info() -> dict:
    """CPU, cores, RAM, library versions and the date, without importing torch here."""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), ""
    )
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:"))
    versions = {}
    for package in ("torch", "transformers", "bitsandbytes", "accelerate", "safetensors", "llmslim"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": cpu or platform.processor(),
        "nproc": len(os.sched_getaffinity(0)),
        "total_ram_gib": mem_kib * KIB / GIB,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "versions": versions,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": os.getloadavg(),
    }


def run_model(name: str, path: Path, cases: list[str], repeats: int, timeout: float) -> dict:
    """All cases for one model, repeats interleaved (repeat 1 of every case, then repeat 2, ...)."""
    warm_page_cache(path)
    runs: dict[str, list[dict]] = {case: [] for case in cases}
    for repeat in range(repeats):
        for case in cases:
            result = run_child(case, path, timeout)
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


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


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
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def put_marked_block(path: Path, start: str, end: str, table: str, section: str) -> None:
    """Put `table` between the `start` / `end` markers of `path`, or append `section` and the markers."""
    block = f"{start}\n{table}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = f"{head}{block}{rest.split(end, 1)[1]}"
    else:
        text = f"{text.rstrip()}\n\n{section}\n\n{block}\n"
    write_atomic(path, text)


def update_readme(table: str, path: Path = README) -> None:
    """Put `table` between the bench_load markers of `path` (created with a short intro if missing)."""
    block = f"{MARK_START}\n{table}\n{MARK_END}"
    if not path.exists():
        intro = (
            "# Benchmarks\n\n"
            "`benchmarks/bench_load.py` measures loading a causal LM with llmslim (int8 / nf4 / fp4, both doors) against "
            "transformers in bf16 and transformers + bitsandbytes (int8 / nf4), each load in a fresh process. Run it with "
            "`make bench` or `python benchmarks/bench_load.py` (see `--help`); the 1.1B checkpoint has random weights "
            "(`scripts/make_random_checkpoint.py`). Results: `benchmarks/results/bench_load.json` and `.png`.\n\n"
        )
        write_atomic(path, f"{intro}{block}\n")
        return
    text = path.read_text()
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        tail = rest.split(MARK_END, 1)[1]
        text = f"{head}{block}{tail}"
    else:
        text = f"{text.rstrip()}\n\n{block}\n"
    write_atomic(path, text)


# ----------------------------------------------------------------------------- CLI


def parse_list(value: str, allowed: dict[str, str], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        raise argparse.ArgumentTypeError(f"unknown {what} {unknown}: choose from {','.join(allowed)}")
    return [k for k in allowed if k in items]  # canonical order


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default=",".join(MODELS), type=lambda v: parse_list(v, MODELS, "model"), help="comma list: tinyllama,smollm2"
    )
    parser.add_argument(
        "--cases", default=",".join(CASES), type=lambda v: parse_list(v, CASES, "case"), help=f"comma list: {','.join(CASES)}"
    )
    parser.add_argument("--repeats", type=int, default=2, help="loads per case (median time, max peak; default 2)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a child is killed (default 900)")
    parser.add_argument("--tinyllama", type=Path, default=DEFAULT_TINYLLAMA, help="random 1.1B checkpoint folder (created if missing)")
    parser.add_argument(
        "--smollm2", type=Path, default=None, help="SmolLM2 folder (default: the embedded model via llmslim.models.resolve)"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where bench_load.json / .png go")
    parser.add_argument("--from-json", type=Path, help="only re-render the table, PNG and README from this bench_load.json")
    parser.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "MODEL_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def prepare_model(name: str, args: argparse.Namespace) -> Path:
    if name == "tinyllama":
        return prepare_tinyllama(args.tinyllama.resolve(), args.timeout)
    return prepare_smollm2(args.smollm2, args.timeout)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child[0], args.child[1], args.result)
    if args.from_json:
        return publish(json.loads(args.from_json.read_text()), args, write_json=False)
    report: dict = {"machine": machine_info(), "repeats": args.repeats, "cases": args.cases, "models": {}}
    for name in args.models:
        try:
            path = prepare_model(name, args)
        except Exception as err:
            print(f"[{name}] skipped: {err}", file=sys.stderr)
            report["models"][name] = {"description": MODELS[name], "error": f"{type(err).__name__}: {err}"}
            continue
        report["models"][name] = run_model(name, path, args.cases, args.repeats, args.timeout)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report["parent_maxrss_gib"] = self_maxrss_kib() * KIB / GIB  # children's peak RSS is at least this; keep it small
    return publish(report, args)


def publish(report: dict, args: argparse.Namespace, write_json: bool = True) -> int:
    """Write the JSON and PNG, print the markdown table and put it in the README."""
    if write_json:
        write_atomic(args.results_dir / "bench_load.json", json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    plot(report, args.results_dir / "bench_load.png")
    print(table)
    if not args.no_readme:
        update_readme(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
