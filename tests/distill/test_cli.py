"""The distill command: `llmslim distill` as llmslim's CLI wires it, and scripts/distill.py's `script_main`."""

from __future__ import annotations

import json
import re

import pytest
from train.tiny import write_causal, write_text

from llmslim.cli import build_parser, distill, script_main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return write_causal(root / "teacher"), write_text(root)


def test_distill_command_prints_eval_perplexity_and_json(inputs, tmp_path, capsys):
    teacher, text = inputs
    argv = ["distill", str(teacher), "--out", str(tmp_path / "s"), "--train", str(text), "--student-layer-map", "0,2"]
    argv += ["--seq-len", "16", "--steps", "2", "--batch-size", "2", "--eval-tokens", "48", "--no-progress", "--json", "--seed", "1"]
    argv += ["--optimizer", "adamw", "--mixed-precision", "no"]
    args = build_parser().parse_args(argv)
    assert args.command == distill.NAME and distill.run(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[0])
    assert summary["layer_map"] == [0, 2] and summary["run_dir"] == str(tmp_path / "s-run")
    assert lines[-1] == f"eval perplexity: {summary['eval_perplexity']:.2f}"
    assert (tmp_path / "s" / "model.safetensors").is_file() and (tmp_path / "s-run" / "log.jsonl").is_file()


def test_script_reports_bad_input_with_exit_code_2(inputs, tmp_path, capsys):
    teacher, text = inputs
    code = script_main("distill", [str(teacher), "--out", str(tmp_path / "s"), "--train", str(text), "--student-layer-map", "0,9"])
    assert code == 2 and "index 9 out of range: the teacher has layers 0..3" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(("out", "match"), [(".", r"the --out '\.' names an existing folder"), ("", r"the --out is empty \(''\)")])
def test_out_that_names_no_new_folder_is_explained(inputs, tmp_path, capsys, monkeypatch, out, match):
    teacher, text = inputs
    monkeypatch.chdir(tmp_path)
    assert script_main("distill", [str(teacher), "--out", out, "--train", str(text)]) == 2
    err = capsys.readouterr().err
    assert re.search(f"^distill: error: {match}.*: give a folder name, such as 'model-nf4'\n$", err), err
