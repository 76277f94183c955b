"""Structured output (`response_format`) and forced tool calls over real HTTP with the official `openai` client: the
answers parse and validate (jsonschema), a cut-short answer says "length", bad schemas are 400s naming the field, and
a constrained row shares the batch without changing the other rows."""

from __future__ import annotations

import json
import threading

import openai
import pytest
import torch
from transformers import AutoTokenizer

import llmslim
from llmslim.serve import EngineConfig
from llmslim.serve.grammar import close_objects

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

MODEL_ID = "tiny-llama"
API_KEY = "test-key"
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": -99, "maximum": 99},
                "b": {"type": "integer", "minimum": -99, "maximum": 99},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}


def person_format(schema=PERSON) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def server(tiny_chat_model, start_server):
    model = llmslim.from_pretrained(tiny_chat_model, llmslim.SlimConfig(weights="nf4"), dtype=torch.float32, progress=False)
    config = EngineConfig(max_batch=8, max_queue=16, max_tokens=160, max_n=4)
    running = start_server(model, AutoTokenizer.from_pretrained(tiny_chat_model), MODEL_ID, API_KEY, config)
    yield running
    running.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return server.client(api_key=API_KEY)


def chat(client, **kwargs):
    return client.chat.completions.create(model=MODEL_ID, messages=kwargs.pop("messages", MESSAGES), **kwargs)


def streamed(chunks) -> tuple[str, list, list[str | None]]:
    """The text, the tool call deltas and the finish reasons of a one-choice chat stream."""
    text, calls, reasons = "", [], []
    for chunk in chunks:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            calls += choice.delta.tool_calls or []
            reasons.append(choice.finish_reason)
    return text, calls, [r for r in reasons if r is not None]


# ----------------------------------------------------------------------------- response_format


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 7, "top_p": 0.95}])
def test_json_schema_answers_parse_and_validate(client, stream, sampling):
    args = dict(max_tokens=160, response_format=person_format(), **sampling)
    if stream:
        text, _, reasons = streamed(chat(client, stream=True, **args))
    else:
        choice = chat(client, **args).choices[0]
        text, reasons = choice.message.content, [choice.finish_reason]
    assert reasons == ["stop"]
    jsonschema.validate(json.loads(text), PERSON)


def test_n_constrained_choices_each_validate(client):
    result = chat(client, n=3, temperature=1.0, seed=11, max_tokens=160, response_format=person_format())
    assert len(result.choices) == 3
    for choice in result.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert len({c.message.content for c in result.choices}) > 1  # sampled, seeded per choice: not three copies


def test_json_object_answers_are_objects(client):
    """json_object: any JSON object. A random model fills it with long strings, so some choices run out of tokens: those
    say "length" (and are not yet JSON), the others parse to an object."""
    result = chat(client, n=4, temperature=1.0, seed=5, max_tokens=120, response_format={"type": "json_object"})
    for choice in result.choices:
        assert choice.message.content.startswith("{")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.finish_reason == "length"
            with pytest.raises(json.JSONDecodeError):
                json.loads(choice.message.content)


def test_response_format_on_completions_too(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}}, "required": ["n"]}
    schema["additionalProperties"] = False
    small = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    choice = client.completions.create(model=MODEL_ID, prompt="JSON:", max_tokens=40, temperature=0, extra_body={"response_format": small})
    assert choice.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(choice.choices[0].text), schema)


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_cut_short_ends_with_length_not_stop(client, stream):
    args = dict(max_tokens=4, temperature=0, response_format=person_format())
    if stream:
        text, _, reasons = streamed(chat(client, stream=True, **args))
    else:
        choice = chat(client, **args).choices[0]
        text, reasons = choice.message.content, [choice.finish_reason]
    assert reasons == ["length"]
    assert text.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.parametrize(
    ("response_format", "param", "match"),
    [
        (person_format({"type": "objekt"}), "response_format.json_schema.schema", "objekt"),
        (person_format({"type": "string", "pattern": "(("}), "response_format.json_schema.schema", "unclosed group"),
        (person_format({"$ref": "#/$defs/missing"}), "response_format.json_schema.schema", "missing"),
        (person_format(["not", "a", "schema"]), "response_format.json_schema.schema", "must be a JSON schema object"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format", "schema is required"),
        ({"type": "yaml"}, "response_format.type", "json_schema"),
    ],
)
def test_schemas_the_engine_rejects_are_400s_naming_the_field(client, response_format, param, match):
    with pytest.raises(openai.BadRequestError, match=match) as caught:
        chat(client, max_tokens=8, response_format=response_format)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param


def test_a_constrained_row_leaves_the_other_rows_of_the_batch_unchanged(client):
    """Free and constrained greedy requests at once give what each gives alone (the mask applies to its own row only)."""
    free = dict(max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    constrained = dict(max_tokens=160, temperature=0, response_format=person_format())
    alone = [chat(client, **free).choices[0].message.content, chat(client, **constrained).choices[0].message.content]
    together: dict[int, str] = {}

    def run(i: int, args: dict) -> None:
        together[i] = chat(client, **args).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i, args)) for i, args in enumerate([free, constrained, free, constrained])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [together[i] for i in range(4)] == alone * 2
    jsonschema.validate(json.loads(alone[1]), PERSON)


