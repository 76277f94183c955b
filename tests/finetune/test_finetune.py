"""QLoRA-style fine-tuning: quantized frozen base, peft LoRA adapters, the shared trainer, peft's format."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from train.tiny import train_config, write_causal, write_text

import llmslim
from llmslim.cli import script_main
from llmslim.finetune.config import FinetuneConfig
from llmslim.finetune.lora import load_adapter, resolve_targets
from llmslim.finetune.run import finetune


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_causal(tmp_path_factory.mktemp("base") / "model", layers=4)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text"))


def config(tmp_path, base, text, **kwargs) -> FinetuneConfig:
    return FinetuneConfig(**{"out": tmp_path / "adapter", "base": str(base), "train": text, "block_size": 32, "eval_tokens": 256, **kwargs})


def test_finetune_lowers_perplexity_and_saves_a_peft_adapter(tmp_path, base, text):
    cfg = config(tmp_path, base, text, rank=4, alpha=8, dropout=0.0)
    result = finetune(cfg, train_config(steps=12, batch_size=4, lr=2e-2, checkpointing="sqrt", optimizer="adafactor"), progress=False)
    assert result.metrics["eval_perplexity"] < result.metrics["eval_perplexity_before"]
    assert 0 < result.trainable_params < 0.2 * result.total_params
    saved = json.loads((cfg.out / "adapter_config.json").read_text())
    assert saved["r"] == 4 and len(saved["target_modules"]) == 7 and (cfg.out / "adapter_model.safetensors").is_file()
    assert json.loads((cfg.out / "llmslim_finetune.json").read_text())["weights"] == "nf4"
    ids = torch.randint(0, 64, (1, 16))
    reloaded = load_adapter(llmslim.from_pretrained(base, llmslim.SlimConfig(weights="nf4", include=None), progress=False), cfg.out)
    trained = result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_targets_select_layers_and_bad_targets_list_the_names(tmp_path, base, text):
    result = finetune(config(tmp_path, base, text, targets=["q_proj", "v_proj"]), train_config(steps=1, batch_size=2), progress=False)
    adapted = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert sorted(adapted) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "v_proj"))
    assert result.trainable_params == 4 * (16 * 32 + 32 * 16 + 16 * 32 + 16 * 16)  # per block: q (32 -> 32), v (32 -> 16, GQA)
    with pytest.raises(
        ValueError,
        match=r"match no linear layer .* named \['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj'\]",
    ):
        finetune(config(tmp_path, base, text, targets=["qkv"], overwrite=True), train_config(steps=1), progress=False)


def test_resume_continues_the_run(tmp_path, base, text):
    cfg = config(tmp_path, base, text, rank=2)
    train = train_config(steps=4, batch_size=2, save_every=2, run_dir=tmp_path / "run")
    first = finetune(cfg, train, progress=False)
    shutil.rmtree(cfg.out)
    resumed = finetune(cfg, train, resume=tmp_path / "run" / "checkpoints" / "step-0000002", progress=False)
    for (name, a), b in zip(first.model.named_parameters(), resumed.model.parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"weights": "nf3"}, r"weights must be one of \['none', 'int8', 'nf4', 'fp4', 'int4'\], got 'nf3'"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"targets": []}, "targets must be None"),
    ],
)
def test_bad_config(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        FinetuneConfig(out=tmp_path, **kwargs)


def test_existing_out_needs_overwrite(tmp_path, base, text):
    (tmp_path / "adapter").mkdir()
    with pytest.raises(FileExistsError, match="already exists: choose another --out or pass --overwrite"):
        finetune(config(tmp_path, base, text), train_config(steps=1), progress=False)


def test_resolve_targets_without_exclude_can_pick_the_head():
    from train.tiny import llama_config
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(llama_config(layers=1))
    assert resolve_targets(model, ["lm_head"], []) == ["lm_head"]
    assert "lm_head" not in resolve_targets(model, None, ["lm_head"])


def test_script(tmp_path, base, text, capsys):
    code = script_main(
        "finetune",
        [
            str(base),
            "--out",
            str(tmp_path / "a"),
            "--train",
            str(text),
            "--seq-len",
            "32",
            "--eval-tokens",
            "128",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--rank",
            "2",
            "--no-progress",
            "--json",
            "--checkpointing",
            "2",
        ],
    )
    out = capsys.readouterr().out
    assert code == 0 and "eval perplexity before:" in out
    summary = json.loads(out.splitlines()[0])
    assert summary["optimizer"] == "adamw" and summary["trainable_params"] > 0
    assert script_main("finetune", [str(base), "--out", str(tmp_path / "a"), "--train", str(text), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_out_apart_from_the_base_and_the_run_folder(tmp_path, base, text):
    own_base = shutil.copytree(base, tmp_path / "base")
    before = {p.name: p.read_bytes() for p in own_base.iterdir()}
    with pytest.raises(
        ValueError, match=r"the --out \S+/base is the base model \(\S+/base\): writing there would replace it; choose another --out"
    ):
        finetune(config(tmp_path, own_base, text, out=own_base, overwrite=True), train_config(steps=1), progress=False)
    assert {p.name: p.read_bytes() for p in own_base.iterdir()} == before
    with pytest.raises(ValueError, match=r"the run folder \S+/adapter/run \(checkpoints, log\) is inside the output folder \S+/adapter"):
        finetune(config(tmp_path, base, text), train_config(steps=1, run_dir=tmp_path / "adapter" / "run"), progress=False)
    assert not (tmp_path / "adapter").exists()


def test_base_without_tokenizer_is_explained(tmp_path, text):
    from conftest import write_tiny_model

    bare = write_tiny_model(tmp_path / "bare", "llama")
    with pytest.raises(
        ValueError, match=r"\S+/bare has no tokenizer \(none of tokenizer.json, .*\), and fine-tuning needs one: copy the tokenizer"
    ):
        finetune(config(tmp_path, bare, text), train_config(steps=1), progress=False)


def test_out_that_names_no_new_folder_is_explained(tmp_path, base, text, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert script_main("finetune", [str(base), "--out", ".", "--train", str(text)]) == 2  # was "PosixPath('.') has an empty name"
    assert "finetune: error: the --out '.' names an existing folder ('.', '..' or /), not a new one" in capsys.readouterr().err
