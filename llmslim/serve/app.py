"""The FastAPI application: OpenAI-compatible routes over an `Engine`, plus /health and /metrics.

GET  /health                 liveness (no key needed)
GET  /metrics                Prometheus text format
GET  /v1/models              the one served model
POST /v1/completions         text prompt -> text (stream: server-sent events)
POST /v1/chat/completions    messages -> chat template -> text (stream: server-sent events)
POST /v1/embeddings          texts or token ids -> normalized vectors (an encoder, or a causal LM's last token)

A server for an encoder (no generation engine) answers /v1/embeddings, and 400 to the generation routes.

Every error is an OpenAI-style body `{"error": {...}}`: 400 invalid request, 401 key, 404 model or
route, 413 body over `EngineConfig.max_body_bytes`, 429 queue full, 500 generation failed, 503 engine
stopped. A non-streaming client that disconnects is logged and counted as 499 (as nginx does).
Tokenization and chat templates run in worker threads, so a long prompt never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmslim import __version__
from llmslim.serve.embeddings import MAX_INPUTS, Embedder, causal_embedder, encode_vector
from llmslim.serve.engine import (
    ContextLengthError,
    Engine,
    EngineConfig,
    EngineStoppedError,
    Event,
    QueueFullError,
    RequestHandle,
    TooManyChoicesError,
)
from llmslim.serve.grammar import GrammarError, is_llguidance_available
from llmslim.serve.logprobs import TokenText
from llmslim.serve.metrics import CONTENT_TYPE, Metrics
from llmslim.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    Formatter,
    embedding_response,
    error_body,
)
from llmslim.serve.sampling import SamplingParams
from llmslim.serve.tools import ToolError, ToolOutput, ToolPlan, plan_tools, render_messages, supports_tools

logger = logging.getLogger(__name__)

_DISCONNECT_POLL_S = 0.25
_ECHO_CHARS = 200  # how much of a bad value an error message quotes
_FIELD_NAME = re.compile(r"(?!(str|int|float|bool|list|dict)$)[a-z_][a-z0-9_]*")  # not a union member's tag: "str", "list[int]"
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection before the answer"
_ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings")


@dataclass
class ServerState:
    """What the routes share (`engine` is None on a server for an encoder, which only embeds)."""

    engine: Engine | None
    embedder: Embedder
    tokenizer: object
    model_id: str
    api_key: str | None
    metrics: Metrics
    created: int
    tokens: TokenText


def create_app(
    engine: Engine | None,
    model_id: str,
    api_key: str | None = None,
    embedder: Embedder | None = None,
    tokenizer=None,
    config: EngineConfig | None = None,
) -> FastAPI:
    """An OpenAI-compatible app serving `engine` (or, for an encoder, `embedder` alone) under the name `model_id`.

    Args:
        engine: the generation engine; started when the app starts, stopped when it shuts down. None for
            an encoder, whose server answers only /v1/embeddings.
        model_id: the model name clients must send (`model` field); any other name gets 404.
        api_key: when set, every /v1 route and /metrics need `Authorization: Bearer <api_key>` (else 401).
        embedder: what answers /v1/embeddings; default: the engine's causal LM pooled at its last token.
        tokenizer: the tokenizer of the embedder's inputs; default: the engine's.
        config: limits when there is no engine (its `max_body_bytes` caps request bodies, 413 above); default:
            the engine's config.

    Returns:
        The FastAPI app, to run with uvicorn.
    """
    if engine is None and (embedder is None or tokenizer is None):
        raise ValueError("create_app needs a generation engine, or an embedder and its tokenizer")
    embedder = embedder or causal_embedder(engine)
    tokenizer = tokenizer or engine.tokenizer
    config = engine.config if engine is not None else config or EngineConfig()
    metrics = Metrics(engine)
    state = ServerState(engine, embedder, tokenizer, model_id, api_key or None, metrics, int(time.time()), TokenText(tokenizer))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine is not None:
            engine.start()
        yield
        if engine is not None:
            engine.stop()
        embedder.close()
        logger.info("stopped: every open request has been answered or ended")

    app = FastAPI(title="llmslim", version=__version__, lifespan=lifespan)
    app.state.llmslim = state
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(RequestLog, metrics=metrics)  # added last: the outermost, so it also logs 413s
    _add_error_handlers(app)
    _add_routes(app, state)
    return app


def _add_routes(app: FastAPI, state: ServerState) -> None:
    auth = [Depends(_authorize)]

    @app.get("/health")
    async def health() -> JSONResponse:
        engine = state.engine
        alive = engine.running if engine is not None else state.embedder.running
        body = {"status": "ok" if alive else "engine stopped", "model": state.model_id}
        if engine is not None:
            body |= {"active": engine.active_count, "queued": engine.queue_depth}
        else:
            body |= {"embedding_requests": state.embedder.waiting}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics", dependencies=auth)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=auth)
    async def list_models() -> dict:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def get_model(model_id: str) -> dict:
        _check_model(state, model_id)
        return _model_card(state)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        _check_model(state, body.model)
        _check_generates(state, "/v1/completions")
        params = body.sampling(body.max_tokens or state.engine.config.max_tokens)  # cheap checks before tokenizing
        prompt = body.prompt_text_or_ids()
        _, grammar = await run_in_threadpool(_constraints, state, body)
        ids = prompt if isinstance(prompt, list) else await run_in_threadpool(_prompt_ids, state.engine.tokenizer, prompt)
        return await _generate(request, state, body, ids, replace(params, grammar=grammar), "completion")

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_model(state, body.model)
        _check_generates(state, "/v1/chat/completions")
        params = body.sampling(body.requested_max_tokens or state.engine.config.max_tokens)
        plan, grammar = await run_in_threadpool(_constraints, state, body)
        ids = await run_in_threadpool(_chat_prompt_ids, state.engine.tokenizer, body, plan)
        return await _generate(request, state, body, ids, replace(params, grammar=grammar), "chat", plan)

    @app.post("/v1/embeddings", dependencies=auth)
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        _check_model(state, body.model)
        embedder = state.embedder
        if body.dimensions is not None and body.dimensions != embedder.dimension:
            message = f"this model's embeddings have {embedder.dimension} dimensions and cannot be shortened to {body.dimensions}"
            raise APIError(400, f"{message}: leave dimensions unset", param="dimensions")
        inputs = body.texts_or_ids(MAX_INPUTS)
        rows = inputs if isinstance(inputs[0], list) else await run_in_threadpool(_embedding_ids, state.tokenizer, inputs)
        try:
            embedder.check(rows)
        except ValueError as err:
            raise APIError(400, str(err), param="input") from err
        request.state.prompt_tokens = sum(len(row) for row in rows)
        vectors = await _embed(embedder, rows)
        content = await run_in_threadpool(_embedding_body, vectors, body.encoding_format, state.model_id, request.state.prompt_tokens)
        return Response(content, media_type="application/json")  # serialized off the event loop: thousands of floats per input


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "llmslim"}


async def _authorize(request: Request) -> None:
    key = request.app.state.llmslim.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "invalid or missing API key: send `Authorization: Bearer <key>` with the server's key", code="invalid_api_key")


def _check_model(state: ServerState, model: str) -> None:
    if model != state.model_id:
        raise APIError(
            404, f"the model {model!r} does not exist: this server serves {state.model_id!r}", param="model", code="model_not_found"
        )


def _check_generates(state: ServerState, route: str) -> None:
    if state.engine is None:
        message = (
            f"the model {state.model_id!r} is an encoder: it makes embeddings but cannot generate text, so {route} is not "
            "available on this server; use /v1/embeddings, or serve a causal LM for completions"
        )
        raise APIError(400, message, param="model", code="model_not_supported")


def _embedding_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    try:
        return [list(ids) for ids in tokenizer(texts).input_ids]
    except Exception as err:  # text the tokenizer cannot encode is the request's fault, not the server's
        raise APIError(400, f"the tokenizer could not encode the input: {err}", param="input") from err


def _embedding_body(vectors, encoding_format: str, model_id: str, prompt_tokens: int) -> bytes:
    data = [encode_vector(vector, encoding_format) for vector in vectors]
    return json.dumps(embedding_response(data, model_id, prompt_tokens), separators=(",", ":")).encode()


async def _embed(embedder: Embedder, rows: list[list[int]]):
    try:
        return await embedder.embed(rows)
    except EngineStoppedError as err:
        raise APIError(503, str(err), type="server_error", code="engine_stopped") from err
    except QueueFullError as err:
        raise APIError(429, str(err), type="rate_limit_error", code="queue_full") from err
    except Exception as err:  # this request's forward failed; the model's thread goes on serving the others
        logger.exception("embedding failed")
        raise APIError(500, f"embedding failed: {type(err).__name__}: {err}", type="server_error") from err


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    try:
        return tokenizer(prompt).input_ids
    except Exception as err:  # text the tokenizer cannot encode is the request's fault, not the server's
        raise APIError(400, f"the tokenizer could not encode the prompt: {err}", param="prompt") from err


def _chat_prompt_ids(tokenizer, body: ChatCompletionRequest, plan: ToolPlan | None) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions with a plain prompt", param="messages")
    messages, tools = render_messages(body.messages, plan, native=supports_tools(tokenizer))
    try:
        encoded = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=True)
    except Exception as err:  # the template itself raises on conversations it does not accept
        raise APIError(400, f"the chat template rejected these messages: {err}", param="messages") from err
    return list(encoded["input_ids"])


def _constraints(state: ServerState, body) -> tuple[ToolPlan | None, str | None]:
    """The request's tools and the grammar its output must follow (a forced tool call's, or `response_format`'s), or a 400."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if getattr(body, "tools", None) else None
    choice = getattr(body, "tool_choice", None)
    choice = choice.model_dump() if hasattr(choice, "model_dump") else choice
    schema, field = body.response_format.schema() if body.response_format is not None else (None, "response_format")
    constrained = schema is not None or choice not in (None, "none", "auto")
    if constrained and body.stop:  # a stop string would cut the document short while its finish_reason says "stop"
        message = "stop cannot be combined with response_format or a forced tool_choice: the answer ends when its JSON is complete"
        raise APIError(400, message, param="stop")
    if constrained and not is_llguidance_available():
        message = "structured output and forced tool calls need the llguidance package on the server: pip install 'llmslim[serve]'"
        raise APIError(400, message, param="response_format" if schema is not None else "tool_choice")
    grammars = state.engine.grammars
    try:
        plan = plan_tools(tools, choice, grammars)
    except (ToolError, GrammarError) as err:
        raise APIError(400, str(err), param=getattr(err, "param", "tools")) from err
    if plan is not None and plan.mode == "forced":
        if schema is not None:
            message = "response_format and a forced tool_choice both constrain the answer: send one of them"
            raise APIError(400, message, param="response_format")
        return plan, plan.grammar
    if schema is None:
        return plan, None
    try:
        return plan, grammars.compile_json_schema(schema, field)
    except GrammarError as err:
        raise APIError(400, str(err), param=field) from err


