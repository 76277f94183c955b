"""The generation engine: one thread owns the model and runs iteration-level (continuous) batching.

    submit() --bounded queue--> [engine thread]  loop:
                                   drop cancelled sequences
                                   run queued jobs (embedding forwards) between steps
                                   admit waiting requests while slots are free (the longest cached prefix of a
                                     prompt is reused: only the rest will be computed)
                                   prefill: up to `prefill_chunk` prompt tokens of the admitted requests, oldest
                                     first, each request alone (chunked prefill: a long prompt takes several
                                     iterations, so the running sequences are never paused for all of it)
                                     (a request for n choices: one prefill, its KV copied to n sequences)
                                   one decode step for every sequence whose prompt is done, together
                                   the grammar masks of the constrained rows (tens of microseconds a row)
                                   per sequence: mask, penalties, sample, logprobs, detokenize, stop? -> events

Requests join and leave the running batch between steps, so a short request never waits for a
long one to finish. Each sequence keeps its own KV cache (`kvcache.SequenceKV`); the linear layers
run on the whole batch at once (weights read once per step), attention runs per sequence. Events go
back to the asyncio side through `loop.call_soon_threadsafe`, so model compute never blocks the
event loop.

A failure is contained: an error while starting, sampling or detokenizing one sequence ends only that
sequence's request (its other choices are cancelled), a failed batched forward ends that step's batch
(their KV caches may be half-written), a failed job (an embedding forward) fails only its future,
anything else ends the running sequences; the thread itself keeps serving until `stop()`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import queue
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import torch

from llmslim.serve.grammar import Constraint, Grammars, apply_mask
from llmslim.serve.kvcache import BatchKV, SequenceKV, cache_keyword, use_row_attention
from llmslim.serve.logprobs import TokenLogprob, token_logprob
from llmslim.serve.prefixcache import PrefixCache
from llmslim.serve.sampling import SamplingParams, apply_penalties, sample_token
from llmslim.serve.textstream import Delta, TextStream

logger = logging.getLogger(__name__)

_IDLE_POLL_S = 0.05  # how often an idle engine checks for shutdown
FINISH_REASONS = ("stop", "length", "cancelled", "error")


class QueueFullError(RuntimeError):
    """The waiting queue is full: the client should retry later (HTTP 429)."""


class ContextLengthError(ValueError):
    """The prompt does not fit the model's context (HTTP 400)."""


class TooManyChoicesError(ValueError):
    """A request asks for more choices (`n`) than the server allows (HTTP 400)."""


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
        max_n: most choices (`n`) one request may ask for; each takes a generation slot, so the cap is
            also at most `max_batch`.
        prefix_cache_mib: memory for the keys and values of prompt prefixes that later prompts reuse (prefix caching,
            least recently used out); 0 turns it off.
        prefill_chunk: most prompt tokens computed between two decode steps of the running sequences (chunked
            prefill); a longer prompt is computed over several steps. 0: each admitted prompt whole at once.
    """

    max_batch: int = 16
    max_queue: int = 64
    max_tokens: int = 1024
    context_length: int | None = None
    max_body_bytes: int = 2 * 1024 * 1024
    max_n: int = 8
    prefix_cache_mib: float = 256.0
    prefill_chunk: int = 512

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_tokens", "max_body_bytes", "max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if isinstance(self.prefill_chunk, bool) or not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be a whole number of tokens >= 0 (0: whole prompts), got {self.prefill_chunk!r}")
        if not self.prefix_cache_mib >= 0:
            raise ValueError(f"prefix_cache_mib must be 0 (off) or more, got {self.prefix_cache_mib}")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {self.context_length}")


@dataclass
class Event:
    """A piece of one choice of a generation sent to the client; the last one of each choice has a `finish_reason`.

    `finish_reason` is "stop" (end-of-sequence token or stop string), "length" (max_tokens or the
    context), "cancelled" or "error" (with `error` saying what happened). `logprobs` holds the tokens
    generated since the last event of this choice (when the request asked for logprobs): every
    generated token is in exactly one event, the end-of-sequence token included.
    """

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    index: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


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
        """The events of this generation's choices, until every choice has had its event with a `finish_reason`."""
        open_choices = self.params.n
        while open_choices:
            event = await self._events.get()
            open_choices -= event.finish_reason is not None
            self.finished = not open_choices
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
    """One choice of a request being generated."""

    handle: RequestHandle
    kv: SequenceKV
    stream: TextStream
    generator: torch.Generator
    index: int = 0
    constraint: Constraint | None = None  # structured output: the grammar the tokens must follow
    ready: bool = False  # its prompt is computed: it decodes with the batch
    last_token: int = -1
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet sent

    @property
    def prompt_tokens(self) -> int:
        return len(self.handle.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)

    def take_logprobs(self) -> list[TokenLogprob]:
        taken, self.logprobs = self.logprobs, []
        return taken


