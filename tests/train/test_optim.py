"""TrainConfig validation, the learning-rate schedule, parameter groups and the batch order."""

from __future__ import annotations

import math

import pytest
import torch

from llmslim.train.config import TrainConfig
from llmslim.train.loop import batch_indices
from llmslim.train.optim import lr_at, parameter_groups, resolve_optimizer


def test_schedule_warms_up_linearly_then_decays_by_cosine():
    config = TrainConfig(steps=12, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    lrs = [lr_at(step, config) for step in range(12)]
    assert lrs[:2] == [0.5, 1.0]
    # after warmup: 0.1 + 0.9 * 0.5 * (1 + cos(pi * (step - 2) / 9))
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[6] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 4 / 9)))
    assert lrs[11] == pytest.approx(0.1)


def test_default_warmup_is_five_percent():
    assert TrainConfig(steps=200).warmup == 10 and TrainConfig(steps=3).warmup == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps must be a positive integer, got 0"),
        ({"lr": -1.0}, "lr must be > 0, got -1.0"),
        ({"optimizer": "sgd"}, r"optimizer must be one of \['auto', 'adamw', 'adamw8bit', 'paged_adamw8bit', 'adafactor'\], got 'sgd'"),
        ({"checkpointing": "half"}, "checkpointing must be one of"),
        ({"save_every": 5}, "save_every=5 needs a run_dir"),
        ({"min_lr_ratio": 2.0}, r"min_lr_ratio must be in \[0, 1\], got 2.0"),
    ],
)
def test_bad_train_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_biases_and_norms_do_not_decay():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = parameter_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [(4, 4)] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_auto_optimizer_is_8bit_adamw_on_cuda_only():
    assert resolve_optimizer("auto", torch.device("cuda")) == "adamw8bit"
    assert resolve_optimizer("auto", torch.device("cpu")) == "adamw"


def test_batches_split_across_ranks_and_cover_each_epoch():
    config = TrainConfig(batch_size=2, grad_accum=2, seed=3)
    seen = [batch_indices(8, 0, micro, rank, 2, config) for micro in range(2) for rank in range(2)]
    assert sorted(torch.cat(seen).tolist()) == list(range(8))  # one step of 2 ranks x 2 micro x 2 = one epoch
    assert torch.equal(batch_indices(8, 1, 0, 0, 2, config), batch_indices(8, 1, 0, 0, 2, config))
    assert not torch.equal(torch.cat(seen), torch.cat([batch_indices(8, 1, m, r, 2, config) for m in range(2) for r in range(2)]))
