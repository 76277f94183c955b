"""logprobs, n choices and the penalties over real HTTP with the official `openai` client, checked against a
direct forward pass of the same (float32, nf4-quantized) tiny model."""

from __future__ import annotations

import math

import openai
import pytest
import torch
from transformers import AutoTokenizer

import llmslim
from llmslim.serve import EngineConfig
from llmslim.serve.logprobs import TokenText

MODEL_ID = "tiny-llama"
API_KEY = "test-key"
FIXED = {"ignore_eos": True}
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]
PROMPT = "The capital of France is"
TOLERANCE = 5e-4  # float32: the served model decodes with its KV cache, the reference recomputes the whole sequence
# (different GEMM kernels for 1 row and many: 1.4e-4 apart on an AMX Xeon)


def load_float32(folder):
    # the float head: the served steps decode one token at a time, the reference recomputes whole sequences, and the
    # logprobs must agree to float32 rounding (the default int8 decode head would differ by its rounding)
    return llmslim.from_pretrained(folder, llmslim.SlimConfig(weights="nf4", decode_head="float"), dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model):
    return AutoTokenizer.from_pretrained(tiny_chat_model)


@pytest.fixture(scope="module")
def reference(tiny_chat_model):
    """The same quantized weights as the served model, in a second copy that keeps transformers' own attention."""
    return load_float32(tiny_chat_model)


@pytest.fixture(scope="module")
def server(tiny_chat_model, tokenizer, start_server):
    config = EngineConfig(max_batch=8, max_queue=8, max_tokens=64, max_n=4)
    running = start_server(load_float32(tiny_chat_model), tokenizer, MODEL_ID, API_KEY, config)
    yield running
    running.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return server.client(api_key=API_KEY)


