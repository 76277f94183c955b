"""Property-based fuzzing of the request models and the HTTP routes (hypothesis).

Any JSON value in any field of a request gives a 200 or an OpenAI-style 4xx, never a 500, and the
engine keeps serving. Text includes lone surrogates, numbers include NaN, infinities and integers past
64 bits. The example counts are bounded so the file runs in seconds.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from llmslim.serve import EngineConfig
from llmslim.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest

MODEL_ID = "tiny-llama"
API_KEY = "test-key"
HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 2}
COMMON_FIELDS = [
    "model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
    "presence_penalty", "frequency_penalty", "logprobs", "ignore_eos", "user", "repetition_penalty", "top_k", "min_p",
]  # fmt: skip
CHAT_FIELDS = [*COMMON_FIELDS, "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice"]
COMPLETION_FIELDS = [*COMMON_FIELDS, "prompt", "echo", "response_format"]

SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]
# not st.text: it never generates surrogates, and a lone surrogate is exactly what used to give a 500
text = st.lists(st.characters() | st.sampled_from([*SURROGATES, "\x00", "\ufffd", "\u2028"]), max_size=12).map("".join)
SEED_EDGES = [2**64, 2**64 - 1, 2**65, -(2**63), -(2**63) - 1, 2**63]  # 2**64 used to kill the engine thread
TINY_FLOATS = [1e-45, 5e-324, 1e-300, 1e-5]  # temperature 1e-45 used to divide the logits into inf
numbers = (
    st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, -1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**400])
    | st.floats()  # nan and the infinities included: Python's json sends and reads them
    | st.sampled_from([1e-45, 5e-324, 1e-5, 2.0, 2.0000001, 1e308])
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=8,
)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]) | json_values})
    | st.fixed_dictionaries({"role": st.just("user"), "content": json_values | text})
    | st.fixed_dictionaries({"role": st.just("user"), "content": st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}))}),
    max_size=3,
)
SCHEMA_TYPES = ["string", "integer", "number", "boolean", "null", "object", "array", "objekt"]
schemas = st.recursive(  # JSON schemas, right and wrong: what the grammar engine accepts gives 200, the rest 400
    st.fixed_dictionaries(
        {"type": st.sampled_from(SCHEMA_TYPES) | json_values},
        optional={
            "minLength": numbers,
            "maxLength": numbers,
            "pattern": text | st.sampled_from(["((", "[a-", "^\\d{3}$", "(?=x)"]),
            "enum": st.lists(json_values, max_size=3),
            "minimum": numbers,
            "$ref": text | st.just("#/$defs/x"),
        },
    )  # fmt: skip
    | json_values,
    lambda inner: (
        st.fixed_dictionaries(
            {"type": st.just("object"), "properties": st.dictionaries(text, inner, max_size=3)},
            optional={"required": st.lists(text, max_size=2), "additionalProperties": st.booleans() | inner},
        )
        | st.fixed_dictionaries({"type": st.just("array"), "items": inner}, optional={"minItems": numbers, "maxItems": numbers})
        | st.fixed_dictionaries({"anyOf": st.lists(inner, max_size=3)})
    ),
    max_leaves=6,
)
function_names = st.just("f") | text
NEARLY_RIGHT = {  # values of the right type, in and out of range: more requests get past validation
    "model": st.just(MODEL_ID) | text,
    "max_tokens": st.integers(-2, 2**70),
    "max_completion_tokens": st.integers(-2, 2**70),
    "temperature": st.floats(-1, 3) | st.sampled_from([0, 2, *TINY_FLOATS]),
    "top_p": st.floats(-0.5, 1.5) | st.sampled_from([0, 1e-300, 1]),
    "n": st.integers(0, 3),
    "seed": st.integers(-(2**65), 2**65) | st.sampled_from(SEED_EDGES),
    "stop": text | st.lists(text, max_size=5),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "logprobs": st.booleans() | st.none() | st.integers(-1, 21),
    "top_logprobs": st.integers(-1, 21),
    "repetition_penalty": st.floats(-0.5, 3) | st.sampled_from([0, 1e-300, 1]),
    "top_k": st.integers(-3, 60_000),
    "min_p": st.floats(-0.5, 1.5),
    "ignore_eos": st.booleans(),
    "presence_penalty": st.sampled_from([0, 0.0, 0.5, -2, 2.5]),
    "prompt": text | st.lists(st.integers(-5, 60_000), max_size=5) | st.lists(text, max_size=2),
    "messages": messages,
    "echo": st.booleans(),
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema"])})
    | st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries({"name": text, "schema": schemas})}),
    "tools": st.lists(
        st.fixed_dictionaries(
            {"type": st.just("function"), "function": st.fixed_dictionaries({"name": function_names, "parameters": schemas})}
        ),
        max_size=2,
    ),
    "tool_choice": st.sampled_from(["none", "auto", "required"])
    | st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries({"name": function_names})}),
}


KILLERS = [{"seed": 2**64, "temperature": 1.0}, {"temperature": 1e-45}, {"stop": ["\udc00"]}]  # each once broke the server
CHAT_KILLERS = [CHAT | k for k in KILLERS] + [CHAT | {"messages": [{"role": "user", "content": "hi \ud800"}]}]
COMPLETION_KILLERS = [COMPLETION | k for k in KILLERS] + [COMPLETION | {"prompt": "\ud800"}, COMPLETION | {"prompt": ["\udfff"]}]


def with_examples(bodies: list[dict]):
    """Always try `bodies` (the requests that once broke the server) before the generated ones."""

    def decorate(test):
        for body in reversed(bodies):
            test = example(data=body)(test)
        return test

    return decorate


def requests(base: dict, fields: list[str]) -> st.SearchStrategy:
    """`base` with up to three fields set to a nearly right value or to arbitrary JSON."""
    change = st.sampled_from(fields).flatmap(lambda f: st.tuples(st.just(f), NEARLY_RIGHT.get(f, st.nothing()) | json_values))
    return st.lists(change, max_size=3).map(lambda changes: base | dict(changes))


# ----------------------------------------------------------------------------- the request models


def check_model(request_type, data: dict, max_tokens_of, text_of) -> None:
    """Validation either rejects `data` or yields sampling parameters the engine can use; nothing else is raised."""
    try:
        request = request_type.model_validate(data)
        params = request.sampling(max_tokens_of(request) or 16)
        text = text_of(request)
    except (ValidationError, APIError) as err:
        assert not isinstance(err, APIError) or 400 <= err.status < 500
        return
    assert params.seed is None or SEED_RANGE[0] <= params.seed <= SEED_RANGE[1]
    assert math.isfinite(params.temperature) and math.isfinite(params.top_p)
    params.generator()  # a 2**64 seed used to raise here, in the engine thread
    # what reaches the tokenizer is valid Unicode (extra fields such as `user` are ignored, so they may hold anything)
    json.dumps([request.model, params.stop, text], ensure_ascii=False).encode()


@FUZZ
@with_examples(CHAT_KILLERS)
@given(requests(CHAT, CHAT_FIELDS))
def test_chat_request_model_accepts_or_rejects_cleanly(data):
    check_model(ChatCompletionRequest, data, lambda r: r.requested_max_tokens, lambda r: [m.for_template() for m in r.messages])


@FUZZ
@with_examples(COMPLETION_KILLERS)
@given(requests(COMPLETION, COMPLETION_FIELDS))
def test_completion_request_model_accepts_or_rejects_cleanly(data):
    check_model(CompletionRequest, data, lambda r: r.max_tokens, lambda r: r.prompt_text_or_ids())


# ----------------------------------------------------------------------------- the HTTP routes


@pytest.fixture(scope="module")
def server(loaded, start_server):
    """Tiny limits: whatever max_tokens says, a generation is a few steps."""
    model, tokenizer = loaded
    running = start_server(model, tokenizer, MODEL_ID, API_KEY, EngineConfig(max_batch=4, max_queue=8, max_tokens=3))
    yield running
    running.stop()


def check_http(server, path: str, body) -> None:
    response = httpx.post(f"{server.url}{path}", content=json.dumps(body), headers=HEADERS, timeout=60)
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
    if response.status_code != 200:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] != "server_error"
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n") and "server_error" not in response.text
    assert server.engine.running


@FUZZ
@with_examples(CHAT_KILLERS)
@given(requests(CHAT, CHAT_FIELDS))
def test_any_chat_request_is_200_or_a_4xx(server, data):
    check_http(server, "/v1/chat/completions", data)


@FUZZ
@with_examples(COMPLETION_KILLERS)
@given(requests(COMPLETION, COMPLETION_FIELDS))
def test_any_completion_request_is_200_or_a_4xx(server, data):
    check_http(server, "/v1/completions", data)


CONSTRAINT_FIELDS = ("response_format", "tools", "tool_choice")
constraints = st.fixed_dictionaries({}, optional={f: NEARLY_RIGHT[f] | json_values for f in CONSTRAINT_FIELDS})


@FUZZ
@given(constraints, st.booleans())
def test_any_schema_tool_or_tool_choice_is_200_or_a_4xx(server, changes, stream):
    """Structured output and tools: schemas the grammar engine cannot use are 400s, never a 500 or a stalled engine."""
    check_http(server, "/v1/chat/completions", CHAT | changes | {"stream": stream})


EMBEDDING = {"model": MODEL_ID, "input": "Hello"}
EMBEDDING_FIELDS = {
    "model": st.just(MODEL_ID) | text,
    "input": text
    | st.lists(text, max_size=3)
    | st.lists(st.integers(-5, 60_000) | st.sampled_from([2**64, -(2**70)]), max_size=4)
    | st.lists(st.lists(st.integers(-5, 60_000), max_size=3), max_size=3),
    "encoding_format": st.sampled_from(["float", "base64", "int8", ""]),
    "dimensions": st.integers(-2, 100),
}


embedding_change = st.sampled_from(list(EMBEDDING_FIELDS)).flatmap(lambda f: st.tuples(st.just(f), EMBEDDING_FIELDS[f] | json_values))


@FUZZ
@given(st.lists(embedding_change, max_size=3))
def test_any_embedding_request_is_200_or_a_4xx(server, changes):
    check_http(server, "/v1/embeddings", EMBEDDING | dict(changes))


@settings(FUZZ, max_examples=30)
@given(json_values)
def test_any_json_body_is_200_or_a_4xx(server, body):
    check_http(server, "/v1/chat/completions", body)
    check_http(server, "/v1/completions", body)
    check_http(server, "/v1/embeddings", body)


def test_after_the_fuzzing_the_server_still_serves(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    response = httpx.post(f"{server.url}/v1/completions", json=COMPLETION, headers=HEADERS, timeout=60)
    assert response.status_code == 200 and server.engine.active_count == 0
