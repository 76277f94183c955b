"""A teacher cache from a teacher kept mostly on disk (issue 19, item 3): the random 1.1B shape in NF4.

`llmslim distill --cache-only` runs the teacher once over the training blocks a run will read. Two fresh processes
build the same cache (same blocks, seed, k = 64) from the NF4 teacher:
  ram:  the whole quantized teacher in RAM;
  disk: `--teacher-offload disk --teacher-offload-budget B`: at most B bytes of its weights resident (B below its NF4
        footprint), the other blocks written once to an offload folder and streamed from it block by block.
Recorded per case: seconds, peak RSS (wait4), cache size; and the two caches compared (top-1 ids equal, top-k ids
shared, largest difference of the kept logits and of the tail). Random weights: speed and memory only, never quality.
The checkpoint has no tokenizer; a byte-level BPE trained on Tiny Shakespeare is written beside links to its files (as
bench_quality does).

    python benchmarks/bench_distill_offload.py            # 20 steps of 4 x 256 tokens (about 4 min here)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _harness import GIB, RESULTS_DIR, finish_child, machine_info, publish, pyplot, run_child, save_figure, utc_now
from _models import DEFAULT_TINYLLAMA

README_BLOCKS = {"bench_distill_offload": "bench_distill_offload.json"}  # README marker -> committed JSON (render.py)
README_SECTION = (
    "## Teacher cache from an offloaded teacher (`benchmarks/bench_distill_offload.py`)\n\n"
    "The random 1.1B shape as an NF4 teacher: `llmslim distill --cache-only` with the whole teacher in RAM, and with it "
    "offloaded to disk under a resident budget below its NF4 footprint (`--teacher-offload disk --teacher-offload-budget "
    "400MiB`), each in a fresh process, 20 steps of 4 x 256 tokens. "
    "Results: `benchmarks/results/bench_distill_offload.json`."
)
CASES = ("ram", "disk")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_TINYLLAMA, help="teacher checkpoint (default: the random 1.1B shape)")
    p.add_argument("--steps", type=int, default=20, help="training steps whose blocks the cache holds")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--budget", default="400MiB", help="resident teacher weights of the disk case")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    p.add_argument("--results", default=str(RESULTS_DIR))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # child: JSON {case, model, work}
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args: argparse.Namespace) -> int:
    """Build the teacher cache of one case in this process; record its time, size and the teacher's NF4 footprint."""
    from llmslim.data import TINY_SHAKESPEARE
    from llmslim.distill import DistillConfig
    from llmslim.distill.run import build_teacher_cache
    from llmslim.train import TrainConfig

    spec = json.loads(args.child)
    work = Path(spec["work"])
    disk = spec["case"] == "disk"
    config = DistillConfig(
        out=work / f"student-{spec['case']}",
        teacher=spec["model"],
        student_layers=2,
        train=TINY_SHAKESPEARE,
        block_size=args.block_size,
        teacher_weights="nf4",
        teacher_cache=work / f"cache-{spec['case']}",
        cache_k=64,
        teacher_offload="disk" if disk else None,
        teacher_offload_budget=args.budget if disk else None,
    )
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=0, run_dir=work / f"run-{spec['case']}")
    start = time.perf_counter()
    cache = build_teacher_cache(config, train, progress=False)
    seconds = time.perf_counter() - start
    offloaded = work / f"run-{spec['case']}" / "teacher-offload"
    offload_bytes = sum(f.stat().st_size for f in offloaded.rglob("*") if f.is_file()) if offloaded.exists() else 0
    tokens = len(cache.rows) * args.block_size
    return finish_child(
        {"seconds": seconds, "blocks": len(cache.rows), "tokens": tokens, "cache_bytes": cache.nbytes(), "offload_bytes": offload_bytes},
        args.result,
    )


def footprint_child(args: argparse.Namespace) -> int:
    """The NF4 teacher's footprint (its tensors, scales included), loaded in RAM."""
    import torch

    import llmslim
    from llmslim.stats import model_nbytes

    model = llmslim.from_pretrained(
        json.loads(args.child)["model"], llmslim.SlimConfig(weights="nf4"), dtype=torch.bfloat16, progress=False
    )
    return finish_child({"footprint_bytes": model_nbytes(model)}, args.result)


