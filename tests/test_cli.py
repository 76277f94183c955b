"""The `llmslim` command on a tiny model with a character-level tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llmslim.cli import main


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    """The tiny llama (vocab 96) plus a tokenizer with one token per printable ASCII character."""
    from conftest import write_tiny_model

    folder = write_tiny_model(tmp_path_factory.mktemp("cli") / "tiny", "llama")
    vocab = {"<unk>": 0, **{chr(c): c - 31 for c in range(32, 127)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<unk>").save_pretrained(folder)
    return folder


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(b"The quick brown fox jumps over the lazy dog.\r\n" * 40)
    return path


def test_env_lists_versions_and_backends(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    labels = ("torch", "transformers", "bitsandbytes", "4-bit quantize (cpu)", "nf4/fp4 matmul (cpu)", "int8 matmul (cpu)", "default model")
    for label in labels:
        assert label in out


def test_quantize_then_eval_the_saved_model(tiny_with_tokenizer, tmp_path, text_file, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_with_tokenizer), str(out), "--weights", "fp4"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["weights"] == "fp4"
    assert (out / "tokenizer.json").exists()

    assert main(["quantize", str(tiny_with_tokenizer), str(out)]) == 2
    assert "already exists: choose another output folder or pass --overwrite" in capsys.readouterr().err

    assert main(["eval", str(out), "--text", str(text_file), "--tokens", "300", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-2])
    assert result["tokens"] == 300 and result["predicted"] == 299
    assert lines[-1] == f"perplexity: {result['perplexity']:.2f}"


def test_quantize_bnb_format(tiny_with_tokenizer, tmp_path):
    out = tmp_path / "bnb"
    assert main(["quantize", str(tiny_with_tokenizer), str(out), "--weights", "int8", "--format", "bnb"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"


def test_generate_prints_new_text(tiny_with_tokenizer, capsys):
    assert main(["generate", str(tiny_with_tokenizer), "hello", "--weights", "nf4", "--max-new-tokens", "5", "--raw"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_bad_inputs_exit_2_with_the_reason(tiny_with_tokenizer, capsys):
    assert main(["eval", "/no/such/model"]) == 2
    assert "model path '/no/such/model' does not exist" in capsys.readouterr().err
    assert main(["eval", str(tiny_with_tokenizer), "--text", "/no/such.txt"]) == 2
    assert "text file '/no/such.txt' does not exist" in capsys.readouterr().err
    assert main(["generate", "a", "b", "c"]) == 2
    assert "quote the prompt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "src", "out", "--weights", "int3"])


def test_module_entry_point():
    run = subprocess.run([sys.executable, "-m", "llmslim", "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "quantize" in run.stdout
