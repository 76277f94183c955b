"""The server's parts without HTTP: text streaming with stop strings, sampling, bind safety, the CLI, the import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from llmslim.cli import main
from llmslim.serve.sampling import SamplingParams, sample_token
from llmslim.serve.server import check_bind, is_loopback
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


@pytest.mark.parametrize(("field", "value"), [("max_tokens", 0), ("temperature", 3.0), ("top_p", 1.5)])
def test_sampling_params_validate(field, value):
    with pytest.raises(ValueError, match=f"{field} must be"):
        SamplingParams(**({"max_tokens": 1} | {field: value}))


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


def test_import_llmslim_does_not_import_fastapi():
    code = "import sys, llmslim; sys.exit(int(any(m in sys.modules for m in ('fastapi', 'uvicorn', 'llmslim.serve'))))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
