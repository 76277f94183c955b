"""The benchmark harness: what every `bench_*.py` script shares, so that each keeps only its cases, table and plot.

- `run_child`: one case in a fresh child process (the script itself with its child arguments and
  `--result FILE`), its peak RSS in bytes from `os.wait4`; `recording_errors` / `finish_child` are
  the child's side.
- `machine_info`: CPU, cores, RAM, library versions and the date, without importing torch.
- `write_atomic` / `write_json`: a temporary file in the same folder, then `os.replace`.
- `put_readme_block`: a table between its `<!-- NAME:start -->` and `<!-- NAME:end -->` markers in
  benchmarks/README.md (`python benchmarks/render.py` re-renders every one from the committed JSON).
- `pyplot` / `save_figure`: the plot style (matplotlib's Agg backend, one DPI, written atomically).

Importing this module is cheap (standard library only). Keep the parent process small: on Linux a
child's peak RSS starts at the RSS its parent had when it started it, so a parent that imported
torch would inflate every child's measurement.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
RESULTS_DIR = BENCHMARKS / "results"
README = BENCHMARKS / "README.md"
KIB, GIB = 2**10, 2**30
GB = 1e9
DPI = 110
VERSIONS = ("torch", "transformers", "bitsandbytes", "accelerate", "safetensors", "llmslim")


# ----------------------------------------------------------------------------- files


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `path` via a temporary file in the same folder and `os.replace`: readers see the old file or the new one."""
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


def write_json(path: Path, data: object, indent: int = 2) -> None:
    """`data` as indented JSON, written atomically (serialised first, so a failure leaves the old file as it was)."""
    write_atomic(path, json.dumps(data, indent=indent) + "\n")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# ----------------------------------------------------------------------------- child processes


@dataclass
class ChildRun:
    """What one child process left: the result it wrote, its peak RSS, its exit code and, if it failed, why."""

    result: dict  # the JSON the child wrote to --result ({} if it wrote none)
    peak_rss_bytes: int  # ru_maxrss of the child alone (os.wait4), in bytes
    exit_code: int
    error: str | None  # set when it timed out, or exited non-zero / wrote nothing without saying why

    def merged(self, **fields) -> dict:
        """The child's result, then `fields`, then `error` when the run failed."""
        out = {**self.result, **fields}
        if self.error:
            out["error"] = self.error
        return out


def run_child(script: Path, argv: list[str], timeout: float, tail_lines: int = 5) -> ChildRun:
    """Run `python script *argv --result FILE` in a fresh process (cwd: the repository) and reap it with `os.wait4`.

    Args:
        script: the benchmark script; it writes its measurements to the `--result` file (see `finish_child`).
        argv: its child arguments, e.g. `["--child", case, model_dir]`.
        timeout: seconds before the child is killed.
        tail_lines: lines of the child's output quoted in `error` when it fails without saying why.

    Returns:
        A `ChildRun`; its `peak_rss_bytes` counts this child only, not this process or other children.
    """
    with tempfile.TemporaryDirectory(prefix=f"{Path(script).stem}-") as tmp:
        result_file, log_file = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        cmd = [sys.executable, str(Path(script).resolve()), *argv, "--result", str(result_file)]
        with open(log_file, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        status, usage, timed_out = wait_child(proc, timeout)
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
        exit_code = os.waitstatus_to_exitcode(status)
        error = None
        if timed_out:
            error = f"timed out after {timeout:g} s (killed)"
        elif "error" not in result and (exit_code != 0 or not result_file.exists()):
            tail = log_file.read_text(errors="replace").strip().splitlines()[-tail_lines:]
            error = f"child exited with {exit_code}: " + " | ".join(tail)
        return ChildRun(result, maxrss_bytes(usage.ru_maxrss), exit_code, error)


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


def maxrss_bytes(ru_maxrss: int) -> int:
    """`ru_maxrss` in bytes (Linux reports KiB, macOS bytes)."""
    return ru_maxrss if sys.platform == "darwin" else ru_maxrss * KIB


def self_peak_rss_bytes() -> int:
    """This process's peak RSS: every child it starts from now on begins at least this high."""
    import resource

    return maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def vm_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, RssAnon, RssFile)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


@contextmanager
def recording_errors(result: dict) -> Iterator[dict]:
    """The child's side: an exception inside the block becomes `result["error"]` and `result["traceback"]`."""
    try:
        yield result
    except Exception as err:
        result["error"] = f"{type(err).__name__}: {err}".strip()
        result["traceback"] = traceback.format_exc()


def finish_child(result: dict, result_file: str | Path) -> int:
    """Write the child's `result` for `run_child` to read; the exit code: 1 if it records an error, else 0."""
    write_atomic(Path(result_file), json.dumps(result))
    return 1 if "error" in result else 0


