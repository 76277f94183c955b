"""The OpenAI wire format: request models (validated by pydantic), response and chunk bodies, error bodies."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from llmslim.serve.sampling import SEED_RANGE, SamplingParams

MAX_STOP_STRINGS = 4  # as in the OpenAI API


class APIError(Exception):
    """An error answered with an OpenAI-style body `{"error": {"message", "type", "param", "code"}}`.

    Args:
        status: HTTP status code.
        message: what was wrong and what to do about it.
        type: OpenAI error type ("invalid_request_error", "rate_limit_error", "server_error", ...).
        param: the request field at fault, if any.
        code: a short machine-readable code, if any.
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _valid_unicode(text: str) -> str:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"); no tokenizer can encode one, so it is a bad request."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"text must be valid Unicode, but it holds a lone surrogate {text[err.start]!r} at position {err.start}") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
Float = Annotated[float, Field(allow_inf_nan=False)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="allow")  # clients send fields we have no use for (user, metadata, ...)

    model: Text
    max_tokens: int | None = Field(None, ge=1)  # no upper bound: the engine lowers it to its cap
    temperature: Float | None = Field(None, ge=0, le=2)
    top_p: Float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])  # what torch.Generator.manual_seed takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Float = 0.0
    frequency_penalty: Float = 0.0
    logprobs: bool | int | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)

    def sampling(self, max_tokens: int) -> SamplingParams:
        """The engine's parameters; raises `APIError` for options this server does not implement."""
        self._check_supported()
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
            raise APIError(400, f"stop must be up to {MAX_STOP_STRINGS} non-empty strings, got {list(stop)!r}", param="stop")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _check_supported(self) -> None:
        if self.n != 1:
            raise APIError(400, f"n must be 1 on this server (one choice per request), got {self.n}: send n requests", param="n")
        if self.logprobs:
            raise APIError(400, "logprobs are not supported by this server: leave logprobs unset", param="logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported by this server: leave it at 0, got {getattr(self, name)}", param=name)


class CompletionRequest(_GenerationRequest):
    """`POST /v1/completions`: a prompt as text, or as a list of token ids."""

    prompt: Text | list[Text] | list[int]
    max_tokens: int | None = Field(16, ge=1)  # the OpenAI default for completions
    echo: bool = False

    def prompt_text_or_ids(self) -> str | list[int]:
        if self.echo:
            raise APIError(400, "echo is not supported by this server: leave echo unset", param="echo")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise APIError(400, f"send one prompt per request, got a list of {len(self.prompt)}", param="prompt")
            return self.prompt[0]
        return self.prompt


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None

    def for_template(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_GenerationRequest):
    """`POST /v1/chat/completions`: messages rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


class Formatter:
    """Builds response bodies and stream chunks of one request.

    Args:
        kind: "completion" or "chat".
        request_id: the server's id of the request (the response id is derived from it).
        model: the model id echoed back.
    """

    def __init__(self, kind: Literal["completion", "chat"], request_id: str, model: str):
        self.kind, self.model = kind, model
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id}"
        self.created = int(time.time())

    def response(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion", [choice], usage=usage(prompt_tokens, completion_tokens))
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice], usage=usage(prompt_tokens, completion_tokens))

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
        """A stream chunk with new text (`role=True` on the first chat chunk), or the last one with a finish reason."""
        if self.kind == "chat":
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """The extra last chunk sent when `stream_options.include_usage` is set."""
        kind = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return self._envelope(kind, [], usage=usage(prompt_tokens, completion_tokens))

    def _envelope(self, object_type: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": object_type, "created": self.created, "model": self.model, "choices": choices, **extra}
