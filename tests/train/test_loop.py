"""The training loop: determinism, accumulation, activation checkpointing, checkpoints and resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import LlamaForCausalLM

from llmslim.train import LossOutput, TrainConfig, Trainer, causal_lm_loss
from llmslim.train.checkpoint import MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, checkpoint_dir
from train.tiny import llama_config, train_config

BLOCKS = torch.randint(0, 64, (24, 16), generator=torch.Generator().manual_seed(0))  # (n_blocks, block)


def lm_loss(model, batch) -> LossOutput:
    logits = model(**batch).logits
    return LossOutput(causal_lm_loss(logits, batch["input_ids"], batch["attention_mask"]))


def new_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(layers=2))


def train(config: TrainConfig, resume=None, loss_fn=lm_loss, eval_fn=None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    trainer = Trainer(new_model(), config, BLOCKS, loss_fn, eval_fn=eval_fn, progress=False)
    result = trainer.fit(resume)
    return {k: v.clone() for k, v in trainer.unwrapped_model().state_dict().items()}, result.history


def assert_same_weights(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "elapsed_s"} for record in history]


def test_training_lowers_the_loss_and_is_deterministic():
    config = train_config(steps=8, batch_size=4, lr=1e-2, log_every=1)
    first, history = train(config)
    second, _ = train(config)
    assert_same_weights(first, second)
    assert history[-1]["loss"] < history[0]["loss"]
    assert [r["step"] for r in history] == list(range(1, 9)) and history[-1]["tokens"] == 8 * 4 * 16


def test_accumulation_matches_one_large_batch():
    big, _ = train(train_config(steps=3, batch_size=4, grad_accum=1, lr=1e-2))
    accumulated, _ = train(train_config(steps=3, batch_size=2, grad_accum=2, lr=1e-2))
    assert_same_weights(big, accumulated, exact=False)


def test_activation_checkpointing_changes_nothing_but_memory():
    plain, _ = train(train_config(steps=2, batch_size=2, lr=1e-2))
    checkpointed, _ = train(train_config(steps=2, batch_size=2, lr=1e-2, checkpointing="all"))
    assert_same_weights(plain, checkpointed, exact=False)


def test_periodic_evaluation_is_logged(tmp_path):
    config = train_config(steps=4, batch_size=2, eval_every=2, log_every=2, run_dir=tmp_path)
    _, history = train(config, eval_fn=lambda model: {"eval_metric": float(model.training)})
    evals = [r for r in history if "eval_metric" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["eval_metric"] == 0.0 for r in evals)  # run in eval mode
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logged == history


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    config = train_config(steps=6, batch_size=2, grad_accum=2, lr=1e-2, save_every=3, log_every=1, run_dir=tmp_path / "a")
    uninterrupted, history = train(config)
    halfway = checkpoint_dir(tmp_path / "a", 3)
    assert sorted(p.name for p in halfway.iterdir()) == sorted([MODEL_FILE, OPTIMIZER_FILE, STATE_FILE])  # no pickle
    run_b = tmp_path / "b"
    shutil.copytree(tmp_path / "a" / "checkpoints" / halfway.name, checkpoint_dir(run_b, 3))
    (run_b / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))  # the log cut at step 3 on resume
    config.run_dir = run_b
    resumed, resumed_history = train(config, resume=run_b)
    assert_same_weights(uninterrupted, resumed)
    assert without_time(resumed_history) == without_time(history)


def test_resume_from_another_configuration_fails_before_training(tmp_path):
    train(train_config(steps=2, batch_size=2, lr=1e-2, save_every=2, run_dir=tmp_path))
    calls = []

    def counting_loss(model, batch):
        calls.append(1)
        return lm_loss(model, batch)

    other = train_config(steps=2, batch_size=2, lr=2e-2, save_every=2, run_dir=tmp_path)
    with pytest.raises(ValueError, match=r"another configuration \(lr: checkpoint 0.01, now 0.02\).*without --resume"):
        train(other, resume=tmp_path, loss_fn=counting_loss)
    assert calls == []


def test_resume_from_a_folder_without_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="neither a checkpoint folder"):
        train(train_config(steps=1, batch_size=2), resume=tmp_path)
