"""The generation engine: one thread owns the model and runs iteration-level (continuous) batching.

    submit() --bounded queue--> [engine thread]  loop:
                                   drop cancelled sequences
                                   admit waiting requests while slots are free: prefill each alone
                                   one decode step for every active sequence together
                                   per sequence: sample, detokenize, stop? -> events to its client

Requests join and leave the running batch between steps, so a short request never waits for a
long one to finish. Each sequence keeps its own KV cache (`kvcache.SequenceKV`); the linear layers
run on the whole batch at once (weights read once per step), attention runs per sequence. Events go
back to the asyncio side through `loop.call_soon_threadsafe`, so model compute never blocks the
event loop.

A failure is contained: an error while starting, sampling or detokenizing one sequence ends only that
sequence, a failed batched forward ends that step's batch (their KV caches may be half-written),
anything else ends the running sequences; the thread itself keeps serving until `stop()`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import torch

from llmslim.serve.kvcache import BatchKV, SequenceKV, use_row_attention
from llmslim.serve.sampling import SamplingParams, sample_token
from llmslim.serve.textstream import Delta, TextStream

logger = logging.getLogger(__name__)

_IDLE_POLL_S = 0.05  # how often an idle engine checks for shutdown
FINISH_REASONS = ("stop", "length", "cancelled", "error")


class QueueFullError(RuntimeError):
    """The waiting queue is full: the client should retry later (HTTP 429)."""


class ContextLengthError(ValueError):
    """The prompt does not fit the model's context (HTTP 400)."""


class EngineStoppedError(RuntimeError):
    """The engine thread is not running, so nothing would answer the request (HTTP 503)."""


@dataclass(frozen=True)
class EngineConfig:
    """Limits of the engine.

    Args:
        max_batch: sequences decoded together in one step (generation slots).
        max_queue: requests that may wait for a slot; one more is refused with `QueueFullError`.
        max_tokens: server cap on the new tokens of one request.
        context_length: most tokens (prompt + generated) per sequence; None = the model's maximum.
        max_body_bytes: largest HTTP request body the server reads (a bigger one gets 413); the bound on
            what is parsed and tokenized before the context length can be checked.
    """

    max_batch: int = 16
    max_queue: int = 64
    max_tokens: int = 1024
    context_length: int | None = None
    max_body_bytes: int = 2 * 1024 * 1024

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {self.context_length}")


@dataclass
class Event:
    """A piece of a generation sent to the client; the last one has a `finish_reason`.

    `finish_reason` is "stop" (end-of-sequence token or stop string), "length" (max_tokens or the
    context), "cancelled" or "error" (with `error` saying what happened).
    """

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class EngineStats:
    """Counters kept by the engine thread (read by /metrics): batching shows as tokens per step > 1."""

    decode_steps: int = 0
    decoded_tokens: int = 0
    prefill_tokens: int = 0
    finished: Counter = field(default_factory=lambda: Counter(dict.fromkeys(FINISH_REASONS, 0)))  # fixed keys: safe to read


class RequestHandle:
    """The client side of one generation: iterate `events()`, call `cancel()` when the client goes away."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop, request_id: str):
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()
        self.finished = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating for this request; the engine frees its slot before its next step."""
        self._cancelled.set()

    async def events(self) -> AsyncIterator[Event]:
        """The events of this generation, ending with the one that has a `finish_reason`."""
        while not self.finished:
            event = await self._events.get()
            self.finished = event.finish_reason is not None
            yield event

    def emit(self, event: Event) -> None:
        """Called from the engine thread (for many events at once, `_deliver` wakes the loop once)."""
        _deliver(self._loop, [(self, event)])


def _deliver(loop: asyncio.AbstractEventLoop, events: list[tuple[RequestHandle, Event]]) -> None:
    """Hand `events` to their handles' queues with one wake-up of the event loop."""

    def put_all() -> None:
        for handle, event in events:
            handle._events.put_nowait(event)

    try:
        loop.call_soon_threadsafe(put_all)
    except RuntimeError:  # the event loop is closed: the server is gone, nobody is listening
        pass


@dataclass
class _Sequence:
    handle: RequestHandle
    kv: SequenceKV
    stream: TextStream
    generator: torch.Generator
    last_token: int = -1
    completion_tokens: int = field(default=0)

    @property
    def prompt_tokens(self) -> int:
        return len(self.handle.prompt_ids)


