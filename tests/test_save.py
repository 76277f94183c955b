"""Saving: atomic folders, refusing to overwrite, and the bitsandbytes export read by stock transformers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import llmslim
from llmslim import SlimConfig
from llmslim.save import atomic_directory


@pytest.fixture
def nf4_model(tiny_llama):
    return llmslim.from_pretrained(tiny_llama, SlimConfig(weights="nf4"), progress=False)


def test_existing_output_is_refused_without_overwrite(nf4_model, tmp_path):
    out = tmp_path / "out"
    llmslim.save_pretrained(nf4_model, out)
    (out / "model.safetensors").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="already exists: choose another output folder or pass --overwrite"):
        llmslim.save_pretrained(nf4_model, out)
    assert (out / "model.safetensors").read_bytes() == b"old"
    llmslim.save_pretrained(nf4_model, out, overwrite=True)  # a model folder as llmslim writes them is replaced
    assert (out / "model.safetensors").read_bytes() != b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside it


LINK = object()


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"config.json": "{}", "data/notes.txt": "mine"}, r"do not write \(data/\)"),
        ({"config.json": "{}", "notes.txt": "mine"}, r"do not write \(notes.txt\)"),
        ({"config.json": "{}", "model.safetensors": "", "weights.bin": "mine"}, r"do not write \(weights.bin\)"),
        ({"config.json": "{}", "README.md": "mine"}, r"do not write \(README.md\)"),  # peft's README.md only beside an adapter
        ({"config.json": LINK}, r"do not write \(config.json \(a link\)\)"),
        (
            {"tokenizer.json": "mine"},
            r"is not a model folder \(no config.json, adapter_config.json or trainer_state.json; it holds tokenizer.json\)",
        ),
    ],
)
def test_overwrite_keeps_a_folder_llmslim_did_not_write(nf4_model, tmp_path, files, match):
    out = tmp_path / "out"
    for name, content in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        if content is LINK:
            (tmp_path / "elsewhere.json").write_text("{}")
            (out / name).symlink_to(tmp_path / "elsewhere.json")
        else:
            (out / name).write_text(content)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with pytest.raises(ValueError, match=match + r".*so --overwrite \(overwrite=True\) does not delete it: move those elsewhere"):
        llmslim.save_pretrained(nf4_model, out, overwrite=True)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_overwrite_keeps_a_file_or_a_link(nf4_model, tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match="is a file, not a model folder, so --overwrite .* does not delete it"):
        llmslim.save_pretrained(nf4_model, tmp_path / "file", overwrite=True)
    assert (tmp_path / "file").read_text() == "mine"
    llmslim.save_pretrained(nf4_model, tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ValueError, match="link is a link to .*real, so --overwrite .* does not delete it: remove the link"):
        llmslim.save_pretrained(nf4_model, tmp_path / "link", overwrite=True)


@pytest.mark.parametrize("where", ["same", "parent", "inside", "link"])
def test_output_overlapping_the_source_model_is_refused(tmp_path, where):
    from conftest import write_tiny_model

    src = write_tiny_model(tmp_path / "proj" / "src", "llama")
    (tmp_path / "proj" / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    model = llmslim.from_pretrained(src, SlimConfig(weights="nf4"), progress=False)
    if where == "link":
        (tmp_path / "link").symlink_to(src)
    out = {"same": src, "parent": tmp_path / "proj", "inside": src / "q", "link": tmp_path / "link"}[where]
    relation = {"same": "is the", "parent": "contains the", "inside": "is inside the", "link": "is the"}[where]
    with pytest.raises(
        ValueError, match=f"the output folder {out} {relation} model folder it was loaded from .*choose another output folder"
    ):
        llmslim.save_pretrained(model, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    assert (tmp_path / "proj" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("out", "match"),
    [
        ("", r"the output folder is empty \(''\): give a folder name"),
        (".", r"the output folder '\.' names an existing folder .* give a folder name"),
        ("..", r"the output folder '\.\.' names an existing folder"),
        ("file/out", r"cannot create the output folder file/out: \S+/file is a file, not a folder"),
        ("file/a/b", r"cannot create the output folder file/a/b: \S+/file is a file, not a folder"),
    ],
)
def test_unusable_output_names_are_explained(nf4_model, tmp_path, monkeypatch, out, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match=match):
        llmslim.save_pretrained(nf4_model, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_dead_writers_are_removed_and_nothing_else(nf4_model, tmp_path):
    import socket

    host, dead = socket.gethostname(), _dead_pid()
    out = tmp_path / "out"
    llmslim.save_pretrained(nf4_model, out)
    leftovers = [f".out.tmp-{host}-{dead}-abcd_123", f".out.old-{host}-{dead}-0123abcd"]
    kept = [
        f".out.tmp-{host}-{os.getpid()}-abcd_123",
        f".out.tmp-otherhost-{dead}-abcd_123",
        ".out.tmp-abcd_123",
        ".other.tmp-x",
        "out.bak",
    ]
    for name in leftovers + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    llmslim.save_pretrained(nf4_model, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *kept])


def test_an_old_output_moved_aside_by_a_killed_writer_is_put_back(nf4_model, tmp_path):
    import socket

    aside = tmp_path / f".out.old-{socket.gethostname()}-{_dead_pid()}-0123abcd"
    llmslim.save_pretrained(nf4_model, aside)  # as a writer killed between its two renames leaves it
    with pytest.raises(FileExistsError, match="already exists"):
        llmslim.save_pretrained(nf4_model, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (tmp_path / "out" / "config.json").is_file()


def test_files_put_into_the_output_while_writing_are_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"do not write \(notes.txt\).*; what llmslim wrote is in \S+/out.new-\w{8}"):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "config.json").write_text('{"new": 1}')
            (out / "notes.txt").write_text("mine")  # someone else writes there meanwhile
    assert (out / "notes.txt").read_text() == "mine" and (out / "config.json").read_text() == "{}"
    (new,) = tmp_path.glob("out.new-*")
    assert (new / "config.json").read_text() == '{"new": 1}'


def test_failed_save_leaves_nothing_behind(nf4_model, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(nf4_model), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        llmslim.save_pretrained(nf4_model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_is_refused(nf4_model, tmp_path):
    with pytest.raises(ValueError, match="format must be one of \\['llmslim', 'bnb'\\], got 'gguf'"):
        llmslim.save_pretrained(nf4_model, tmp_path / "out", format="gguf")


def test_bnb_export_of_unquantized_model_is_refused(tiny_llama, tmp_path):
    model = llmslim.from_pretrained(tiny_llama, SlimConfig(weights=None), progress=False)
    with pytest.raises(ValueError, match="no llmslim quantized layers"):
        llmslim.save_pretrained(model, tmp_path / "out", format="bnb")


def test_bnb_export_of_a_mixed_4bit_int8_model_is_refused(tiny_llama, tmp_path):
    config = SlimConfig(weights="nf4", int8_layers=["model.layers.0.mlp.down_proj"])
    model = llmslim.from_pretrained(tiny_llama, config, progress=False)
    with pytest.raises(ValueError, match=r"one format per model, and model.layers.0.mlp.down_proj of this nf4 model are int8"):
        llmslim.save_pretrained(model, tmp_path / "out", format="bnb")
    assert not (tmp_path / "out").exists()


_STOCK_LOAD = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    assert "llmslim" not in sys.modules, "the export must load without llmslim"
    layer = model.model.layers[0].self_attn.q_proj
    print(type(layer).__module__, type(layer).__name__)
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight
    torch.save(dequantize_bnb_weight(layer.weight, getattr(layer, "state", None)), sys.argv[3] + ".weight")
    with torch.no_grad():
        torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
    """
)


