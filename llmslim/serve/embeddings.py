"""Sentence embeddings for `/v1/embeddings`.

    texts --tokenize--> token ids --sorted by length, batched, right-padded--> last hidden states
          --pool (mean over the attention mask | CLS | last token)--> L2-normalize --> one vector per input

An encoder (BERT-like, e.g. all-MiniLM-L6-v2) is pooled as its sentence-transformers folder says
(`1_Pooling/config.json`: mean by default, the mean of the token states weighted by the attention
mask, exactly `sentence_transformers.models.Pooling`), up to its `max_seq_length`
(`sentence_bert_config.json`), and runs on a thread of its own. A causal LM is pooled at its last
token and runs on the generation engine's thread between decode steps (`Engine.run_job`): one
thread owns a model. Vectors are always L2-normalized (as OpenAI's are), so a dot product is the cosine.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from llmslim.serve.engine import Engine, QueueFullError

logger = logging.getLogger(__name__)

POOLINGS = ("mean", "cls", "last")
BATCH_SIZE = 32  # inputs per forward pass
MAX_INPUTS = 2048  # inputs per request, as in the OpenAI API


class Embedder:
    """Embeds lists of token ids with one model: sorted by length, batched, padded, pooled, normalized.

    Args:
        forward: `(ids (batch, seq), mask (batch, seq)) -> last hidden states (batch, seq, dim)`; called only
            through `run`, on the thread that owns the model.
        run: submits a job to that thread and returns its `concurrent.futures.Future`.
        pooling: "mean" (over the attention mask), "cls" (first token) or "last" (last real token).
        max_length: most tokens per input (longer inputs are refused, never truncated silently).
        vocab_size: token ids must be below it.
        dimension: length of the vectors.
        pad_id: the id that pads a batch (masked out, or after the last token for causal models).
        max_waiting: requests that may wait for the model at once; one more raises `QueueFullError`.
        running: whether the thread that owns the model is alive.
        close: stops that thread (None when someone else owns it).
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        run: Callable[[Callable], concurrent.futures.Future],
        pooling: str,
        max_length: int,
        vocab_size: int,
        dimension: int,
        pad_id: int = 0,
        max_waiting: int = 64,
        running: Callable[[], bool] = lambda: True,
        close: Callable[[], None] | None = None,
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self._forward, self._run, self._running, self._close = forward, run, running, close
        self.pooling, self.max_length, self.vocab_size, self.dimension = pooling, max_length, vocab_size, dimension
        self.pad_id, self.max_waiting = pad_id, max_waiting
        self.waiting = 0

    @property
    def running(self) -> bool:
        return self._running()

    def close(self) -> None:
        if self._close is not None:
            self._close()

    async def embed(self, rows: list[list[int]], batch_size: int = BATCH_SIZE) -> torch.Tensor:
        """The normalized embeddings (len(rows), dim), float32, of token-id lists already checked against `check`.

        Raises:
            QueueFullError: `max_waiting` requests are already waiting for the model.
        """
        if self.waiting >= self.max_waiting:
            raise QueueFullError(f"the server is busy: {self.max_waiting} embedding requests are already waiting; retry later")
        self.waiting += 1
        try:
            order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths together: little padding
            vectors: list[torch.Tensor | None] = [None] * len(rows)
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                pooled = await asyncio.wrap_future(self._run(partial(self.embed_batch, [rows[i] for i in batch])))
                for i, vector in zip(batch, pooled, strict=True):
                    vectors[i] = vector
            return torch.stack(vectors)  # (inputs, dim)
        finally:
            self.waiting -= 1

    def embed_batch(self, rows: list[list[int]]) -> torch.Tensor:
        """One forward pass over `rows`: (len(rows), dim) normalized float32 vectors. Runs on the model's thread."""
        lengths = torch.tensor([len(r) for r in rows])  # (batch,)
        ids = torch.full((len(rows), int(lengths.max())), self.pad_id, dtype=torch.long)  # (batch, seq)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        mask = (torch.arange(ids.shape[1]) < lengths.unsqueeze(1)).long()  # (batch, seq)
        with torch.inference_mode():
            hidden = self._forward(ids, mask).float().cpu()  # (batch, seq, dim)
        return F.normalize(pool(hidden, mask, self.pooling), dim=-1)  # (batch, dim)

    def check(self, rows: list[list[int]]) -> None:
        """Raise ValueError naming the input that is empty, too long or holds an id outside the vocabulary."""
        for i, row in enumerate(rows):
            if not row:
                raise ValueError(f"input {i} is empty: every input needs at least one token")
            if len(row) > self.max_length:
                raise ValueError(
                    f"input {i} has {len(row)} tokens, but this model embeds at most {self.max_length}: shorten it or split it"
                )
            bad = next((t for t in row if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"input {i} holds token id {bad}, outside this model's vocabulary (0 to {self.vocab_size - 1})")


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states (batch, seq, dim) under the attention mask (batch, seq) into (batch, dim)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        last = mask.sum(dim=1) - 1  # (batch,): index of each row's last real token
        return hidden[torch.arange(hidden.shape[0]), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)  # as sentence-transformers' Pooling


def encoder_embedder(model, tokenizer, max_waiting: int = 64) -> Embedder:
    """An `Embedder` for an encoder (BertModel, or a masked LM whose base model is one), on a thread of its own."""
    pooling, max_length = sentence_transformers_settings(Path(getattr(model, "name_or_path", "") or "."))
    limits = [getattr(model.config, "max_position_embeddings", None), max_length]
    max_length = min(x for x in limits if x) if any(limits) else _tokenizer_limit(tokenizer)
    device = next(model.parameters()).device
    base = model.base_model.eval()

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return base(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state

    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llmslim-embed")
    return Embedder(
        forward,
        executor.submit,
        pooling,
        max_length,
        vocab_size=model.get_input_embeddings().num_embeddings,
        dimension=model.config.hidden_size,
        pad_id=tokenizer.pad_token_id or 0,
        max_waiting=max_waiting,
        close=partial(executor.shutdown, wait=False, cancel_futures=True),
    )


def causal_embedder(engine: Engine) -> Embedder:
    """An `Embedder` for the engine's causal LM: the last token's final hidden state, computed on the engine thread."""
    model = engine.model
    return Embedder(
        lambda ids, mask: engine.hidden_states(ids),  # causal attention: the right padding is never seen
        engine.run_job,
        "last",
        engine.context_length,
        vocab_size=engine.vocab_size,
        dimension=model.config.hidden_size,
        pad_id=engine.tokenizer.pad_token_id or 0,
        max_waiting=engine.config.max_queue,
        running=lambda: engine.running,
    )


def sentence_transformers_settings(folder: Path) -> tuple[str, int | None]:
    """The pooling and max_seq_length a sentence-transformers folder declares; ("mean", None) without one."""
    pooling, max_length = "mean", None
    modules = _read_json(folder / "modules.json") or []
    for module in modules:
        if module.get("type", "").endswith("models.Pooling"):
            config = _read_json(folder / module.get("path", "") / "config.json") or {}
            pooling = _pooling_mode(config)
    settings = _read_json(folder / "sentence_bert_config.json") or {}
    if isinstance(settings.get("max_seq_length"), int):
        max_length = settings["max_seq_length"]
    return pooling, max_length


def _pooling_mode(config: dict) -> str:
    if config.get("pooling_mode_mean_tokens", True):
        return "mean"
    if config.get("pooling_mode_cls_token"):
        return "cls"
    if config.get("pooling_mode_lasttoken"):
        return "last"
    modes = sorted(k for k, v in config.items() if k.startswith("pooling_mode") and v)
    raise ValueError(f"this model's sentence-transformers pooling ({', '.join(modes)}) is not supported: llmslim pools {POOLINGS}")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tokenizer_limit(tokenizer) -> int:
    limit = getattr(tokenizer, "model_max_length", None)
    if not isinstance(limit, int) or limit > 1_000_000:  # transformers' "no limit" is a huge number
        raise ValueError("this model does not say its maximum input length (max_position_embeddings)")
    return limit


def encode_vector(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    """A vector as a JSON list of floats, or as base64 of its little-endian float32 bytes (as OpenAI sends it)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.float().numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.float().tolist()