class Engine:
    """Continuous-batching generation for one causal LM.

    Args:
        model: a loaded causal LM (quantized or not) whose attention is pluggable (most transformers models).
        tokenizer: its tokenizer.
        config: limits (batch size, queue length, max tokens, context).
    """

    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.context_length = _context_length(model, self.config)
        self._cache_kwarg = use_row_attention(model)
        self._num_layers = model.config.num_hidden_layers
        self._eos = _eos_ids(model, tokenizer)
        self._device = next(model.parameters()).device
        self._pending: queue.Queue[RequestHandle] = queue.Queue(maxsize=self.config.max_queue)
        self._active: list[_Sequence] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = EngineStats()
        self._outbox: list[tuple[RequestHandle, Event]] = []  # events of the current step, sent together

    # ----------------------------------------------------------------- client side (event loop thread)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot."""
        return self._pending.qsize()

    @property
    def active_count(self) -> int:
        """Sequences being generated."""
        return len(self._active)

    @property
    def running(self) -> bool:
        """Whether the engine thread is alive and accepting work."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model accepts."""
        return self.model.get_input_embeddings().num_embeddings

    def start(self) -> Engine:
        """Start the engine thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="llmslim-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the current step, stop the thread, and end every open request with an error event."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._end_all("the server is shutting down")

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> RequestHandle:
        """Queue a generation; call from a running event loop.

        Raises:
            EngineStoppedError: the engine thread is not running.
            ContextLengthError: the prompt is empty or leaves no room in the context.
            ValueError: a token id is outside the vocabulary.
            QueueFullError: `max_queue` requests are already waiting.
        """
        if not self.running:
            raise EngineStoppedError("the generation engine is not running: the server is stopping or failed; see its log")
        if not prompt_ids:
            raise ContextLengthError("the prompt is empty: give at least one token of text")
        if not all(0 <= i < self.vocab_size for i in prompt_ids):
            bad = next(i for i in prompt_ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is outside this model's vocabulary (0 to {self.vocab_size - 1})")
        if len(prompt_ids) >= self.context_length:
            raise ContextLengthError(
                f"this model's maximum context length is {self.context_length} tokens, but the prompt has "
                f"{len(prompt_ids)} tokens: shorten the prompt"
            )
        room = self.context_length - len(prompt_ids)
        params = replace(params, max_tokens=min(params.max_tokens, self.config.max_tokens, room))
        handle = RequestHandle(list(prompt_ids), params, asyncio.get_running_loop(), request_id or uuid.uuid4().hex)
        try:
            self._pending.put_nowait(handle)
        except queue.Full:
            raise QueueFullError(f"the server is busy: {self.config.max_queue} requests are already waiting; retry later") from None
        return handle

    # ----------------------------------------------------------------- engine thread

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stopping.is_set():
                    self._guarded(self._active, self._iteration)  # a failure outside the per-sequence guards ends all running
                    self._flush()
        finally:
            if not self._stopping.is_set():  # only a BaseException gets here: say so, and answer everyone
                logger.critical("the engine thread stopped unexpectedly; requests will get 503 until restart")
                self._end_all("the generation engine stopped unexpectedly")

    def _iteration(self) -> None:
        self._drop_cancelled()
        self._admit(block=not self._active)
        if self._active:
            self._decode_step()

    def _drop_cancelled(self) -> None:
        for sequence in [s for s in self._active if s.handle.cancelled]:
            self._finish(sequence, Delta(""), "cancelled")

    def _admit(self, block: bool) -> None:
        """Prefill waiting requests into free slots; wait briefly for one if nothing is running."""
        while len(self._active) < self.config.max_batch:
            try:
                handle = self._pending.get(timeout=_IDLE_POLL_S) if block else self._pending.get_nowait()
            except queue.Empty:
                return
            block = False
            if handle.cancelled:  # its client left while it waited
                self.stats.finished["cancelled"] += 1
                handle.emit(Event("", "cancelled", prompt_tokens=len(handle.prompt_ids)))
                continue
            try:
                sequence = self._new_sequence(handle)
            except Exception as err:
                logger.exception("could not start generation %s", handle.id)
                self.stats.finished["error"] += 1
                handle.emit(Event("", "error", prompt_tokens=len(handle.prompt_ids), error=f"{type(err).__name__}: {err}"))
                continue
            self._active.append(sequence)
            self._guarded([sequence], self._prefill, sequence)
            self._flush()  # its first token goes out now, not after the other admissions

    def _new_sequence(self, handle: RequestHandle) -> _Sequence:
        stream = TextStream(self.tokenizer, handle.params.stop)
        return _Sequence(handle, SequenceKV(self._num_layers), stream, handle.params.generator())

    def _prefill(self, sequence: _Sequence) -> None:
        ids = torch.tensor([sequence.handle.prompt_ids])  # (1, prompt)
        positions = torch.arange(ids.shape[1]).unsqueeze(0)  # (1, prompt)
        logits = self._forward([sequence.kv], ids, positions)  # (1, vocab)
        self.stats.prefill_tokens += ids.shape[1]
        self._advance(sequence, logits[0], int(logits[0].argmax()))

    def _decode_step(self) -> None:
        batch = list(self._active)
        logits = self._guarded(batch, self._batch_logits, batch)  # (batch, vocab); a failed forward ends the whole batch
        if logits is None:
            return
        self.stats.decode_steps += 1
        self.stats.decoded_tokens += len(batch)
        greedy = logits.argmax(dim=-1).tolist()  # one call for the batch: argmax is exact, so per row it is the same
        for row, sequence in enumerate(batch):
            self._guarded([sequence], self._advance, sequence, logits[row], greedy[row])  # a failure here ends this sequence only

    def _batch_logits(self, batch: list[_Sequence]) -> torch.Tensor:
        ids = torch.tensor([[s.last_token] for s in batch])  # (batch, 1)
        positions = torch.tensor([[s.kv.length] for s in batch])  # (batch, 1): each sequence's own next position
        return self._forward([s.kv for s in batch], ids, positions)  # (batch, vocab)

    def _forward(self, kvs: list[SequenceKV], ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits of the last position of each row, shape (batch, vocab)."""
        kwargs = {self._cache_kwarg: BatchKV(kvs), "use_cache": True, "logits_to_keep": 1}
        out = self.model(input_ids=ids.to(self._device), position_ids=positions.to(self._device), **kwargs)
        return out.logits[:, -1, :]

    def _advance(self, sequence: _Sequence, logits: torch.Tensor, greedy_token: int) -> None:
        """Choose the next token of `sequence`, send its text, and end the sequence if it is done."""
        params = sequence.handle.params
        token = greedy_token if params.greedy else sample_token(logits, params, sequence.generator)
        sequence.completion_tokens += 1
        if token in self._eos and not params.ignore_eos:
            self._finish(sequence, sequence.stream.finish(), "stop")
            return
        delta = sequence.stream.push(token)
        if delta.stopped:
            self._finish(sequence, delta, "stop")
        elif sequence.completion_tokens >= params.max_tokens:
            rest = sequence.stream.finish()
            self._finish(sequence, Delta(delta.text + rest.text), "length")
        else:
            sequence.last_token = token
            if delta.text:
                self._outbox.append((sequence.handle, Event(delta.text)))

    def _finish(self, sequence: _Sequence, delta: Delta, reason: str, error: str | None = None) -> None:
        if sequence in self._active:
            self._active.remove(sequence)  # its KV cache goes with it
        self.stats.finished[reason] += 1
        usage = {"prompt_tokens": sequence.prompt_tokens, "completion_tokens": sequence.completion_tokens}
        self._outbox.append((sequence.handle, Event(delta.text, reason, error=error, **usage)))

    def _guarded(self, sequences: list[_Sequence], step: Callable, *args):
        """`step(*args)`; if it raises, end `sequences` with an error event (the others keep going) and return None."""
        try:
            return step(*args)
        except Exception as err:
            failed = [s for s in sequences if s in self._active]
            logger.exception("generation failed for %d sequence(s): %s", len(failed), ", ".join(s.handle.id for s in failed))
            for sequence in failed:
                self._finish(sequence, Delta(""), "error", error=f"{type(err).__name__}: {err}")
            return None

    def _end_all(self, message: str) -> None:
        """End every running and waiting request with an error event."""
        for sequence in list(self._active):
            self._finish(sequence, Delta(""), "error", error=message)
        self._flush()
        while True:
            try:
                handle = self._pending.get_nowait()
            except queue.Empty:
                return
            self.stats.finished["error"] += 1
            handle.emit(Event("", "error", prompt_tokens=len(handle.prompt_ids), error=message))

    def _flush(self) -> None:
        """Send the events collected since the last flush: one event-loop wake-up per loop, not per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for handle, event in self._outbox:
            by_loop.setdefault(handle._loop, []).append((handle, event))
        self._outbox = []
        for loop, events in by_loop.items():
            _deliver(loop, events)


def _context_length(model, config: EngineConfig) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is None and config.context_length is None:
        raise ValueError(f"{type(model).__name__} does not say its context length: pass EngineConfig(context_length=...)")
    if limit is None or config.context_length is None:
        return limit or config.context_length
    return min(limit, config.context_length)


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(value)
    return frozenset(ids)