def run_python(code: str, timeout: float) -> str:
    """Run `code` in a fresh interpreter (keeps torch out of this process); its last stdout line."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    return proc.stdout.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- the machine


def package_versions(packages: Iterable[str]) -> dict[str, str | None]:
    """Installed version of each package (None when absent), read from its metadata without importing it."""
    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def machine_info(extra_packages: Iterable[str] = ()) -> dict:
    """CPU, cores, RAM, library versions (`VERSIONS`, then `extra_packages`) and the date, without importing torch."""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), ""
    )
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:"))
    return {
        "cpu": cpu or platform.processor(),
        "simd": simd_flags(),
        "nproc": len(os.sched_getaffinity(0)),
        "total_ram_gib": mem_kib * KIB / GIB,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "versions": package_versions((*VERSIONS, *extra_packages)),
        "date": utc_now(),
        "load_average_at_start": os.getloadavg(),
    }


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16")  # the ones that pick llmslim's CPU kernels


def simd_flags() -> list[str]:
    """Which of `SIMD_FLAGS` this CPU has (from /proc/cpuinfo; empty where it has no flags line)."""
    line = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    flags = set(line.split(":", 1)[-1].split())
    return [flag for flag in SIMD_FLAGS if flag in flags]


def end_of_run(report: dict) -> dict:
    """`report` stamped at the end of a run: the load average, and this (parent) process's peak RSS, which every
    child's peak RSS includes at its start (keep it small)."""
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report["parent_maxrss_gib"] = self_peak_rss_bytes() / GIB
    return report


def torch_info() -> dict:
    """Platform, torch version, torch threads and the local date: the machine record of benchmarks that run in-process."""
    import torch

    return {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": datetime.now().isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------- tables and the README


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_block(text: str, name: str, table: str, section: str | None = None) -> str:
    """`text` with `table` between `name`'s markers; without the markers, `section` and the marked table appended.

    Raises:
        KeyError: the markers are missing and there is no `section` to append.
    """
    start, end = markers(name)
    block = f"{start}\n{table}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        return f"{head}{block}{rest.split(end, 1)[1]}"
    if section is None:
        raise KeyError(f"no {start} ... {end} markers in the README: add them where the {name} table belongs")
    return f"{text.rstrip()}\n\n{section}\n\n{block}\n"


def put_readme_block(name: str, table: str, section: str, path: Path = README) -> None:
    """Put `table` between `name`'s markers in `path`, or append `section` (a heading and intro) and the marked table."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    write_atomic(path, replace_block(text, name, table, section))


# ----------------------------------------------------------------------------- plots


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Lay out `fig`, write it as a PNG at `DPI` (atomically) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


# ----------------------------------------------------------------------------- publishing


def publish(
    name: str,
    report: dict,
    results_dir: Path,
    markdown: Callable[[dict], str],
    plot: Callable[[dict, Path], None],
    readme_section: str | None,
    write: bool = True,
    indent: int = 2,
) -> str:
    """Write NAME.json (unless `write` is False: re-rendering) and NAME.png, and the table into the README; returns the table.

    Args:
        readme_section: the heading and intro appended with the table when the README has no NAME markers;
            None leaves the README alone (`--no-readme`, or a script whose table render.py puts there).
    """
    if write:
        write_json(Path(results_dir) / f"{name}.json", report, indent)
    table = markdown(report)
    try:
        plot(report, Path(results_dir) / f"{name}.png")
    except ImportError as err:  # matplotlib is optional where the benchmark runs (a GPU machine); render the PNG later
        print(f"no plot: {err}", file=sys.stderr)
    if readme_section is not None:
        put_readme_block(name, table, readme_section)
    return table


# ----------------------------------------------------------------------------- command line


def parse_list(value: str, allowed: Iterable[str], what: str) -> list[str]:
    """A comma list of names from `allowed`, in `allowed`'s order."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        raise argparse.ArgumentTypeError(f"unknown {what} {unknown}: choose from {','.join(allowed)}")
    return [k for k in allowed if k in items]  # canonical order


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def add_threads_argument(parser: argparse.ArgumentParser, what: str = "torch threads of every case") -> None:
    """--threads, default all the cores this process may use."""
    cores = len(os.sched_getaffinity(0))
    parser.add_argument("--threads", type=positive_int, default=cores, help=f"{what} (default: all {cores} cores)")


def add_output_arguments(parser: argparse.ArgumentParser, name: str, from_json_help: str | None = None) -> None:
    """--results-dir, --from-json and --no-readme."""
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help=f"where {name}.json / .png go")
    default_help = f"only re-render the table, PNG and README from this {name}.json"
    parser.add_argument("--from-json", type=Path, help=from_json_help or default_help)
    parser.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")


def add_child_arguments(parser: argparse.ArgumentParser) -> None:
    """The hidden arguments a script's child process gets from `run_child`: --child CASE MODEL_DIR and --result FILE."""
    parser.add_argument("--child", nargs=2, metavar=("CASE", "MODEL_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
