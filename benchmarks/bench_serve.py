"""Serving benchmark: aggregate output tokens/s and latency of `llmslim serve` for 1, 4 and 16 concurrent streaming clients.

The server runs as it would for a user: `llmslim serve` in a child process (the embedded default
model in nf4 unless `--model` / `--weights` say otherwise) on a free loopback port. This process
never imports torch; it drives the server with the official `openai` client, one thread per client.

Per concurrency level C, C clients each send `--rounds` streaming chat requests back to back
(greedy, `max_tokens=--new-tokens`, `ignore_eos` so every request generates exactly that many
tokens). Latency is per request, from sending it to `data: [DONE]`; time to first token is to
the first chunk with text. Aggregate tokens/s is all completion tokens (from the usage chunk)
divided by the wall time of the level. C=1 is the same-run baseline: one request at a time. The
server's own counters give the average number of sequences per decode step.

    python benchmarks/bench_serve.py                                  # 1, 4, 16 clients, 64 tokens, 2 rounds
    python benchmarks/bench_serve.py --clients 1,4 --new-tokens 16 --rounds 1   # quick

Writes benchmarks/results/bench_serve.json and .png, prints a markdown table and puts it in
benchmarks/README.md between `<!-- bench_serve:start -->` and `<!-- bench_serve:end -->`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from _harness import REPO, add_output_arguments, fmt, machine_info, publish, pyplot, read_json, save_figure

README_BLOCKS = {"bench_serve": "bench_serve.json"}  # README marker -> the committed JSON it is rendered from (render.py)
README_SECTION = (
    "## Serving throughput (`benchmarks/bench_serve.py`)\n\n"
    "`llmslim serve` in a child process, driven by the official `openai` client: aggregate output tokens/s and "
    "latency for concurrent streaming clients, against one request at a time in the same run. "
    "Results: `benchmarks/results/bench_serve.json` and `.png`."
)
SPEEDUP_TARGET = 4.0  # 16 clients vs one request at a time (issue 4)
PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain gravity to a child.",
    "List three uses of a paperclip.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "What does a CPU do?",
    "Describe a cat in two sentences.",
]


# ----------------------------------------------------------------------------- the server


def start_server(args: argparse.Namespace, port: int, max_batch: int) -> subprocess.Popen:
    """`llmslim serve` in a child process; returns once /health answers."""
    command = [sys.executable, "-m", "llmslim", "serve", "--port", str(port), "--weights", args.weights]
    command += ["--max-batch", str(max_batch), "--max-queue", "256", "--max-tokens", str(args.new_tokens)]
    command += [str(args.model)] if args.model else []
    log = open(Path(tempfile.gettempdir()) / f"bench_serve.server.{port}.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`{' '.join(command)}` exited with {proc.returncode}: see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server did not answer /health within {args.timeout:.0f} s: see {log.name}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_counters(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {k: float(samples.get(k, 0)) for k in ("llmslim_decode_steps_total", "llmslim_decoded_tokens_total")}


# ----------------------------------------------------------------------------- the clients


def one_request(client, model: str, prompt: str, new_tokens: int) -> dict:
    """One streaming chat request: latency, time to first token, completion tokens."""
    start = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=new_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"latency_s": time.perf_counter() - start, "ttft_s": first, "tokens": tokens}


def run_level(base: str, model: str, clients: int, args: argparse.Namespace) -> dict:
    """`clients` threads, each sending `rounds` requests back to back."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=args.timeout)

    def worker(index: int) -> list[dict]:
        prompts = [PROMPTS[(index + r) % len(PROMPTS)] for r in range(args.rounds)]
        return [one_request(client, model, p, args.new_tokens) for p in prompts]

    before = server_counters(base)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        requests = [r for rs in pool.map(worker, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    after = server_counters(base)
    return summarize(clients, requests, wall, before, after)


def summarize(clients: int, requests: list[dict], wall: float, before: dict, after: dict) -> dict:
    latencies = sorted(r["latency_s"] for r in requests)
    ttfts = sorted(r["ttft_s"] for r in requests if r["ttft_s"] is not None)
    tokens = sum(r["tokens"] for r in requests)
    steps = after["llmslim_decode_steps_total"] - before["llmslim_decode_steps_total"]
    decoded = after["llmslim_decoded_tokens_total"] - before["llmslim_decoded_tokens_total"]
    return {
        "clients": clients,
        "requests": len(requests),
        "completion_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "ttft_p50_s": percentile(ttfts, 50) if ttfts else None,
        "mean_batch": decoded / steps if steps else None,
        "raw": requests,
    }


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of already sorted values."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    rank = (len(sorted_values) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


# ----------------------------------------------------------------------------- report


def add_speedups(levels: list[dict]) -> None:
    baseline = next((lv["tokens_per_s"] for lv in levels if lv["clients"] == 1), None)
    for level in levels:
        level["speedup_vs_1"] = level["tokens_per_s"] / baseline if baseline else None


def target(levels: list[dict]) -> dict:
    top = max(levels, key=lambda lv: lv["clients"])
    met = None if top["speedup_vs_1"] is None or top["clients"] < 16 else top["speedup_vs_1"] >= SPEEDUP_TARGET
    return {"clients": top["clients"], "speedup": top["speedup_vs_1"], "target": SPEEDUP_TARGET, "met": met}


def markdown(report: dict) -> str:
    info, s = report["machine"], report["settings"]
    lines = [
        f"Measured {info['date']} on {info['cpu']}, {info['nproc']} cores; torch {info['versions']['torch']}, "
        f"transformers {info['versions']['transformers']}. Model {report['model']} ({s['weights']}), "
        f"{s['new_tokens']} new tokens per request (greedy, `ignore_eos`), {s['rounds']} request(s) per client, streaming.",
        "",
        "| clients | requests | tokens | wall s | agg tok/s | × 1 client | p50 latency s | p95 latency s | p50 TTFT s | seqs/step |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in report["levels"]:
        lines.append(
            f"| {lv['clients']} | {lv['requests']} | {lv['completion_tokens']} | {lv['wall_s']:.1f} | {lv['tokens_per_s']:.1f} | "
            f"{fmt(lv['speedup_vs_1'])} | {lv['latency_p50_s']:.2f} | {lv['latency_p95_s']:.2f} | {fmt(lv['ttft_p50_s'])} | "
            f"{fmt(lv['mean_batch'], '.1f')} |"
        )
    t = report["target"]
    verdict = {True: "**met**", False: "**not met**", None: "not measured (needs the 16-client level)"}[t["met"]]
    lines += ["", f"Target: 16 clients ≥ {t['target']:.0f}× the aggregate tokens/s of one client: {verdict} ({fmt(t['speedup'])}×)."]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Aggregate tokens/s per concurrency level, and p50/p95 latency."""
    plt = pyplot()
    levels = report["levels"]
    labels = [str(lv["clients"]) for lv in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    bars = left.bar(labels, [lv["tokens_per_s"] for lv in levels], color="tab:blue")
    left.bar_label(bars, labels=[f"{lv['tokens_per_s']:.0f}\n({fmt(lv['speedup_vs_1'])}×)" for lv in levels], fontsize=8)
    left.set(title="aggregate output tokens/s", xlabel="concurrent streaming clients", ylabel="tokens/s")
    xs = range(len(levels))
    right.bar([x - 0.2 for x in xs], [lv["latency_p50_s"] for lv in levels], 0.4, label="p50", color="tab:green")
    right.bar([x + 0.2 for x in xs], [lv["latency_p95_s"] for lv in levels], 0.4, label="p95", color="tab:red")
    right.set_xticks(list(xs), labels)
    right.set(title="request latency", xlabel="concurrent streaming clients", ylabel="seconds")
    right.legend(fontsize=8)
    fig.suptitle(f"llmslim serve: {report['model']} ({report['settings']['weights']}), {report['settings']['new_tokens']} tokens/request")
    save_figure(fig, path)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,16", help="comma list of concurrency levels (default 1,4,16)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends back to back (default 2)")
    parser.add_argument("--model", type=Path, default=None, help="model folder or .gguf (default: the embedded SmolLM2)")
    parser.add_argument("--weights", default="nf4", help="weight format for the server (default nf4)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the server / one request (default 600)")
    add_output_arguments(parser, "bench_serve")
    args = parser.parse_args(argv)
    args.clients = sorted({int(c) for c in args.clients.split(",")})
    if min(args.clients) < 1 or args.new_tokens < 1 or args.rounds < 1:
        parser.error(f"--clients, --new-tokens and --rounds must be >= 1, got {args.clients}, {args.new_tokens}, {args.rounds}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return publish_report(read_json(args.from_json), args, write=False)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(args, port, max_batch=max(args.clients))
    try:
        model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        one_request(_warmup_client(base, args), model, PROMPTS[0], min(8, args.new_tokens))  # compile kernels, warm caches
        levels = []
        for clients in args.clients:
            levels.append(run_level(base, model, clients, args))
            print(f"[{clients} clients] {levels[-1]['tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        stop_server(proc)
    add_speedups(levels)
    settings = {k: getattr(args, k) for k in ("new_tokens", "rounds", "weights")} | {"clients": args.clients}
    report = {"machine": machine_info(), "settings": settings, "model": model, "levels": levels, "target": target(levels)}
    report["machine"]["load_average_at_end"] = os.getloadavg()
    return publish_report(report, args)


def _warmup_client(base: str, args: argparse.Namespace):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=args.timeout)


def publish_report(report: dict, args: argparse.Namespace, write: bool = True) -> int:
    """Write the JSON and PNG, print the table, and put it in the README."""
    print(publish("bench_serve", report, args.results_dir, markdown, plot, None if args.no_readme else README_SECTION, write))
    return 0


if __name__ == "__main__":
    sys.exit(main())