@pytest.fixture(scope="module")
def llama_64(tmp_path_factory):
    """bitsandbytes' CPU 4-bit forward repacks weights per 64-element block: rows must be >= 64 long."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=96)
    path = tmp_path_factory.mktemp("llama64") / "m"
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.mark.parametrize("weights", ["nf4", "fp4", "int8"])
def test_bnb_export_loads_in_stock_transformers(llama_64, tmp_path, weights, input_ids):
    model = llmslim.from_pretrained(llama_64, SlimConfig(weights=weights), progress=False)
    with torch.no_grad():
        model(input_ids)  # NF4/FP4 layers now hold their codes in the CPU layout: the export must still write the stored one
    llmslim.save_pretrained(model, tmp_path / "bnb", format="bnb")
    torch.save(input_ids, tmp_path / "ids.pt")
    run = subprocess.run(
        [sys.executable, "-c", _STOCK_LOAD, str(tmp_path / "bnb"), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    expected_class = "Linear8bitLt" if weights == "int8" else "Linear4bit"
    assert run.stdout.split()[-2:] == ["bitsandbytes.nn.modules", expected_class]
    # the same weights, bit for bit
    their_weight = torch.load(str(tmp_path / "logits.pt") + ".weight")
    our_weight = model.model.layers[0].self_attn.q_proj.dequantized_weight(their_weight.dtype)
    if weights == "int8":  # bitsandbytes multiplies by a rounded 1/127: last-bit differences
        torch.testing.assert_close(their_weight, our_weight, rtol=1e-6, atol=0)
    else:
        assert torch.equal(their_weight, our_weight)
    # and nearly the same logits: bitsandbytes' CPU kernels round differently (bf16 accumulation,
    # int8 activation quantization)
    theirs = torch.load(tmp_path / "logits.pt").float()
    with torch.no_grad():
        ours = model(input_ids).logits.float()
    assert (theirs - ours).abs().max() < 0.05 * ours.abs().max()
