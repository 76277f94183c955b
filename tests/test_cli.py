"""The `llmslim` command on a tiny model with a character-level tokenizer."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llmslim import cli
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


@pytest.mark.parametrize("weights", ["int8", "nf4", "fp4", "int4"])
def test_every_library_format_is_a_cli_choice(tiny_with_tokenizer, tmp_path, text_file, weights, capsys):
    out = tmp_path / weights
    assert main(["quantize", str(tiny_with_tokenizer), str(out), "--weights", weights]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["weights"] == weights
    assert main(["eval", str(out), "--text", str(text_file), "--tokens", "100"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("perplexity: ")


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


# --- nothing lost, nothing silently wrong (issue 15) ------------------------------------------


@pytest.fixture
def project(tmp_path, tiny_with_tokenizer, monkeypatch):
    """proj/src (the tiny model) beside proj/data/notes.txt, with the working folder at tmp_path."""
    src = tmp_path / "proj" / "src"
    shutil.copytree(tiny_with_tokenizer, src)
    (tmp_path / "proj" / "data").mkdir()
    (tmp_path / "proj" / "data" / "notes.txt").write_text("mine")
    (tmp_path / "link").symlink_to(src)
    monkeypatch.chdir(tmp_path)
    return src


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("out", "problem"),
    [
        ("proj", "contains the input model proj/src: replacing proj would delete it"),
        ("proj/src", r"is the input model \(proj/src\): writing there would replace it"),
        ("link", r"is the input model \(proj/src\): writing there would replace it"),
        ("proj/src/q", "is inside the input model proj/src: writing there would change it"),
    ],
)
def test_quantize_never_writes_over_its_source(project, tmp_path, capsys, out, problem):
    before = snapshot(tmp_path / "proj")
    assert main(["quantize", "proj/src", out, "--overwrite"]) == 2
    err = capsys.readouterr().err
    fix = "choose another output folder, apart from proj/src, such as \\S+/proj/src-slim"
    assert re.fullmatch(f"llmslim quantize: error: the output folder {out} {problem}; {fix}\n", err), err
    assert snapshot(tmp_path / "proj") == before and (tmp_path / "link").resolve() == project


def test_quantize_overwrite_keeps_unrelated_files(project, tmp_path, capsys):
    assert main(["quantize", "proj/src", "proj/data", "--overwrite"]) == 2
    assert (
        "proj/data holds what llmslim's writers do not write (notes.txt), so --overwrite (overwrite=True) does not delete it"
        in capsys.readouterr().err
    )
    assert (tmp_path / "proj" / "data" / "notes.txt").read_text() == "mine"
    assert main(["quantize", "proj/src", "q"]) == 0
    assert main(["quantize", "proj/src", "q", "--overwrite", "--weights", "int8"]) == 0  # a folder llmslim wrote is replaced
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["weights"] == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "proj", "q"]


@pytest.mark.parametrize(
    ("out", "match"),
    [
        ("", r"the output folder is empty \(''\): give a folder name"),
        (".", r"the output folder '\.' names an existing folder .*: give a folder name"),
        ("proj/data/notes.txt/out", r"cannot create the output folder proj/data/notes.txt/out: \S+/notes.txt is a file, not a folder"),
        ("x" * 300, r"File name too long"),  # an OSError: one line too, not a traceback
    ],
)
def test_unusable_out_is_one_line_error(project, tmp_path, capsys, out, match):
    assert main(["quantize", "proj/src", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmslim quantize: error: ") and err.count("\n") == 1 and re.search(match, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "proj"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--include", "nothing_here"],
            "--include nothing_here matched no linear layer; the layers are named like model.layers.0.self_attn.q_proj",
        ),
        (["--exclude", "lm_haed", "*mlp*"], "--exclude lm_haed matched no linear layer"),
        (
            ["--include", "q_proj", "--exclude", "q_proj"],
            "no layer was quantized to nf4: --include q_proj --exclude q_proj leave every linear",
        ),
    ],
)
def test_include_exclude_that_select_nothing_fail(tiny_with_tokenizer, tmp_path, capsys, options, message):
    assert main(["quantize", str(tiny_with_tokenizer), str(tmp_path / "q"), *options]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_model_without_tokenizer(tmp_path, capsys, text_file):
    from conftest import write_tiny_model

    bare = write_tiny_model(tmp_path / "bare", "llama")
    assert main(["quantize", str(bare), str(tmp_path / "q")]) == 0  # quantizing needs no tokenizer
    assert f"note: {bare} has no tokenizer, so none was saved" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert main(["eval", str(tmp_path / "q"), "--text", str(text_file)]) == 2
    assert f"{tmp_path / 'q'} has no tokenizer (none of tokenizer.json, " in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "q"), "hi"]) == 2
    err = capsys.readouterr().err
    assert "and llmslim generate needs one: copy the tokenizer files of the model it was made from into" in err and err.count("\n") == 1


def test_compress_never_writes_over_its_source(project, tmp_path, capsys):
    before = snapshot(tmp_path / "proj")
    assert main(["compress", "proj/src", "--out", "proj", "--overwrite", "--embedding-rank", "8"]) == 2
    assert "error: the --out proj contains the input model proj/src: replacing proj would delete it" in capsys.readouterr().err
    assert snapshot(tmp_path / "proj") == before


# --- one package, one module per verb, dispatched one way (issue 16) ---------------------------


def verb_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def example_argv(example: str) -> list[str]:
    words = shlex.split(example, comments=True)
    prefix = 3 if words[:3] == ["python", "-m", "llmslim"] else 1
    assert words[:prefix] in (["llmslim"], ["python", "-m", "llmslim"]), example
    return words[prefix:]


def test_every_verb_module_is_registered_and_dispatched(monkeypatch):
    modules = {p.stem for p in Path(cli.__file__).parent.glob("*.py") if not p.stem.startswith("_")}
    assert {verb.__name__.rpartition(".")[2] for verb in cli.VERBS} == modules
    assert list(verb_parsers()) == [verb.NAME for verb in cli.VERBS]
    for verb in cli.VERBS:
        calls = []
        monkeypatch.setattr(verb, "run", lambda args, calls=calls: calls.append(args.command) or 0)
        for example in verb.EXAMPLES:
            assert cli.main(example_argv(example)) == 0, example
        assert calls == [verb.NAME] * len(verb.EXAMPLES)


@pytest.mark.parametrize("verb", cli.VERBS, ids=lambda verb: verb.NAME)
def test_every_verb_help_ends_with_real_examples(verb, capsys):
    assert 1 <= len(verb.EXAMPLES) <= 2
    with pytest.raises(SystemExit) as exit_:
        cli.main([verb.NAME, "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.endswith("examples:\n" + "".join(f"  {example}\n" for example in verb.EXAMPLES)), help_text
    for example in verb.EXAMPLES:
        assert example_argv(example)[0] == verb.NAME  # the example runs this verb (parsed in the test above)


def test_scripts_help_ends_with_the_examples(capsys):
    with pytest.raises(SystemExit):
        cli.script_main("finetune", ["--help"])
    assert capsys.readouterr().out.endswith(f"  {cli.finetune.EXAMPLES[-1]}\n")


@pytest.mark.parametrize("name", ["distill", "finetune", "compress"])
def test_block_size_on_a_training_verb_is_a_deprecated_seq_len(name, capsys):
    argv = [name, "--out", "x", "--embedding-rank", "8"] if name == "compress" else [name, "--out", "x"]
    new = cli.build_parser().parse_args([*argv, "--seq-len", "32"])
    assert capsys.readouterr().err == ""
    old = cli.build_parser().parse_args([*argv, "--block-size", "32"])
    assert old.seq_len == new.seq_len == 32 and vars(old) == vars(new)
    err = capsys.readouterr().err
    assert err == f"llmslim {name}: warning: --block-size is deprecated and will be removed in the next release: use --seq-len\n"
    assert cli.build_parser().parse_args(argv).seq_len == 256


def test_quantize_block_size_is_still_the_absmax_block(capsys):
    args = cli.build_parser().parse_args(["quantize", "src", "out", "--block-size", "128"])
    assert args.block_size == 128 and cli.quantize._model.slim_config(args).block_size == 128
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("name", "runner", "extra"),
    [
        ("distill", "llmslim.distill.run.distill", []),
        ("finetune", "llmslim.finetune.run.finetune", []),
        ("compress", "llmslim.distill.heal.compress_model", ["--embedding-rank", "8"]),
    ],
)
@pytest.mark.parametrize("flag", ["--seq-len", "--block-size"])
def test_seq_len_reaches_the_training_config(tmp_path, monkeypatch, name, runner, extra, flag):
    seen = {}

    def record(config, train, **kwargs):
        seen.update(config=config, train=train)
        raise ValueError("recorded")  # stop before anything loads or prints a result

    monkeypatch.setattr(runner, record)
    assert cli.main([name, "--out", str(tmp_path / "out"), flag, "48", "--steps", "3", "--max-grad-norm", "0", *extra]) == 2
    assert seen["config"].block_size == 48 and seen["train"].steps == 3 and seen["train"].max_grad_norm is None


def test_weights_choices_come_from_the_registry():
    from llmslim.quant.registry import weight_choices

    with_weights = set()
    for name, parser in verb_parsers().items():
        for action in parser._actions:
            if any(option.endswith("weights") for option in action.option_strings):
                assert tuple(action.choices) in (weight_choices(), weight_choices(with_none=False)), (name, action.option_strings)
                with_weights.add(name)
    assert with_weights == {"quantize", "eval", "generate", "serve", "distill", "finetune", "merge", "compress", "demo"}


def test_config_from_args_reads_fields_by_name():
    from dataclasses import dataclass

    from llmslim.cli._args import config_from_args

    @dataclass
    class Options:
        rank: int = 16
        alpha: float = 32.0
        exclude: tuple = ("lm_head",)

    args = argparse.Namespace(rank=8, alpha=4.0, exclude=None, unrelated="x")
    assert config_from_args(Options, args) == Options(rank=8, alpha=4.0, exclude=None)
    assert config_from_args(Options, args, ignore=("exclude",), alpha=2.0) == Options(rank=8, alpha=2.0)
    assert config_from_args(Options, argparse.Namespace()) == Options()
    with pytest.raises(TypeError, match="Options has no field ranks"):
        config_from_args(Options, args, ranks=4)


def test_decode_head_flag_picks_the_head(tiny_with_tokenizer, tmp_path):
    # the int8 decode head is the default; --decode-head float keeps the float head, also over a saved model's config
    import argparse

    from torch import nn

    from llmslim.cli._model import add_model_arguments, load
    from llmslim.quant.head import Int8DecodeHead

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)

    def head(*flags, model=tiny_with_tokenizer):
        args = parser.parse_args(list(flags))
        args.command = "generate"
        return type(load(str(model), args)[0].lm_head)

    assert head("--weights", "nf4") is Int8DecodeHead
    assert head("--weights", "nf4", "--decode-head", "float") is nn.Linear
    saved = tmp_path / "saved"
    assert main(["quantize", str(tiny_with_tokenizer), str(saved), "--weights", "int8"]) == 0
    assert head(model=saved) is Int8DecodeHead
    assert head("--decode-head", "float", model=saved) is nn.Linear