def chat_ids(tokenizer) -> list[int]:
    return list(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


@torch.inference_mode()
def reference_decode(model, prompt_ids: list[int], steps: int, penalize=None) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens by full forward passes, and the raw log-softmax at each step; `penalize(logits, ids, out)` picks the token."""
    ids, out, logprobs = list(prompt_ids), [], []
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()  # (vocab,)
        logprobs.append(torch.log_softmax(logits, dim=-1))
        token = int((penalize(logits.clone(), prompt_ids, out) if penalize else logits).argmax())
        ids.append(token)
        out.append(token)
    return out, logprobs


def stream_pieces(chunks, kind: str, n: int = 1) -> tuple[list[str], list[list]]:
    """Per choice: the text and the logprob entries of a stream, concatenated."""
    texts, entries = [""] * n, [[] for _ in range(n)]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += (choice.delta.content if kind == "chat" else choice.text) or ""
            if choice.logprobs is not None:
                entries[choice.index] += choice.logprobs.content if kind == "chat" else list(_completion_entries(choice.logprobs))
    return texts, entries


def _completion_entries(lp):
    return zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset, strict=True)


# ----------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_equal_the_log_softmax_of_a_forward_pass(client, reference, tokenizer, stream):
    steps, top = 8, 5
    args = dict(model=MODEL_ID, messages=MESSAGES, max_tokens=steps, temperature=0, logprobs=True, top_logprobs=top, extra_body=FIXED)
    if stream:
        text, entries = (x[0] for x in stream_pieces(client.chat.completions.create(stream=True, **args), "chat"))
    else:
        result = client.chat.completions.create(**args)
        text, entries = result.choices[0].message.content, result.choices[0].logprobs.content
        assert result.usage.completion_tokens == steps
    tokens, logprobs = reference_decode(reference, chat_ids(tokenizer), steps)
    names = TokenText(tokenizer)
    assert len(entries) == steps
    assert b"".join(bytes(e.bytes) for e in entries).decode() == text  # bytes rebuild the text exactly
    for entry, token, expected in zip(entries, tokens, logprobs, strict=True):
        assert bytes(entry.bytes) == names.bytes(token) and entry.token == names.text(token)
        assert math.isclose(entry.logprob, float(expected[token]), abs_tol=TOLERANCE)
        values, ids = expected.topk(top)
        assert [bytes(t.bytes) for t in entry.top_logprobs] == [names.bytes(i) for i in ids.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=TOLERANCE)


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_in_the_legacy_shape(client, reference, tokenizer, stream):
    steps, top = 6, 3
    args = dict(model=MODEL_ID, prompt=PROMPT, max_tokens=steps, temperature=0, logprobs=top, extra_body=FIXED)
    if stream:
        texts, entries = stream_pieces(client.completions.create(stream=True, **args), "completion")
        text, rows = texts[0], entries[0]
    else:
        choice = client.completions.create(**args).choices[0]
        text, rows = choice.text, list(_completion_entries(choice.logprobs))
    tokens, logprobs = reference_decode(reference, tokenizer(PROMPT).input_ids, steps)
    names = TokenText(tokenizer)
    assert "".join(r[0] for r in rows) == text
    assert [r[3] for r in rows] == [sum(len(r[0]) for r in rows[:i]) for i in range(steps)]  # text_offset
    for (token_text, logprob, top_map, _), token, expected in zip(rows, tokens, logprobs, strict=True):
        assert token_text == names.text(token)
        assert math.isclose(logprob, float(expected[token]), abs_tol=TOLERANCE)
        values, ids = expected.topk(top)
        assert {names.text(i): v for i, v in zip(ids.tolist(), values.tolist(), strict=True)} == pytest.approx(
            {k: v for k, v in top_map.items() if k in {names.text(i) for i in ids.tolist()}}, abs=TOLERANCE
        )
        assert len(top_map) <= top + 1 and top_map[token_text] == pytest.approx(logprob)  # the chosen token is always there


def test_logprobs_are_the_model_s_not_the_sampler_s(client):
    """Penalties and temperature change what is sampled, not the reported distribution: greedy and penalized
    greedy agree on the first token's logprobs (nothing generated yet to penalize)."""
    plain = dict(model=MODEL_ID, messages=MESSAGES, max_tokens=1, logprobs=True, top_logprobs=3, temperature=0)
    first = client.chat.completions.create(**plain).choices[0].logprobs.content[0]
    other = client.chat.completions.create(**plain | {"temperature": 0.5, "seed": 3}, frequency_penalty=1.5).choices[0]
    assert [t.logprob for t in other.logprobs.content[0].top_logprobs] == [t.logprob for t in first.top_logprobs]


# ----------------------------------------------------------------------------- n choices


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_n_greedy_choices_equal_each_other_and_one_choice(server, client, tokenizer, kind, stream):
    common = dict(model=MODEL_ID, max_tokens=10, temperature=0, extra_body=FIXED)
    if kind == "chat":
        create, args = client.chat.completions.create, dict(messages=MESSAGES, **common)
    else:
        create, args = client.completions.create, dict(prompt=PROMPT, **common)
    single = create(**args)
    one = single.choices[0].message.content if kind == "chat" else single.choices[0].text
    prefilled, reused = server.engine.stats.prefill_tokens, server.engine.prefix_cache.stats.hit_tokens
    if stream:
        texts, _ = stream_pieces(create(n=3, stream=True, **args), kind, n=3)
    else:
        result = create(n=3, **args)
        assert [c.index for c in result.choices] == [0, 1, 2]
        assert result.usage.completion_tokens == 30 and result.usage.prompt_tokens == single.usage.prompt_tokens
        texts = [c.message.content if kind == "chat" else c.text for c in result.choices]
    assert texts == [one] * 3
    computed = server.engine.stats.prefill_tokens - prefilled
    assert computed + server.engine.prefix_cache.stats.hit_tokens - reused == single.usage.prompt_tokens  # one prefill for the three
    assert computed >= 1


def test_seeded_n_sampling_is_reproducible_and_the_choices_differ(client):
    args = dict(model=MODEL_ID, prompt=PROMPT, max_tokens=12, temperature=1.0, n=4, seed=1234, extra_body=FIXED)
    first = [c.text for c in client.completions.create(**args).choices]
    assert [c.text for c in client.completions.create(**args).choices] == first
    streamed, _ = stream_pieces(client.completions.create(stream=True, **args), "completion", n=4)
    assert streamed == first
    assert len(set(first)) > 1  # each choice has its own generator
    assert client.completions.create(**args | {"n": 1}).choices[0].text == first[0]  # choice 0 is the n=1 answer


def test_n_choices_carry_their_own_logprobs(client):
    result = client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=5, temperature=1.0, seed=5, n=2, logprobs=True, extra_body=FIXED
    )
    for choice in result.choices:
        assert b"".join(bytes(e.bytes) for e in choice.logprobs.content).decode() == choice.message.content