# ----------------------------------------------------------------------------- generation


async def _generate(
    request: Request, state: ServerState, body, prompt_ids: list[int], params: SamplingParams, kind: str, tools: ToolPlan | None = None
):
    """Submit to the engine and answer as one JSON body or as server-sent events."""
    request_id = request.state.request_id
    try:
        handle = state.engine.submit(prompt_ids, params, request_id)
    except EngineStoppedError as err:
        raise APIError(503, str(err), type="server_error", code="engine_stopped") from err
    except ContextLengthError as err:
        raise APIError(400, str(err), param="messages" if kind == "chat" else "prompt", code="context_length_exceeded") from err
    except TooManyChoicesError as err:
        raise APIError(400, str(err), param="n") from err
    except ValueError as err:
        raise APIError(400, str(err), param="prompt") from err
    except QueueFullError as err:
        raise APIError(429, str(err), type="rate_limit_error", code="queue_full") from err
    request.state.prompt_tokens = len(prompt_ids)
    formatter = Formatter(kind, request_id, state.model_id, state.tokens)
    outputs = [ToolOutput(tools) for _ in range(params.n)]
    if body.stream:
        stream = _sse(request, handle, formatter, body.include_usage, outputs)
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return JSONResponse(await _collect(request, handle, formatter, outputs))