@dataclass
class _Prefill:
    """The prompt of one admitted request, computed a chunk at a time into its first choice's cache."""

    sequences: list[_Sequence]  # the request's choices; the others copy the first one's cache at the end
    done: int  # prompt tokens already in sequences[0].kv (a cached prefix counts)

    @property
    def prompt(self) -> list[int]:
        return self.sequences[0].handle.prompt_ids


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
        self._base_cache_kwarg = cache_keyword(model.base_model)
        self._num_layers = model.config.num_hidden_layers
        self._eos = _eos_ids(model, tokenizer)
        self._device = next(model.parameters()).device
        self.prefix_cache = PrefixCache(int(self.config.prefix_cache_mib * 2**20))  # used on the engine thread only
        self.grammars = Grammars(tokenizer, self.vocab_size, self._eos)  # llguidance loads on the first constrained request
        self._pending: queue.Queue[RequestHandle | None] = queue.Queue(maxsize=self.config.max_queue)  # None: a wake-up
        self._waiting: RequestHandle | None = None  # taken from the queue, waiting for n free slots
        self._jobs: queue.Queue[tuple[Callable, concurrent.futures.Future]] = queue.Queue(maxsize=self.config.max_queue)
        self._active: list[_Sequence] = []  # every started choice, prefilling or decoding (each holds a slot)
        self._prefilling: collections.deque[_Prefill] = collections.deque()  # admitted prompts not yet computed, oldest first
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = EngineStats()
        self._outbox: list[tuple[RequestHandle, Event]] = []  # events of the current step, sent together

    # ----------------------------------------------------------------- client side (event loop thread)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot."""
        return self._pending.qsize() + (self._waiting is not None)

    @property
    def active_count(self) -> int:
        """Sequences being generated."""
        return len(self._active)

    @property
    def running(self) -> bool:
        """Whether the engine thread is alive and accepting work."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    @property
    def max_choices(self) -> int:
        """The most choices (`n`) one request may ask for."""
        return min(self.config.max_n, self.config.max_batch)

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
            TooManyChoicesError: `params.n` is over `max_choices`.
            QueueFullError: `max_queue` requests are already waiting.
        """
        if not self.running:
            raise EngineStoppedError("the generation engine is not running: the server is stopping or failed; see its log")
        if params.n > self.max_choices:
            raise TooManyChoicesError(
                f"n must be at most {self.max_choices} on this server, got {params.n}: ask for fewer choices, "
                "or start the server with a larger --max-n (and --max-batch)"
            )
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

    def run_job(self, job: Callable[[], object]) -> concurrent.futures.Future:
        """Run `job()` on the engine thread between two decode steps (the thread that owns the model); its future.

        Raises:
            EngineStoppedError: the engine thread is not running.
            QueueFullError: `max_queue` jobs are already waiting.
        """
        if not self.running:
            raise EngineStoppedError("the generation engine is not running: the server is stopping or failed; see its log")
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self._jobs.put_nowait((job, future))
        except queue.Full:
            raise QueueFullError(f"the server is busy: {self.config.max_queue} jobs are already waiting; retry later") from None
        if not self._active:  # an idle engine waits on the request queue: wake it (a busy one runs jobs every step)
            try:
                self._pending.put_nowait(None)
            except queue.Full:
                pass
        return future

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        """The base model's last hidden states, (batch, seq, hidden), of the right-padded rows `ids` (batch, seq).

        Call it on the engine thread (through `run_job`). Attention is causal and per row, so a row's
        real tokens never see its padding: each row's states equal those of the row alone.
        """
        kvs = BatchKV([SequenceKV(self._num_layers) for _ in range(ids.shape[0])])  # thrown away afterwards
        positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)  # (batch, seq)
        kwargs = {self._base_cache_kwarg: kvs, "use_cache": True}
        out = self.model.base_model(input_ids=ids.to(self._device), position_ids=positions.to(self._device), **kwargs)
        return out.last_hidden_state

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
        self._run_jobs()
        self._drop_cancelled()
        self._admit(block=not self._active)
        if self._prefilling:
            self._prefill_step()
        if any(s.ready for s in self._active):
            self._decode_step()

    def _run_jobs(self) -> None:
        while True:
            try:
                job, future = self._jobs.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():  # its client left
                continue
            try:
                future.set_result(job())
            except Exception as err:  # the job's caller answers for it; the engine goes on
                future.set_exception(err)

    def _drop_cancelled(self) -> None:
        for sequence in [s for s in self._active if s.handle.cancelled]:
            self._finish(sequence, Delta(""), "cancelled")

    def _admit(self, block: bool) -> None:
        """Prefill waiting requests into free slots; wait briefly for one if nothing is running.

        A request for n choices waits, at the head of the line, until n slots are free.
        """
        while len(self._active) < self.config.max_batch:
            handle = self._next_waiting(block)
            if handle is None:
                return
            block = False
            if handle.cancelled:  # its client left while it waited
                self._answer(handle, "cancelled")
                continue
            if handle.params.n > self.config.max_batch - len(self._active):
                self._waiting = handle
                return
            self._start(handle)
            self._flush()  # its first tokens go out now, not after the other admissions

    def _next_waiting(self, block: bool) -> RequestHandle | None:
        if self._waiting is not None:
            handle, self._waiting = self._waiting, None
            return handle
        try:
            return self._pending.get(timeout=_IDLE_POLL_S) if block else self._pending.get_nowait()  # None: a job woke us
        except queue.Empty:
            return None

    def _start(self, handle: RequestHandle) -> None:
        """Start the n choices of `handle`: one prefill, then each choice samples its first token."""
        try:
            sequences = [self._new_sequence(handle, index) for index in range(handle.params.n)]
        except Exception as err:
            logger.exception("could not start generation %s", handle.id)
            self._answer(handle, "error", f"{type(err).__name__}: {err}")
            return
        self._active.extend(sequences)
        self._guarded(sequences, self._queue_prefill, sequences)

    def _new_sequence(self, handle: RequestHandle, index: int) -> _Sequence:
        params = handle.params
        stream = TextStream(self.tokenizer, params.stop)
        constraint = self.grammars.constraint(params.grammar) if params.grammar is not None else None
        return _Sequence(handle, SequenceKV(self._num_layers), stream, params.choice_generator(index), index, constraint)

    def _queue_prefill(self, sequences: list[_Sequence]) -> None:
        """Reuse the longest cached prefix of the prompt; the rest waits for `_prefill_step`."""
        cached, start = self.prefix_cache.lookup(sequences[0].handle.prompt_ids)
        sequences[0].kv = cached or sequences[0].kv
        self._prefilling.append(_Prefill(sequences, start))

    def _prefill_step(self) -> None:
        """Compute up to `prefill_chunk` prompt tokens (all of them with 0), oldest request first; a request whose
        prompt is done samples its first tokens. A failure ends that request's choices only."""
        budget = self.config.prefill_chunk or None
        while self._prefilling and (budget is None or budget > 0):
            job = self._prefilling[0]
            if not any(s in self._active for s in job.sequences):  # cancelled or failed
                self._prefilling.popleft()
                continue
            computed = self._guarded(job.sequences, self._prefill_chunk, job, budget)
            if computed is None or job.done == len(job.prompt):
                self._prefilling.popleft()
                self._flush()  # its first tokens go out now, not after the other prefills
            if computed is not None and budget is not None:
                budget -= computed

    def _prefill_chunk(self, job: _Prefill, budget: int | None) -> int:
        """Compute the next `budget` tokens (or all the rest) of `job`'s prompt; return how many."""
        first, prompt = job.sequences[0], job.prompt
        end = len(prompt) if budget is None else min(len(prompt), job.done + budget)
        ids = torch.tensor([prompt[job.done : end]])  # (1, chunk)
        positions = torch.arange(job.done, end).unsqueeze(0)  # (1, chunk)
        logits = self._forward([first.kv], ids, positions)  # (1, vocab)
        self.stats.prefill_tokens += end - job.done
        computed, job.done = end - job.done, end
        if end == len(prompt):
            self._first_tokens(job.sequences, logits[0])
        return computed

    def _first_tokens(self, sequences: list[_Sequence], logits: torch.Tensor) -> None:
        """The prompt of `sequences` is computed (`logits` (vocab,) of its last position): cache it, give every choice
        its own copy, sample each choice's first token."""
        first = sequences[0]
        self.prefix_cache.store(first.handle.prompt_ids, first.kv)
        for other in sequences[1:]:
            other.kv = first.kv.copy()  # the prompt's keys and values, computed once
        greedy = int(logits.argmax())
        masks = self._masks(sequences)
        for sequence in sequences:
            sequence.ready = True
            self._guarded([sequence], self._advance, sequence, logits, greedy, masks.get(id(sequence)))

    def _decode_step(self) -> None:
        batch = [s for s in self._active if s.ready]
        logits = self._guarded(batch, self._batch_logits, batch)  # (batch, vocab); a failed forward ends the whole batch
        if logits is None:
            return
        self.stats.decode_steps += 1
        self.stats.decoded_tokens += len(batch)
        greedy = logits.argmax(dim=-1).tolist()  # one call for the batch: argmax is exact, so per row it is the same
        masks = self._masks(batch)
        for row, sequence in enumerate(batch):
            if sequence in self._active:  # (a failed mask ended it); a failure here ends this sequence only
                self._guarded([sequence], self._advance, sequence, logits[row], greedy[row], masks.get(id(sequence)))

    def _masks(self, batch: list[_Sequence]) -> dict[int, torch.Tensor]:
        """The allowed next tokens of each constrained sequence of `batch`, by id(sequence)."""
        constrained = [s for s in batch if s.constraint is not None]
        if not constrained:
            return {}
        allowed = self._guarded(constrained, self.grammars.masks, [s.constraint for s in constrained])  # (rows, vocab) bool
        return {} if allowed is None else {id(s): allowed[row] for row, s in enumerate(constrained)}

    def _batch_logits(self, batch: list[_Sequence]) -> torch.Tensor:
        ids = torch.tensor([[s.last_token] for s in batch])  # (batch, 1)
        positions = torch.tensor([[s.kv.length] for s in batch])  # (batch, 1): each sequence's own next position
        return self._forward([s.kv for s in batch], ids, positions)  # (batch, vocab)

    def _forward(self, kvs: list[SequenceKV], ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits of the last position of each row, shape (batch, vocab)."""
        kwargs = {self._cache_kwarg: BatchKV(kvs), "use_cache": True, "logits_to_keep": 1}
        out = self.model(input_ids=ids.to(self._device), position_ids=positions.to(self._device), **kwargs)
        return out.logits[:, -1, :]

    def _advance(self, sequence: _Sequence, logits: torch.Tensor, greedy_token: int, allowed: torch.Tensor | None = None) -> None:
        """Choose the next token of `sequence` from its raw `logits` (vocab,) (among `allowed` ones, for a constrained
        sequence), send its text, and end it if it is done."""
        params = sequence.handle.params
        token = self._choose(sequence, logits, greedy_token, allowed)
        if params.logprobs is not None:
            sequence.logprobs.append(token_logprob(logits, token, params.logprobs))  # of the raw logits
        sequence.output_ids.append(token)
        if sequence.constraint is not None:
            sequence.constraint.consume(token)
        if token in self._eos and (not params.ignore_eos or sequence.constraint is not None):
            self._finish(sequence, sequence.stream.finish(), "stop")
            return
        delta = sequence.stream.push(token)
        if sequence.constraint is not None and sequence.constraint.complete:  # the document is whole: nothing may follow
            self._finish(sequence, Delta(delta.text + sequence.stream.finish().text), "stop")
        elif delta.stopped:
            self._finish(sequence, delta, "stop")
        elif sequence.completion_tokens >= params.max_tokens:
            rest = sequence.stream.finish()
            self._finish(sequence, Delta(delta.text + rest.text), "length")
        else:
            sequence.last_token = token
            if delta.text:  # logprobs of tokens whose text is held back go out with the next text
                self._outbox.append((sequence.handle, Event(delta.text, index=sequence.index, logprobs=sequence.take_logprobs())))

    def _choose(self, sequence: _Sequence, logits: torch.Tensor, greedy_token: int, allowed: torch.Tensor | None) -> int:
        params = sequence.handle.params
        if params.penalized:
            logits = apply_penalties(logits, params, sequence.handle.prompt_ids, sequence.output_ids)  # (vocab,)
            greedy_token = int(logits.argmax())
        if allowed is not None:  # after the penalties: they make every logit finite again
            logits = apply_mask(logits, allowed)  # (vocab,)
            greedy_token = int(logits.argmax())
        return greedy_token if params.greedy else sample_token(logits, params, sequence.generator)

    def _finish(self, sequence: _Sequence, delta: Delta, reason: str, error: str | None = None) -> None:
        if sequence in self._active:
            self._active.remove(sequence)  # its KV cache goes with it
        self.stats.finished[reason] += 1
        usage = {"prompt_tokens": sequence.prompt_tokens, "completion_tokens": sequence.completion_tokens}
        event = Event(delta.text, reason, error=error, index=sequence.index, logprobs=sequence.take_logprobs(), **usage)
        self._outbox.append((sequence.handle, event))

    def _answer(self, handle: RequestHandle, reason: str, error: str | None = None) -> None:
        """End every choice of a request that never started (cancelled while waiting, failed to start, shut down)."""
        self.stats.finished[reason] += handle.params.n
        events = [(handle, Event("", reason, len(handle.prompt_ids), error=error, index=i)) for i in range(handle.params.n)]
        _deliver(handle._loop, events)

    def _guarded(self, sequences: list[_Sequence], step: Callable, *args):
        """`step(*args)`; if it raises, end `sequences` with an error event (the others keep going) and return None."""
        try:
            return step(*args)
        except Exception as err:
            failed = [s for s in sequences if s in self._active]
            logger.exception("generation failed for %d sequence(s): %s", len(failed), ", ".join(s.handle.id for s in failed))
            for sequence in failed:
                self._finish(sequence, Delta(""), "error", error=f"{type(err).__name__}: {err}")
                sequence.handle.cancel()  # the request has failed: its other choices stop before the next step
            return None

    def _end_all(self, message: str) -> None:
        """End every running and waiting request with an error event."""
        self._prefilling.clear()
        for sequence in list(self._active):
            self._finish(sequence, Delta(""), "error", error=message)
        self._flush()
        if self._waiting is not None:
            handle, self._waiting = self._waiting, None
            self._answer(handle, "error", message)
        while True:
            try:
                handle = self._pending.get_nowait()
            except queue.Empty:
                break
            if handle is not None:
                self._answer(handle, "error", message)
        while True:
            try:
                _, future = self._jobs.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineStoppedError(message))

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
