"""The server's parts without HTTP: text streaming with stop strings, sampling, bind safety, the CLI, the import."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmslim.cli import main
from llmslim.serve.kvcache import SequenceKV
from llmslim.serve.logprobs import TokenText, token_logprob
from llmslim.serve.sampling import MIN_TEMPERATURE, SamplingParams, apply_penalties, sample_token
from llmslim.serve.server import check_bind, compute_threads, free_port, is_loopback
from llmslim.serve.textstream import TextStream


class CharTokenizer:
    """One token per character; token 0 decodes to nothing (a special token)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i)


def run_stream(text: str, stop: tuple[str, ...]) -> tuple[list[str], bool]:
    stream, pieces = TextStream(CharTokenizer(), stop), []
    for char in text:
        delta = stream.push(ord(char))
        pieces.append(delta.text)
        if delta.stopped:
            return pieces, True
    pieces.append(stream.finish().text)
    return pieces, False


def test_stop_string_is_never_emitted_even_partly():
    pieces, stopped = run_stream("hello world, goodbye", ("wor", "bye"))
    assert stopped and "".join(pieces) == "hello "
    assert pieces[-4:] == [" ", "", "", ""]  # "w", "wo" held back as a possible start of "wor", then the stop


def test_held_back_text_is_flushed_when_no_stop_follows():
    pieces, stopped = run_stream("a wo!", ("wor",))
    assert not stopped and "".join(pieces) == "a wo!"


def test_earliest_stop_wins():
    assert run_stream("abcdef", ("def", "cd")) == (["a", "b", "", ""], True)


def test_incomplete_characters_wait_for_the_next_token():
    class ByteTokenizer:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(ByteTokenizer())
    first, second = "é".encode()
    assert stream.push(first).text == ""
    assert stream.push(second).text == "é"


def test_greedy_and_seeded_sampling():
    logits = torch.tensor([0.1, 2.0, 0.3, 1.9])
    assert sample_token(logits, SamplingParams(max_tokens=1, temperature=0), torch.Generator()) == 1
    params = SamplingParams(max_tokens=1, temperature=1.0, seed=7)
    draws = [[sample_token(logits, params, g) for _ in range(20)] for g in (params.generator(), params.generator())]
    assert draws[0] == draws[1]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([5.0, 4.9, -5.0, -5.0])
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5, seed=0)
    generator = params.generator()
    assert {sample_token(logits, params, generator) for _ in range(50)} == {0}  # token 0 alone holds > 0.5


def test_presence_and_frequency_penalties_by_hand():
    logits = torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0])
    params = SamplingParams(max_tokens=1, presence_penalty=0.5, frequency_penalty=0.25)
    # token 1 generated twice, token 2 once; token 3 is only in the prompt, which these penalties ignore
    out = apply_penalties(logits, params, prompt_ids=[3, 3], output_ids=[1, 2, 1])
    assert out.tolist() == [1.0, 2.0 - 2 * 0.25 - 0.5, -1.0 - 0.25 - 0.5, 0.5, 3.0]
    assert logits.tolist() == [1.0, 2.0, -1.0, 0.5, 3.0]  # the input is left alone


def test_repetition_penalty_by_hand_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0])
    out = apply_penalties(logits, SamplingParams(max_tokens=1, repetition_penalty=2.0), prompt_ids=[3, 2], output_ids=[1, 1])
    assert out.tolist() == [1.0, 1.0, -2.0, 0.25, 3.0]  # once per token, however often it occurs


def test_no_penalty_returns_the_logits_unchanged():
    logits = torch.tensor([1.0, 2.0])
    assert apply_penalties(logits, SamplingParams(max_tokens=1), [0], [1, 1]) is logits


def test_top_k_and_min_p_restrict_sampling():
    logits = torch.tensor([2.0, 1.9, 1.8, -9.0, 0.0])
    top2 = SamplingParams(max_tokens=1, temperature=2.0, top_k=2, seed=0)
    generator = top2.generator()
    assert {sample_token(logits, top2, generator) for _ in range(200)} == {0, 1}
    min_p = SamplingParams(max_tokens=1, temperature=1.0, min_p=0.5, seed=0)  # keeps p >= half of p(token 0)
    generator = min_p.generator()
    assert {sample_token(logits, min_p, generator) for _ in range(200)} == {0, 1, 2}