# ----------------------------------------------------------------------------- forced tool calls


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_function_is_called_with_arguments_under_its_schema(client, stream):
    args = dict(max_tokens=120, temperature=0, tools=[WEATHER, ADD], tool_choice={"type": "function", "function": {"name": "add"}})
    if stream:
        text, deltas, reasons = streamed(chat(client, stream=True, **args))
        assert text == ""
        calls = [(d.id, d.function.name, d.function.arguments) for d in deltas]
    else:
        choice = chat(client, **args).choices[0]
        reasons = [choice.finish_reason]
        assert choice.message.content is None
        calls = [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert reasons == ["tool_calls"]
    assert len(calls) == 1 and calls[0][0].startswith("call_") and calls[0][1] == "add"
    jsonschema.validate(json.loads(calls[0][2]), ADD["function"]["parameters"])


def test_required_calls_one_of_the_tools(client):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
    names = set()
    for seed in range(4):
        choice = chat(client, max_tokens=120, temperature=1.0, seed=seed, tools=[WEATHER, ADD], tool_choice="required").choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        names.add(call.function.name)
    assert names <= set(schemas)


def test_a_forced_call_cut_short_claims_no_call(client):
    choice = chat(client, max_tokens=3, temperature=0, tools=[WEATHER], tool_choice="required").choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert choice.message.content.startswith('{"')


@pytest.mark.parametrize(
    ("tools", "tool_choice", "param", "match"),
    [
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
            "auto",
            "tools[0].function.parameters",
            "object",
        ),
        ([ADD, {"type": "function", "function": {"name": "g", "parameters": [1]}}], "auto", "tools[1].function.parameters", "object"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "nope"}}}}}],
            "required",
            "tools[0].function.parameters",
            "nope",
        ),  # fmt: skip
        ([ADD], {"type": "function", "function": {"name": "missing"}}, "tool_choice", "missing"),
        (None, "required", "tool_choice", "needs tools"),
        ([ADD, ADD], "auto", "tools", "same name"),
    ],
)
def test_bad_tools_are_400s_naming_the_field(client, tools, tool_choice, param, match):
    extra = {"tools": tools} if tools is not None else {}
    with pytest.raises(openai.BadRequestError, match=match) as caught:
        chat(client, max_tokens=8, tool_choice=tool_choice, **extra)
    assert caught.value.body["param"] == param


def test_response_format_and_a_forced_call_together_are_refused(client):
    with pytest.raises(openai.BadRequestError, match="both constrain") as caught:
        chat(client, max_tokens=8, tools=[ADD], tool_choice="required", response_format={"type": "json_object"})
    assert caught.value.body["param"] == "response_format"


def test_forced_arguments_and_strict_schemas_hold_only_declared_properties(client):
    """A function takes only the arguments it declares, and `strict: true` means what OpenAI means: objects that list
    their properties are closed (the schemas here say nothing about other properties)."""
    declared = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}}
    tool = {"type": "function", "function": {"name": "f", "parameters": declared}}
    strict = {"type": "json_schema", "json_schema": {"name": "a", "schema": declared, "strict": True}}
    for seed in range(3):
        sampled = dict(max_tokens=60, temperature=1.0, seed=seed)
        call = chat(client, tools=[tool], tool_choice="required", **sampled).choices[0].message.tool_calls[0]
        assert set(json.loads(call.function.arguments)) <= {"a"}
        choice = chat(client, response_format=strict, **sampled).choices[0]
        assert choice.finish_reason == "stop" and set(json.loads(choice.message.content)) <= {"a"}


def test_close_objects():
    schema = {
        "type": "object",
        "properties": {
            "x": {"type": "object", "properties": {"y": {"type": "string"}}},
            "z": {"type": "array", "items": {"$ref": "#/$defs/p"}},
        },
        "$defs": {"p": {"type": "object", "properties": {"q": {}}, "additionalProperties": True}},
        "anyOf": [{"properties": {"x": {}}}],
    }
    closed = close_objects(schema)
    assert closed["additionalProperties"] is False and closed["properties"]["x"]["additionalProperties"] is False
    assert closed["$defs"]["p"]["additionalProperties"] is True  # said: kept
    assert closed["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # a copy
    combined = {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}
    assert close_objects(combined) == combined  # closing allOf branches would let nothing through


def test_stop_strings_cannot_cut_a_constrained_answer(client):
    """A stop string could end the document half-written under finish_reason "stop": refused, naming stop."""
    for constraint in ({"response_format": person_format()}, {"tools": [ADD], "tool_choice": "required"}):
        with pytest.raises(openai.BadRequestError, match="stop cannot be combined") as caught:
            chat(client, max_tokens=8, stop=["}"], **constraint)
        assert caught.value.body["param"] == "stop"
