"""The OpenAI wire format: request models (validated by pydantic), response and chunk bodies, error bodies."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from llmslim.serve.grammar import close_objects
from llmslim.serve.logprobs import TokenLogprob, TokenText, chat_logprobs, completion_logprobs
from llmslim.serve.sampling import MAX_TOP_LOGPROBS, PENALTY_RANGE, SEED_RANGE, SamplingParams

MAX_STOP_STRINGS = 4  # as in the OpenAI API
MAX_COMPLETION_LOGPROBS = 5  # legacy completions' `logprobs`, as in the OpenAI API


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


class JSONSchemaSpec(BaseModel):
    """`response_format.json_schema`: the schema the answer must validate against."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: Text = "response"
    description: Text | None = None
    schema_: object = Field(None, alias="schema")  # any JSON: the grammar engine says what it cannot use
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`response_format`: free text, any JSON object, or JSON valid under a schema (constrained decoding)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None

    def schema(self) -> tuple[dict | None, str]:
        """The JSON schema to enforce (None for free text) and the request field it came from."""
        if self.type == "text":
            return None, "response_format"
        if self.type == "json_object":
            return {"type": "object"}, "response_format"
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise APIError(400, "response_format.json_schema.schema is required with type json_schema", param="response_format")
        schema = close_objects(self.json_schema.schema_) if self.json_schema.strict else self.json_schema.schema_  # OpenAI's strict
        return schema, "response_format.json_schema.schema"


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
    presence_penalty: Float | None = Field(None, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    frequency_penalty: Float | None = Field(None, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    # extensions (vLLM's names and meanings)
    repetition_penalty: Float | None = Field(None, gt=0)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: all tokens
    min_p: Float | None = Field(None, ge=0, le=1)
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)
    response_format: ResponseFormat | None = None

    def sampling(self, max_tokens: int) -> SamplingParams:
        """The engine's parameters; raises `APIError` for options this server does not implement."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
            raise APIError(400, f"stop must be up to {MAX_STOP_STRINGS} non-empty strings, got {list(stop)!r}", param="stop")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
            n=self.n,
            logprobs=self.top_logprob_count(),
        )

    def top_logprob_count(self) -> int | None:
        """None for no logprobs, else the number of alternatives per token."""
        raise NotImplementedError

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationRequest):
    """`POST /v1/completions`: a prompt as text, or as a list of token ids."""

    prompt: Text | list[Text] | list[int]
    max_tokens: int | None = Field(16, ge=1)  # the OpenAI default for completions
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)  # the chosen token's and this many alternatives

    def top_logprob_count(self) -> int | None:
        return self.logprobs

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


class FunctionCall(BaseModel):
    name: Text
    arguments: Text  # a JSON object, as text (the OpenAI wire format)


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # as in the OpenAI API
    description: Text | None = None
    parameters: object = None  # a JSON schema of type object (checked in tools.py, which says what is wrong)
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class FunctionName(BaseModel):
    name: Text


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: Text | None = None  # a tool's answer: to which call

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])

    def for_template(self) -> dict:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text}


class ChatCompletionRequest(_GenerationRequest):
    """`POST /v1/chat/completions`: messages rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def top_logprob_count(self) -> int | None:
        if self.top_logprobs and not self.logprobs:
            message = f"top_logprobs ({self.top_logprobs}) needs logprobs: true; set it, or drop top_logprobs"
            raise APIError(400, message, param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class EmbeddingRequest(BaseModel):
    """`POST /v1/embeddings`: a text, a list of texts, a list of token ids, or a list of such lists."""

    model_config = ConfigDict(extra="allow")

    model: Text
    input: Text | list[Text] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    def texts_or_ids(self, max_inputs: int) -> list[str] | list[list[int]]:
        """The inputs as a list of texts or of token-id lists; an empty input (or too many) is an `APIError`."""
        inputs = self.input
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not inputs or inputs == [""]:
            raise APIError(400, "input must not be empty: give a text, a list of texts or a list of token ids", param="input")
        if len(inputs) > max_inputs:
            raise APIError(400, f"input holds {len(inputs)} items, more than this server's {max_inputs}: split the request", param="input")
        empty = next((i for i, item in enumerate(inputs) if not item), None)
        if empty is not None:
            raise APIError(400, f"input {empty} is empty: every input needs at least one character or token", param="input")
        return list(inputs)


def embedding_response(vectors: list, model: str, prompt_tokens: int) -> dict:
    """The body of `/v1/embeddings`: one `{"object": "embedding", "index", "embedding"}` per input, and the usage."""
    data = [{"object": "embedding", "index": i, "embedding": vector} for i, vector in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def _message(text: str, tool_calls: list[dict] | None) -> dict:
    if not tool_calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": text or None, "tool_calls": tool_calls}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


class Formatter:
    """Builds response bodies and stream chunks of one request.

    Args:
        kind: "completion" or "chat".
        request_id: the server's id of the request (the response id is derived from it).
        model: the model id echoed back.
        tokens: token strings and bytes, for logprobs (needed only when the request asks for them).
    """

    def __init__(self, kind: Literal["completion", "chat"], request_id: str, model: str, tokens: TokenText | None = None):
        self.kind, self.model, self.tokens = kind, model, tokens
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id}"
        self.created = int(time.time())
        self._offsets: dict[int, int] = {}  # per choice: where the next token starts in its text (completion logprobs)

    def response(
        self,
        choices: list[tuple[str, str, list[TokenLogprob] | None]],
        prompt_tokens: int,
        completion_tokens: int,
        tool_calls: list[list[dict] | None] | None = None,
    ) -> dict:
        """The whole answer; `choices[i]` is choice i's (text, finish_reason, logprobs or None when not asked for), `tool_calls[i]`
        its tool calls (OpenAI's `message.tool_calls` entries) or None."""
        bodies = []
        tool_calls = tool_calls or [None] * len(choices)
        for index, ((text, finish_reason, logprobs), calls) in enumerate(zip(choices, tool_calls, strict=True)):
            content = {"message": _message(text, calls)} if self.kind == "chat" else {"text": text}
            bodies.append({"index": index} | content | {"logprobs": self.logprobs(index, logprobs), "finish_reason": finish_reason})
        kind = "chat.completion" if self.kind == "chat" else "text_completion"
        return self._envelope(kind, bodies, usage=usage(prompt_tokens, completion_tokens))

    def chunk(
        self,
        text: str | None,
        finish_reason: str | None = None,
        role: bool = False,
        index: int = 0,
        logprobs: list | None = None,
        tool_calls: list[dict] | None = None,
    ) -> dict:
        """A stream chunk of choice `index` with new text (`role=True` on the first chat chunk) or tool calls (whole, each with
        its `index`), or its last one with a finish reason."""
        lp = self.logprobs(index, logprobs) if logprobs else None
        if self.kind == "chat":
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            if tool_calls:
                delta["tool_calls"] = [{"index": i} | call for i, call in enumerate(tool_calls)]
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """The extra last chunk sent when `stream_options.include_usage` is set."""
        kind = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return self._envelope(kind, [], usage=usage(prompt_tokens, completion_tokens))

    def logprobs(self, index: int, entries: list[TokenLogprob] | None) -> dict | None:
        """`choices[index].logprobs` for `entries` (the next tokens of that choice), or None."""
        if entries is None:
            return None
        if self.kind == "chat":
            return chat_logprobs(entries, self.tokens)
        body = completion_logprobs(entries, self.tokens, self._offsets.get(index, 0))
        self._offsets[index] = self._offsets.get(index, 0) + sum(len(token) for token in body["tokens"])
        return body

    def _envelope(self, object_type: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": object_type, "created": self.created, "model": self.model, "choices": choices, **extra}