def test_choice_generators_are_seeded_apart_and_choice_0_is_the_request_s():
    params = SamplingParams(max_tokens=1, seed=2**64 - 1)
    draws = [torch.rand(4, generator=params.choice_generator(i)).tolist() for i in range(3)]
    assert draws[0] == torch.rand(4, generator=params.generator()).tolist()
    assert len({tuple(d) for d in draws}) == 3
    assert draws == [torch.rand(4, generator=params.choice_generator(i)).tolist() for i in range(3)]


def test_token_logprob_is_the_log_softmax_with_its_top_alternatives():
    logits = torch.tensor([0.0, 1.0, 3.0, 2.0])
    entry = token_logprob(logits, 1, top=2)
    expected = torch.log_softmax(logits, dim=-1)
    assert entry.token == 1 and entry.logprob == pytest.approx(float(expected[1]))
    assert [i for i, _ in entry.top] == [2, 3] and [v for _, v in entry.top] == pytest.approx(expected[[2, 3]].tolist())
    assert token_logprob(torch.tensor([0.0, -1e30]), 1, top=0).logprob == -9999.0  # JSON has no -inf


def test_token_text_gives_exact_bytes_of_byte_level_tokens():
    from transformers import AutoTokenizer

    from llmslim import models

    tokenizer = AutoTokenizer.from_pretrained(models.resolve(None))
    names, text = TokenText(tokenizer), "héllo 日本\n"
    ids = tokenizer(text).input_ids
    assert b"".join(names.bytes(i) for i in ids).decode() == text
    assert any(names.text(i) == "\ufffd" for i in ids)  # a token holding part of a character
    assert names.text(tokenizer.eos_token_id) == tokenizer.eos_token


def test_token_text_gives_exact_bytes_of_sentencepiece_byte_fallback_tokens():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<0x0A>": 1, "<0xC3>": 2, "<0xA9>": 3, "\u2581hi": 4}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    names = TokenText(PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>"))
    assert [names.bytes(i) for i in (4, 2, 3, 1)] == [b" hi", b"\xc3", b"\xa9", b"\n"]
    assert names.text(2) == "\ufffd" and b"".join(names.bytes(i) for i in (4, 2, 3)).decode() == " hié"


def test_kv_copy_is_independent():
    kv = SequenceKV(1)
    kv.append(0, torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
    twin = kv.copy()
    twin.append(0, torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    assert (kv.length, twin.length) == (3, 4)
    keys, _ = kv.append(0, torch.full((1, 2, 1, 4), 5.0), torch.full((1, 2, 1, 4), 5.0))
    assert keys[0, 0, :, 0].tolist() == [1, 1, 1, 5]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("temperature", 3.0),
        ("temperature", float("nan")),
        ("top_p", 1.5),
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("top_k", -2),
        ("min_p", 1.1),
        ("presence_penalty", 2.1),
        ("frequency_penalty", -2.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", float("inf")),
        ("n", 0),
        ("logprobs", 21),
    ],
)
def test_sampling_params_validate(field, value):
    with pytest.raises(ValueError, match=f"{field} must be"):
        SamplingParams(**({"max_tokens": 1} | {field: value}))


def test_tiny_temperatures_sample_greedily_and_nothing_overflows():
    logits = torch.tensor([0.1, 2.0, 0.3, 1.9])
    for temperature in (1e-45, 5e-324, MIN_TEMPERATURE / 2):
        params = SamplingParams(max_tokens=1, temperature=temperature, seed=0)
        assert params.greedy and sample_token(logits, params, params.generator()) == 1
    params = SamplingParams(max_tokens=1, temperature=MIN_TEMPERATURE, seed=0)
    assert not params.greedy
    assert sample_token(torch.tensor([3e38, 0.0, -3e38]), params, params.generator()) == 0  # 3e38 / 1e-5 would be inf


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63)])
def test_seeds_at_the_64_bit_limits_make_generators(seed):
    SamplingParams(max_tokens=1, seed=seed).generator()


def test_non_loopback_bind_needs_a_key_or_insecure():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    with pytest.raises(ValueError, match="refusing to bind '0.0.0.0' without an API key"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "key")
    check_bind("0.0.0.0", None, insecure=True)
    check_bind("127.0.0.1", None)


