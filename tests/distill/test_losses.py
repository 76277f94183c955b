"""Each term of the triple loss against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
from train.tiny import llama_config
from transformers import AutoModelForCausalLM

from llmslim.distill.losses import DistillLoss, LossWeights, Masking, cosine_loss, kd_loss
from llmslim.distill.student import init_student
from llmslim.train.objectives import IGNORE, causal_lm_loss, mask_tokens, masked_lm_loss

LN3 = math.log(3.0)


def test_kd_loss_at_temperature_one():
    teacher = torch.tensor([[[0.0, 0.0]]])  # p = (1/2, 1/2)
    student = torch.tensor([[[LN3, 0.0]]])  # q = (3/4, 1/4)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(p || q) = ln(4/3) / 2
    assert kd_loss(student, teacher, torch.tensor([[True]]), 1.0).item() == pytest.approx(expected)


def test_kd_loss_scales_logits_by_t_and_the_loss_by_t_squared():
    teacher, student = torch.tensor([[[0.0, 0.0]]]), torch.tensor([[[LN3, 0.0]]])
    q1 = math.sqrt(3) / (math.sqrt(3) + 1)  # softmax([ln3 / 2, 0])
    expected = 4.0 * (0.5 * math.log(0.5 / q1) + 0.5 * math.log(0.5 / (1 - q1)))
    assert kd_loss(student, teacher, torch.tensor([[True]]), 2.0).item() == pytest.approx(expected)


def test_kd_loss_averages_over_unmasked_positions_only():
    teacher = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [9.0, -9.0]]])
    student = torch.tensor([[[LN3, 0.0], [0.0, 0.0], [-9.0, 9.0]]])  # the last position is padding
    mask = torch.tensor([[True, True, False]])
    expected = (0.5 * math.log(4 / 3) + 0.0) / 2
    assert kd_loss(student, teacher, mask, 1.0).item() == pytest.approx(expected)


def test_cosine_loss():
    student = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]]])
    teacher = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [-5.0, 5.0]]])
    mask = torch.tensor([[True, True, False]])
    expected = ((1 - 0.0) + (1 - 1 / math.sqrt(2))) / 2
    assert cosine_loss(student, teacher, mask).item() == pytest.approx(expected)
    assert cosine_loss(2 * teacher, teacher, mask).item() == pytest.approx(0.0, abs=1e-7)


def test_causal_lm_loss_predicts_the_next_token():
    ids = torch.tensor([[0, 1, 1]])
    logits = torch.tensor([[[0.0, LN3], [0.0, 0.0], [7.0, 7.0]]])  # p(1) = 3/4, then 1/2; the last logit predicts nothing
    assert causal_lm_loss(logits, ids).item() == pytest.approx((-math.log(0.75) + math.log(2)) / 2)
    assert causal_lm_loss(logits, ids, torch.tensor([[1, 1, 0]])).item() == pytest.approx(-math.log(0.75))


def test_masked_lm_loss_counts_only_labelled_positions():
    logits = torch.tensor([[[0.0, LN3], [5.0, -5.0]]], requires_grad=True)
    assert masked_lm_loss(logits, torch.tensor([[1, IGNORE]])).item() == pytest.approx(-math.log(0.75))
    empty = masked_lm_loss(logits, torch.full((1, 2), IGNORE))
    empty.backward()
    assert empty.item() == 0.0 and logits.grad is not None


def test_mask_tokens_follows_bert_80_10_10():
    ids = torch.full((400, 100), 7)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    inputs, labels = mask_tokens(ids, special, mask_token_id=3, vocab_size=64, generator=torch.Generator().manual_seed(0))
    chosen = labels != IGNORE
    assert not chosen[:, 0].any() and (labels[chosen] == 7).all() and torch.equal(inputs[~chosen], ids[~chosen])
    assert chosen.float().mean().item() == pytest.approx(0.15 * 99 / 100, abs=0.005)
    shares = [(inputs[chosen] == 3).float().mean().item(), (inputs[chosen] == 7).float().mean().item()]
    assert shares[0] == pytest.approx(0.8, abs=0.02) and shares[1] == pytest.approx(0.1 + 0.1 / 64, abs=0.02)


def test_mask_tokens_is_deterministic_under_a_seed():
    ids, special = torch.arange(50).view(5, 10), torch.zeros(5, 10, dtype=torch.bool)
    first = mask_tokens(ids, special, 3, 64, generator=torch.Generator().manual_seed(1))
    second = mask_tokens(ids, special, 3, 64, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def tiny_pair(layer_map):
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(llama_config(layers=4)).eval().requires_grad_(False)
    return teacher, init_student(teacher, layer_map)


def test_triple_loss_is_the_weighted_sum_and_trains_the_student_only():
    teacher, student = tiny_pair([0, 3])
    batch = {"input_ids": torch.randint(0, 64, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    out = DistillLoss(teacher, LossWeights(5.0, 2.0, 1.0, 2.0), [(-1, -1)])(student, batch)
    assert set(out.parts) == {"kd", "lm", "cos"}
    expected = 5.0 * out.parts["kd"] + 2.0 * out.parts["lm"] + 1.0 * out.parts["cos"]
    assert out.loss.item() == pytest.approx(expected.item())
    out.loss.backward()
    assert student.model.layers[0].mlp.up_proj.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_a_kd_to_lm_handover_moves_the_kl_share_linearly_and_keeps_the_sum():
    weights = LossWeights(0.75, 0.25, 0.0, 1.0, kd_ratio_end=0.25)
    assert weights.at(0.0) == pytest.approx((0.75, 0.25))
    assert weights.at(0.5) == pytest.approx((0.5, 0.5))
    assert weights.at(1.0) == pytest.approx((0.25, 0.75))
    assert LossWeights(0.0, 2.0, 0.0, 1.0, kd_ratio_end=1.0).at(0.25) == pytest.approx((0.5, 1.5))  # the sum 2 stays
    assert LossWeights(0.75, 0.25, 0.0, 1.0).at(1.0) == (0.75, 0.25)  # no schedule: constant


def test_a_scheduled_loss_weighs_its_parts_by_the_batch_progress():
    teacher, student = tiny_pair([0, 3])
    batch = {"input_ids": torch.randint(0, 64, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    loss = DistillLoss(teacher, LossWeights(0.0, 1.0, 0.0, 1.0, kd_ratio_end=0.8), [(-1, -1)])
    first, last = loss(student, {**batch, "progress": 0.0}), loss(student, {**batch, "progress": 1.0})
    assert set(first.parts) == {"kd", "lm"}  # the teacher runs from the first step, whose KL weight is still 0
    assert first.loss.item() == pytest.approx(first.parts["lm"].item())
    assert last.loss.item() == pytest.approx(0.8 * last.parts["kd"].item() + 0.2 * last.parts["lm"].item())


def test_a_student_identical_to_its_teacher_has_zero_kd_and_cosine_loss():
    teacher, student = tiny_pair([0, 1, 2, 3])
    batch = {"input_ids": torch.randint(0, 64, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    pairs = [(j + 1, j + 1) for j in range(4)]
    out = DistillLoss(teacher, LossWeights(1.0, 0.0, 1.0, 2.0), pairs)(student.eval(), batch)
    assert out.parts["kd"].item() == pytest.approx(0.0, abs=1e-6) and out.parts["cos"].item() == pytest.approx(0.0, abs=1e-6)


def test_masked_objective_corrupts_inputs_and_scores_masked_positions():
    teacher, student = tiny_pair([0, 3])
    batch = {"input_ids": torch.randint(5, 64, (2, 32)), "attention_mask": torch.ones(2, 32, dtype=torch.long)}
    masking = Masking(special_ids=[0, 1, 2, 3, 4], mask_token_id=4, vocab_size=64, probability=0.5)
    out = DistillLoss(teacher, LossWeights(0.0, 1.0, 0.0, 1.0), [(-1, -1)], masking)(student, batch)
    assert set(out.parts) == {"lm"} and out.loss.item() > 0


def test_a_hidden_state_only_loss_sees_the_text_itself_even_for_a_masked_lm():
    # a bare encoder (no head) learns its teacher's states on clean text, as it is used and scored: with inputs
    # masked, all-MiniLM-L6-v2 -> 3 layers ended at pooled cosine 0.423 against 0.559 for the truncated student
    teacher, student = tiny_pair([0, 3])
    batch = {"input_ids": torch.randint(5, 64, (2, 32)), "attention_mask": torch.ones(2, 32, dtype=torch.long)}
    masking = Masking(special_ids=[0, 1, 2, 3, 4], mask_token_id=4, vocab_size=64, probability=0.5)
    seen = []
    for model in (teacher, student):
        model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True)
    out = DistillLoss(teacher, LossWeights(0.0, 0.0, 1.0, 1.0), [(-1, -1)], masking)(student, batch)
    assert set(out.parts) == {"cos"} and len(seen) == 2
    assert all(torch.equal(ids, batch["input_ids"]) for ids in seen)
    DistillLoss(teacher, LossWeights(0.0, 1.0, 1.0, 1.0), [(-1, -1)], masking)(student, batch)  # a loss on the logits: masked
    assert not torch.equal(seen[-1], batch["input_ids"])
