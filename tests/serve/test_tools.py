"""Tool calls the model writes itself (`tool_choice: auto`), and tool conversations in the prompt, over real HTTP.

A random model never writes a tool call, so these tests serve a *scripted* Llama built from a config: each token of
a fixed answer has a one-hot embedding that the output head maps to the token after it (the attention and MLP outputs
are zero; a token that repeats is always followed by the same token), so its greedy continuation of any chat prompt
(which ends in "\\n") is that answer, then end-of-sequence. The server, the chat template and the parsing are the real ones.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llmslim.serve import EngineConfig
from llmslim.serve.tools import CALL_CLOSE, CALL_OPEN, ToolCallStream, find_calls

MODEL_ID = "scripted"
CALL = {"name": "weather", "arguments": {}}
# the script's last block stays open (as when a model stops there): a closing tag repeats "tool", "_", "call", ">",
# and the ">" of the opening tag is followed by "{", so a one-successor script cannot close it. Closed blocks: test_find_calls.
ANSWER = f"Let me check. {CALL_OPEN}" + json.dumps(CALL, separators=(",", ":"))
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}},
    },
}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


def scripted_tokens(tokenizer, after: int, text: str) -> dict[int, int]:
    """Token ids spelling `text` such that each token is always followed by the same token: {token: next token}, from
    `after` (the last prompt token) to end-of-sequence. A depth-first search over the pieces, longest first."""
    pieces: dict[str, list[int]] = {}
    for token in range(len(tokenizer)):
        piece = tokenizer.decode([token])
        if piece and "\ufffd" not in piece and not tokenizer.convert_ids_to_tokens(token).startswith("<|"):
            pieces.setdefault(piece, []).append(token)
    eos = tokenizer.eos_token_id
    following: dict[int, int] = {}

    def spell(at: int, previous: int) -> bool:
        if at == len(text):
            return following.setdefault(previous, eos) == eos
        forced = following.get(previous)
        for end in range(min(len(text), at + 16), at, -1):
            for token in pieces.get(text[at:end], []):
                if token in (eos, after) or (forced is not None and token != forced):
                    continue
                following[previous] = token
                if spell(end, token):
                    return True
                if forced is None:
                    del following[previous]
        return False

    assert spell(0, after), f"no tokens spell {text!r} with one successor each"
    return following


def scripted_llama(tokenizer, after: int, text: str) -> LlamaForCausalLM:
    """A float32 Llama whose greedy continuation of a prompt ending in token `after` is `text`, then end-of-sequence."""
    following = scripted_tokens(tokenizer, after, text)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    assert len(following) <= config.hidden_size
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream carries the token's own embedding to the head
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for slot, (token, successor) in enumerate(following.items()):
            model.model.embed_tokens.weight[token, slot] = 1.0
            model.lm_head.weight[successor, slot] = 10.0
    return model


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model):
    return AutoTokenizer.from_pretrained(tiny_chat_model)


@pytest.fixture(scope="module")
def server(tokenizer, start_server):
    newline = tokenizer("\n").input_ids[-1]  # the last token of every chat prompt (after "<|im_start|>assistant")
    running = start_server(scripted_llama(tokenizer, newline, ANSWER), tokenizer, MODEL_ID, None, EngineConfig(max_tokens=128))
    yield running
    running.stop()


@pytest.fixture
def client(server):
    return server.client(api_key="unused")


def chat(client, **kwargs):
    return client.chat.completions.create(model=MODEL_ID, temperature=0, max_tokens=100, **{"messages": MESSAGES} | kwargs)


def test_the_scripted_model_says_its_script(client):
    """Without tools the call is plain text: the script comes back as content."""
    choice = chat(client).choices[0]
    assert (choice.message.content, choice.finish_reason, choice.message.tool_calls) == (ANSWER, "stop", None)


@pytest.mark.parametrize("stream", [False, True])
def test_auto_finds_the_call_the_model_writes(client, stream):
    if stream:
        text, calls, reasons = "", [], []
        for chunk in chat(client, tools=[WEATHER], stream=True):
            for c in chunk.choices:
                text += c.delta.content or ""
                calls += c.delta.tool_calls or []
                reasons += [c.finish_reason] if c.finish_reason else []
        names, arguments = [c.function.name for c in calls], [json.loads(c.function.arguments) for c in calls]
    else:
        choice = chat(client, tools=[WEATHER]).choices[0]
        text, reasons = choice.message.content, [choice.finish_reason]
        names = [c.function.name for c in choice.message.tool_calls]
        arguments = [json.loads(c.function.arguments) for c in choice.message.tool_calls]
    assert reasons == ["tool_calls"]
    assert text.strip() == "Let me check."  # the text before the call, and none of the call's markup
    assert names == ["weather"] and arguments == [CALL["arguments"]]


def test_none_and_unknown_functions_return_text(client):
    none = chat(client, tools=[WEATHER], tool_choice="none").choices[0]
    assert (none.message.content, none.finish_reason, none.message.tool_calls) == (ANSWER, "stop", None)
    other = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    unknown = chat(client, tools=[other]).choices[0]  # the model calls a function it was not given: that is text
    assert (unknown.message.content, unknown.finish_reason) == (ANSWER, "stop")


def test_a_tool_conversation_round_trips(client, tokenizer):
    """The call comes back in the assistant message with the tool's answer; the template gets both, in the model's format."""
    first = chat(client, tools=[WEATHER])
    call = first.choices[0].message.tool_calls[0]
    follow_up = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"},
    ]
    second = chat(client, tools=[WEATHER], messages=follow_up)
    turns = (
        f"<|im_start|>assistant\n{CALL_OPEN}\n{json.dumps(CALL)}\n{CALL_CLOSE}<|im_end|>\n"
        f"<|im_start|>tool\n<tool_response>\n18 degrees\n</tool_response><|im_end|>\n"
    )
    assert second.usage.prompt_tokens == first.usage.prompt_tokens + len(tokenizer(turns).input_ids)
    assert second.choices[0].finish_reason == "tool_calls"


NATIVE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}"
    "{% if m.tool_call_id %} ID {{ m.tool_call_id }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_renders_tools_gets_them_natively(tokenizer, start_server):
    """A template that takes `tools` renders them itself, and gets calls with their arguments as a mapping."""
    native = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    native.chat_template = NATIVE_TEMPLATE
    server = start_server(scripted_llama(native, native("\n").input_ids[-1], ANSWER), native, MODEL_ID, None, EngineConfig())
    try:
        client = server.client(api_key="unused")
        call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
        messages = MESSAGES + [{"role": "assistant", "tool_calls": [call]}, {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
        result = chat(client, tools=[WEATHER], messages=messages)
        expected = (
            "<|im_start|>system\nTOOLS: weather<|im_end|>\n<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"
            "<|im_start|>assistant\nCALL weather Oslo<|im_end|>\n<|im_start|>tool\n5 ID call_1<|im_end|>\n<|im_start|>assistant\n"
        )
        assert result.usage.prompt_tokens == len(native(expected).input_ids)
        assert result.choices[0].message.tool_calls[0].function.name == "weather"
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("text", "content", "names"),
    [
        (f'{CALL_OPEN}\n{{"name": "f", "arguments": {{}}}}\n{CALL_CLOSE}', "", ["f"]),
        (
            f'hi {CALL_OPEN}{{"name": "f", "arguments": {{"a": 1}}}}{CALL_CLOSE}{CALL_OPEN}{{"name": "g", "arguments": {{}}}}',
            "hi",
            ["f", "g"],
        ),
        (f'{CALL_OPEN}{{"name": "f", "arguments": {{"a": 1}}', f'{CALL_OPEN}{{"name": "f", "arguments": {{"a": 1}}', []),  # cut short
        (f'{CALL_OPEN}{{"name": "h", "arguments": {{}}}}{CALL_CLOSE}', f'{CALL_OPEN}{{"name": "h", "arguments": {{}}}}{CALL_CLOSE}', []),
        ("plain <tool text", "plain <tool text", []),
    ],
)
def test_find_calls(text, content, names):
    found_text, calls = find_calls(text, {"f", "g"})
    assert (found_text, [c["function"]["name"] for c in calls]) == (content, names)


def test_the_stream_holds_back_only_what_may_be_a_call():
    stream = ToolCallStream({"f"})
    sent = [stream.push(piece) for piece in ["Hello <", "too", "l", " world <tool_", 'call>{"name"', ': "f", "arguments": {}}']]
    assert sent == ["Hello ", "", "", "<tool world ", "", ""]
    assert stream.finish()[1][0]["function"]["name"] == "f"