@pytest.mark.parametrize("n", [5, 100])
def test_n_over_the_server_cap_is_400_naming_n(client, n):
    with pytest.raises(openai.BadRequestError, match="n must be at most 4") as err:
        client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=2, n=n)
    assert err.value.param == "n" and "--max-n" in err.value.message


# ----------------------------------------------------------------------------- penalties


def openai_penalty(presence: float, frequency: float):
    def penalize(logits, prompt_ids, out):
        for token in set(out):
            logits[token] -= out.count(token) * frequency + presence
        return logits

    return penalize


def ctrl_penalty(penalty: float):
    def penalize(logits, prompt_ids, out):
        for token in set(prompt_ids + out):
            logits[token] = logits[token] / penalty if logits[token] > 0 else logits[token] * penalty
        return logits

    return penalize


@pytest.mark.parametrize(
    ("fields", "penalize"),
    [
        ({"frequency_penalty": -2.0}, openai_penalty(0, -2.0)),  # negative: repeats, so the penalty shows in 16 tokens
        ({"presence_penalty": -2.0, "frequency_penalty": -1.0}, openai_penalty(-2.0, -1.0)),
        ({"extra_body": FIXED | {"repetition_penalty": 0.3}}, ctrl_penalty(0.3)),  # below 1: the prompt's tokens come back
    ],
)
def test_penalized_greedy_decoding_follows_the_definition(client, reference, tokenizer, fields, penalize):
    steps = 16
    args = dict(model=MODEL_ID, prompt=PROMPT, max_tokens=steps, temperature=0, extra_body=FIXED) | fields
    text = client.completions.create(**args).choices[0].text
    plain = client.completions.create(**args | {"presence_penalty": 0, "frequency_penalty": 0, "extra_body": FIXED}).choices[0].text
    tokens, _ = reference_decode(reference, tokenizer(PROMPT).input_ids, steps, penalize)
    assert text == tokenizer.decode(tokens, skip_special_tokens=True)
    assert text != plain  # the penalty changed the answer


def test_top_k_1_is_greedy(client):
    args = dict(model=MODEL_ID, prompt=PROMPT, max_tokens=8)
    greedy = client.completions.create(**args, temperature=0, extra_body=FIXED).choices[0].text
    assert client.completions.create(**args, temperature=1.0, seed=9, extra_body=FIXED | {"top_k": 1}).choices[0].text == greedy
    assert client.completions.create(**args, temperature=1.0, seed=9, extra_body=FIXED | {"min_p": 1.0}).choices[0].text == greedy


# ----------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat", {"top_logprobs": 3}, "top_logprobs"),
        ("completion", {"logprobs": 6}, "logprobs"),
        ("completion", {"presence_penalty": 2.5}, "presence_penalty"),
        ("chat", {"frequency_penalty": -3}, "frequency_penalty"),
        ("completion", {"repetition_penalty": 0}, "repetition_penalty"),
        ("completion", {"top_k": -2}, "top_k"),
        ("chat", {"min_p": 1.5}, "min_p"),
        ("completion", {"n": 0}, "n"),
    ],
)
def test_out_of_range_options_are_400_naming_the_field(client, path, fields, param):
    with pytest.raises(openai.BadRequestError) as err:
        if path == "chat":
            client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=2, extra_body=fields)
        else:
            client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=2, extra_body=fields)
    assert err.value.param == param and err.value.type == "invalid_request_error"
