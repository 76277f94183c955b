"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand.

Counters for requests (by endpoint and status), prompt and generated tokens; gauges read live from
the engine (queue depth, active sequences) and its counters (decode steps, tokens decoded in them,
generations by finish reason); a histogram of request latency. Thread-safe: the HTTP side records
requests, the engine's numbers are read when scraped.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    """Cumulative-bucket histogram per label value, as Prometheus expects.

    Args:
        buckets: upper bounds in increasing order; `+Inf` is added.
    """

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = tuple(sorted(buckets))
        self._counts: dict[str, list[int]] = defaultdict(lambda: [0] * (len(self.buckets) + 1))
        self._sums: dict[str, float] = defaultdict(float)

    def observe(self, label: str, value: float) -> None:
        self._counts[label][bisect.bisect_left(self.buckets, value)] += 1
        self._sums[label] += value

    def lines(self, name: str, label_name: str) -> list[str]:
        out = []
        for label, counts in sorted(self._counts.items()):
            cumulative = 0
            for bound, count in zip((*self.buckets, float("inf")), counts, strict=True):
                cumulative += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                out.append(f'{name}_bucket{{{label_name}="{label}",le="{le}"}} {cumulative}')
            out.append(f'{name}_sum{{{label_name}="{label}"}} {self._sums[label]:.6f}')
            out.append(f'{name}_count{{{label_name}="{label}"}} {cumulative}')
        return out


class Metrics:
    """Everything `/metrics` reports.

    Args:
        engine: has `queue_depth`, `active_count` and `stats` (decode_steps, decoded_tokens, finished), like `Engine`;
            None for a server without one (an encoder that only embeds).
    """

    def __init__(self, engine):
        self._lock = threading.Lock()
        self._engine = engine
        self._requests: dict[tuple[str, int], int] = defaultdict(int)
        self._tokens = {"prompt": 0, "generated": 0}
        self._latency = Histogram()

    def record(self, endpoint: str, status: int, latency_s: float, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """Count one finished request; its latency is observed for generation and embedding endpoints that succeeded."""
        with self._lock:
            self._requests[(endpoint, status)] += 1
            self._tokens["prompt"] += prompt_tokens
            self._tokens["generated"] += completion_tokens
            if status == 200 and endpoint.startswith("/v1/") and endpoint != "/v1/models":
                self._latency.observe(endpoint, latency_s)

    def render(self) -> str:
        """The Prometheus text format of all metrics."""
        with self._lock:
            lines = _header("llmslim_requests_total", "counter", "HTTP requests by endpoint and status code")
            lines += [f'llmslim_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self._requests.items())]
            lines += _header("llmslim_prompt_tokens_total", "counter", "prompt tokens processed")
            lines.append(f"llmslim_prompt_tokens_total {self._tokens['prompt']}")
            lines += _header("llmslim_generation_tokens_total", "counter", "tokens generated")
            lines.append(f"llmslim_generation_tokens_total {self._tokens['generated']}")
            lines += _header("llmslim_request_latency_seconds", "histogram", "generation and embedding latency, arrival to last byte")
            lines += self._latency.lines("llmslim_request_latency_seconds", "endpoint")
        return "\n".join(lines + self._engine_lines()) + "\n"

    def _engine_lines(self) -> list[str]:
        if self._engine is None:  # an encoder: no generation engine
            return []
        engine, stats = self._engine, self._engine.stats
        lines = _header("llmslim_queue_depth", "gauge", "requests waiting for a generation slot")
        lines.append(f"llmslim_queue_depth {engine.queue_depth}")
        lines += _header("llmslim_active_sequences", "gauge", "sequences being generated")
        lines.append(f"llmslim_active_sequences {engine.active_count}")
        lines += _header("llmslim_decode_steps_total", "counter", "batched decode steps (one forward pass each)")
        lines.append(f"llmslim_decode_steps_total {stats.decode_steps}")
        lines += _header("llmslim_decoded_tokens_total", "counter", "tokens produced by decode steps (per step: the batch size)")
        lines.append(f"llmslim_decoded_tokens_total {stats.decoded_tokens}")
        lines += _header("llmslim_generations_total", "counter", "generations ended, by finish reason")
        lines += [f'llmslim_generations_total{{reason="{r}"}} {n}' for r, n in sorted(dict(stats.finished).items())]
        return lines + _prefix_cache_lines(engine.prefix_cache)


def _prefix_cache_lines(cache) -> list[str]:
    stats = cache.stats
    lines = _header("llmslim_prefix_cache_lookups_total", "counter", "prompts looked up in the prefix cache")
    lines.append(f"llmslim_prefix_cache_lookups_total {stats.lookups}")
    lines += _header("llmslim_prefix_cache_hits_total", "counter", "prompts whose prefix was cached (its keys and values reused)")
    lines.append(f"llmslim_prefix_cache_hits_total {stats.hits}")
    lines += _header("llmslim_prefix_cache_hit_tokens_total", "counter", "prompt tokens reused from the prefix cache, not recomputed")
    lines.append(f"llmslim_prefix_cache_hit_tokens_total {stats.hit_tokens}")
    lines += _header("llmslim_prefix_cache_evictions_total", "counter", "prefixes evicted (least recently used) to stay in memory")
    lines.append(f"llmslim_prefix_cache_evictions_total {stats.evictions}")
    lines += _header("llmslim_prefix_cache_bytes", "gauge", "bytes of keys and values held by the prefix cache")
    lines.append(f"llmslim_prefix_cache_bytes {cache.nbytes}")
    return lines


def _header(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