async def _collect(request: Request, handle: RequestHandle, formatter: Formatter, outputs: list[ToolOutput]) -> dict:
    """The whole generation as one response body; a client that disconnects cancels it."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
    n = handle.params.n
    texts, logprobs, finals = [[] for _ in range(n)], [[] for _ in range(n)], [None] * n
    reasons, calls = [None] * n, [None] * n
    try:
        async for event in handle.events():
            texts[event.index].append(outputs[event.index].push(event.text))
            logprobs[event.index].extend(event.logprobs)
            if event.finish_reason is not None:
                finals[event.index] = event
                rest, calls[event.index], reasons[event.index] = outputs[event.index].finish(event.finish_reason)
                texts[event.index].append(rest)
    finally:
        watcher.cancel()
        if not handle.finished:
            handle.cancel()
    _record(request, finals)
    failed = next((e for e in finals if e.finish_reason == "error"), None)
    if failed is not None:  # (a failed choice cancels its siblings, so this comes first)
        raise APIError(500, f"generation failed: {failed.error}", type="server_error")
    if any(e.finish_reason == "cancelled" for e in finals):  # else only the disconnect watcher cancels: nobody will read this
        request.state.finish_reason = "disconnected"
        raise APIError(CLIENT_CLOSED, "the client closed the connection before the answer was ready", code="client_closed_request")
    wanted = handle.params.logprobs is not None
    choices = [("".join(t), reason, lp if wanted else None) for t, reason, lp in zip(texts, reasons, logprobs, strict=True)]
    return formatter.response(choices, finals[0].prompt_tokens, sum(e.completion_tokens for e in finals), calls)


async def _sse(
    request: Request, handle: RequestHandle, formatter: Formatter, include_usage: bool, outputs: list[ToolOutput]
) -> AsyncIterator[str]:
    """Server-sent events: chunks of text (and logprobs) per choice, a last chunk per choice with its finish reason, then `[DONE]`."""
    wanted, finals = handle.params.logprobs is not None, []
    try:
        if formatter.kind == "chat":
            for index in range(handle.params.n):
                yield _data(formatter.chunk("", role=True, index=index))
        async for event in handle.events():
            if event.finish_reason in ("error", "cancelled"):
                _record(request, [*finals, event])
                yield _data(error_body(f"generation failed: {event.error or event.finish_reason}", "server_error"))
                break
            output = outputs[event.index]
            text = output.push(event.text)
            if text or (wanted and event.logprobs):
                yield _data(formatter.chunk(text, index=event.index, logprobs=event.logprobs if wanted else None))
            if event.finish_reason is not None:
                finals.append(event)
                rest, calls, reason = output.finish(event.finish_reason)
                if rest or calls:
                    yield _data(formatter.chunk(rest or None, index=event.index, tool_calls=calls))
                yield _data(formatter.chunk(None if formatter.kind == "chat" else "", reason, index=event.index))
        else:
            _record(request, finals)
            if include_usage:
                yield _data(formatter.usage_chunk(finals[0].prompt_tokens, sum(e.completion_tokens for e in finals)))
        yield "data: [DONE]\n\n"
    finally:
        if not handle.finished:  # the client went away (or the server is stopping): free the slot
            handle.cancel()
            request.state.finish_reason = "disconnected"


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _record(request: Request, finals: list[Event | None]) -> None:
    """Put the usage of a finished generation (all its choices) where the request log reads it."""
    finals = [e for e in finals if e is not None]
    if finals:
        request.state.completion_tokens = sum(e.completion_tokens for e in finals)
        request.state.finish_reason = "/".join(dict.fromkeys(e.finish_reason for e in finals))


async def _cancel_on_disconnect(request: Request, handle: RequestHandle) -> None:
    while not handle.finished:
        if await request.is_disconnected():
            handle.cancel()
            return
        await asyncio.sleep(_DISCONNECT_POLL_S)


# ----------------------------------------------------------------------------- errors and the request log


class ErrorResponse(JSONResponse):
    """An error body as ASCII JSON: it may quote request text, and a lone surrogate there must not break the answer."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return ErrorResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        return ErrorResponse(_validation_body(err), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {err.detail}"
        return ErrorResponse(error_body(message, kind), status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:  # a bug: still an OpenAI-style body (logged by uvicorn)
        return ErrorResponse(error_body(f"internal server error: {type(err).__name__}", "server_error"), status_code=500)


def _validation_body(err: RequestValidationError) -> dict:
    errors = err.errors()
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])  # our own checks say the most
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg"))
        return error_body(f"the request body is not valid JSON: {detail}", "invalid_request_error")
    location = [str(part) for part in first.get("loc", ()) if isinstance(part, int) or _FIELD_NAME.fullmatch(part)]
    param = ".".join(location[1:] if location[:1] == ["body"] else location) or None
    got = repr(first.get("input"))
    got = got if len(got) <= _ECHO_CHARS else f"{got[:_ECHO_CHARS]}... ({len(got)} characters)"
    return error_body(f"{param or 'body'}: {first.get('msg')} (got {got})", "invalid_request_error", param)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 before anything parses or tokenizes it.

    A declared Content-Length over the limit is refused unread; otherwise the body is read here (the
    routes read it whole anyway), counted as it arrives (chunked uploads included), and replayed.

    Args:
        app: the wrapped ASGI app.
        max_bytes: the largest body accepted.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        first = await self._read(receive)
        if first is None:
            await self._refuse(scope, receive, send)
            return

        async def replay():
            return first.pop() if first else await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive) -> list[dict] | None:
        """The body as one message (in a list, to be popped once), or None once it grows past the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                return [message]
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return None
            if not message.get("more_body", False):
                return [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

    async def _refuse(self, scope, receive, send) -> None:
        message = (
            f"the request body is larger than this server's limit of {self.max_bytes} bytes: "
            "send a shorter prompt, or start the server with a larger --max-body-bytes"
        )
        body = error_body(message, "invalid_request_error", code="request_too_large")
        await ErrorResponse(body, status_code=413, headers={"connection": "close"})(scope, receive, send)


class RequestLog:
    """ASGI middleware: one log line and one metrics record per HTTP request, when its last byte is sent.

    Args:
        app: the wrapped ASGI app.
        metrics: where requests, tokens and latency are counted.
    """

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]
        request_id = uuid.uuid4().hex[:24]
        state = scope.setdefault("state", {})
        state["request_id"] = request_id

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._log(scope, state, status[0], time.perf_counter() - start)

    def _log(self, scope, state: dict, status: int, latency: float) -> None:
        path = scope["path"]
        endpoint = path if path in _ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        prompt, completion = state.get("prompt_tokens", 0), state.get("completion_tokens", 0)
        self.metrics.record(endpoint, status, latency, prompt, completion)
        level = logging.DEBUG if endpoint in ("/health", "/metrics") and status == 200 else logging.INFO  # probes stay quiet
        logger.log(
            level,
            "%s %s %s %d prompt_tokens=%d completion_tokens=%d latency=%.3fs finish=%s",
            state["request_id"], scope["method"], path, status, prompt, completion, latency, state.get("finish_reason", "-"),
        )  # fmt: skip