def compare_caches(work: Path) -> dict:
    """How far the disk case's cache is from the RAM case's: the share of positions whose top-1 id is the same, the mean
    share of the k kept ids both hold (order aside), and the largest difference of the kept values and of the tail."""
    import torch
    from safetensors.torch import load_file

    top1 = overlap = positions = 0.0
    worst = {"values": 0.0, "tail": 0.0}
    for shard in sorted((work / "cache-ram").glob("*.safetensors")):
        a, b = load_file(shard), load_file(work / "cache-disk" / shard.name)
        ids_a, ids_b = a["ids"].flatten(0, -2), b["ids"].flatten(0, -2)  # (positions, k)
        top1 += float((ids_a[:, 0] == ids_b[:, 0]).sum())
        for rows in torch.split(torch.arange(ids_a.shape[0]), 1024):
            shared = (ids_a[rows].unsqueeze(-1) == ids_b[rows].unsqueeze(-2)).any(-1)  # (rows, k)
            overlap += float(shared.float().mean(-1).sum())
        positions += ids_a.shape[0]
        for key in worst:
            both = torch.isfinite(a[key]) & torch.isfinite(b[key])
            worst[key] = max(worst[key], float((a[key] - b[key]).float()[both].abs().max()))
    return {
        "top1_equal_share": top1 / max(positions, 1),
        "topk_overlap_share": overlap / max(positions, 1),
        "max_abs_value_difference": worst["values"],
        "max_abs_tail_difference": worst["tail"],
    }


def markdown(result: dict) -> str:
    ram, disk = result["cases"]["ram"], result["cases"]["disk"]
    foot = result["footprint_bytes"] / GIB
    lines = [
        f"Random 1.1B shape, NF4 teacher (footprint {foot:.2f} GiB), cache of {ram['tokens']:,} tokens (k = 64); "
        f"measured {result['date']}, {result['machine']}.",
        "",
        "| teacher | resident budget | seconds | peak RSS GiB | offload folder GiB | cache MiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, row in (("in RAM", ram), ("offloaded to disk", disk)):
        budget = result["budget"] if row is disk else "all"
        lines.append(
            f"| {name} | {budget} | {row['seconds']:.0f} | {row['peak_rss_gib']:.2f} | {row['offload_bytes'] / GIB:.2f} | "
            f"{row['cache_bytes'] / 2**20:.1f} |"
        )
    same = result["comparison"]
    saved = ram["peak_rss_gib"] - disk["peak_rss_gib"]
    below = result["budget_bytes"] < result["footprint_bytes"]  # parsed at run time: rendering imports no torch
    lines += [
        "",
        f"- Teacher weights resident under a budget below their NF4 size: {result['budget']} of {foot:.2f} GiB, "
        f"{disk['offload_bytes'] / GIB:.2f} GiB streamed from the offload folder; the build peaks at {disk['peak_rss_gib']:.2f} GiB "
        f"RSS against {ram['peak_rss_gib']:.2f} in RAM ({saved:.2f} GiB less) {'**met**' if below and saved > 0 else '**not met**'}.",
        f"- The same cache: top-1 id equal at {same['top1_equal_share']:.1%} of positions, {same['topk_overlap_share']:.1%} of "
        f"the top-{result['k']} ids shared, kept values within {same['max_abs_value_difference']:.2g}, tail within "
        f"{same['max_abs_tail_difference']:.2g} (logits / T).",
    ]
    return "\n".join(lines)


def _bytes(size: str) -> int:
    from llmslim.plan.hardware import parse_size

    return parse_size(size)


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    names = ["in RAM", "offloaded"]
    ax.bar(names, [result["cases"][c]["peak_rss_gib"] for c in CASES], color=["#888", "#2a7"])
    ax.axhline(result["footprint_bytes"] / GIB, color="k", linestyle="--", label="NF4 footprint")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title("teacher cache build, 1.1B NF4 teacher")
    ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        return footprint_child(args) if spec["case"] == "footprint" else child(args)
    from bench_quality import with_tokenizer

    if not (args.model / "config.json").exists():
        raise SystemExit(f"{args.model} does not exist: run `python scripts/make_random_checkpoint.py` first")
    info = machine_info()
    result = {
        "date": utc_now(),
        "machine": f"{info['cpu']}, {info['nproc']} cores",
        "budget": args.budget,
        "budget_bytes": _bytes(args.budget),
        "steps": args.steps,
        "k": 64,
        "cases": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = with_tokenizer(args.model, work)
        for case in ("footprint", *CASES):
            spec = json.dumps({"case": case, "model": str(model), "work": str(work)})
            argv = ["--child", spec, "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
            run = run_child(Path(__file__), [*argv, "--block-size", str(args.block_size), "--budget", args.budget], args.timeout)
            row = run.merged(peak_rss_gib=run.peak_rss_bytes / GIB)
            print(f"[{case}] {row}", flush=True)
            if case == "footprint":
                result["footprint_bytes"] = row["footprint_bytes"]
            else:
                result["cases"][case] = row
        result["comparison"] = compare_caches(work)
    print(publish("bench_distill_offload", result, Path(args.results), markdown, plot, README_SECTION))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