def test_cli_serve_refuses_public_bind_before_loading(capsys, monkeypatch):
    monkeypatch.delenv("LLMSLIM_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("llmslim.cli._model.load", refuse)


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_cli_serve_checks_the_port_range_before_loading(capsys, no_model_load, port):
    assert main(["serve", "--port", port]) == 2
    assert f"port must be between 1 and 65535, got {port}" in capsys.readouterr().err


def test_cli_serve_refuses_a_port_in_use_before_loading(capsys, no_model_load):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    out = capsys.readouterr()
    assert f"port {port} on 127.0.0.1 is already in use" in out.err and "another --port" in out.err
    assert "serving" not in out.out


def run_serve(monkeypatch, *flags: str) -> dict:
    """`llmslim serve FLAGS` with the model load and the server stubbed: what reached `serve` (its config and threads)."""
    served = {}
    monkeypatch.setattr("llmslim.cli._model.load", lambda model, args: ("model", "tokenizer", Path("tiny")))
    monkeypatch.setattr("llmslim.serve.server.serve", lambda *args, threads: served.update(config=args[6], threads=threads))
    assert main(["serve", "--port", str(free_port()), *flags]) == 0
    return served


def test_cli_serve_passes_the_body_limit_to_the_server(monkeypatch):
    served = run_serve(monkeypatch, "--max-body-bytes", "1000")
    assert served["config"].max_body_bytes == 1000


def test_cli_serve_passes_the_choice_cap_to_the_server(monkeypatch):
    served = run_serve(monkeypatch, "--max-n", "3")
    assert served["config"].max_n == 3


def test_cli_serve_rejects_a_bad_choice_cap_before_loading(capsys, no_model_load):
    assert main(["serve", "--port", str(free_port()), "--max-n", "0"]) == 2
    assert "max_n must be at least 1, got 0" in capsys.readouterr().err


def test_cli_serve_rejects_a_bad_body_limit_before_loading(capsys, no_model_load):
    assert main(["serve", "--port", str(free_port()), "--max-body-bytes", "0"]) == 2
    assert "max_body_bytes must be at least 1, got 0" in capsys.readouterr().err


def test_import_llmslim_does_not_import_fastapi():
    code = "import sys, llmslim; sys.exit(int(any(m in sys.modules for m in ('fastapi', 'uvicorn', 'llmslim.serve'))))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_cli_serve_passes_the_prefix_cache_size_to_the_server(monkeypatch):
    served = run_serve(monkeypatch, "--prefix-cache-mib", "0")
    assert served["config"].prefix_cache_mib == 0


def test_cli_serve_rejects_a_negative_prefix_cache_before_loading(capsys, no_model_load):
    assert main(["serve", "--port", str(free_port()), "--prefix-cache-mib", "-1"]) == 2
    assert "prefix_cache_mib must be 0 (off) or more, got -1.0" in capsys.readouterr().err


def test_cli_serve_passes_the_thread_count_to_the_server(monkeypatch):
    served = run_serve(monkeypatch, "--threads", "3")
    assert served["threads"] == 3


def test_cli_serve_rejects_a_bad_thread_count_before_loading(capsys, no_model_load):
    assert main(["serve", "--port", str(free_port()), "--threads", "0"]) == 2
    assert "threads must be a whole number >= 1, got 0" in capsys.readouterr().err


def test_compute_threads_leave_a_core_to_the_http_side_unless_told(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert compute_threads() == 7 and compute_threads(8) == 8
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert compute_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert compute_threads() == 4  # the user's own setting stands
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads must be a whole number >= 1"):
            compute_threads(bad)


def test_cli_serve_passes_the_prefill_chunk_to_the_server(monkeypatch):
    assert run_serve(monkeypatch, "--prefill-chunk", "0")["config"].prefill_chunk == 0


def test_cli_serve_rejects_a_negative_prefill_chunk_before_loading(capsys, no_model_load):
    assert main(["serve", "--port", str(free_port()), "--prefill-chunk", "-1"]) == 2
    assert "prefill_chunk must be a whole number of tokens >= 0 (0: whole prompts), got -1" in capsys.readouterr().err
