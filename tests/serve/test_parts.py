"""The server's parts without HTTP: text streaming with stop strings, sampling, bind safety, the CLI, the import."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmslim.cli import main
from llmslim.serve.sampling import MIN_TEMPERATURE, SamplingParams, sample_token
from llmslim.serve.server import check_bind, free_port, is_loopback
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


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", 0), ("temperature", 3.0), ("temperature", float("nan")), ("top_p", 1.5), ("seed", 2**64), ("seed", -(2**63) - 1)],
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


def test_cli_serve_passes_the_body_limit_to_the_server(monkeypatch):
    served = {}
    monkeypatch.setattr("llmslim.cli._model.load", lambda model, args: ("model", "tokenizer", Path("tiny")))
    monkeypatch.setattr("llmslim.serve.server.serve", lambda *args: served.update(config=args[-1]))
    assert main(["serve", "--port", str(free_port()), "--max-body-bytes", "1000"]) == 0
    assert served["config"].max_body_bytes == 1000


def test_cli_serve_rejects_a_bad_body_limit_before_loading(capsys, no_model_load):
    assert main(["serve", "--port", str(free_port()), "--max-body-bytes", "0"]) == 2
    assert "max_body_bytes must be at least 1, got 0" in capsys.readouterr().err


def test_import_llmslim_does_not_import_fastapi():
    code = "import sys, llmslim; sys.exit(int(any(m in sys.modules for m in ('fastapi', 'uvicorn', 'llmslim.serve'))))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
