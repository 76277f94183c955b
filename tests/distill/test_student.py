"""Student initialisation: the DistilBERT layer choice, generic block discovery, copied weights, bad maps."""

from __future__ import annotations

import pytest
import torch
from train.tiny import bert_config, llama_config
from transformers import AutoModelForCausalLM, BertForMaskedLM, GPT2Config, OPTConfig, Qwen2Config

from llmslim.distill.student import (
    check_compatible,
    check_layer_map,
    distilbert_layer_map,
    find_block_list,
    init_student,
    parse_layer_map,
    student_from_checkpoint,
)


def test_distilbert_map_reproduces_distilbert():
    assert distilbert_layer_map(12, 6) == [0, 2, 4, 7, 9, 11]  # the layers DistilBERT took from BERT-base
    assert distilbert_layer_map(30, 15)[:3] == [0, 2, 4] and distilbert_layer_map(30, 15)[-1] == 29
    assert distilbert_layer_map(4, 4) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (llama_config(layers=3), "model.layers"),
        (GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64, vocab_size=64), "transformer.h"),
        (
            OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4, word_embed_proj_dim=32, vocab_size=64),
            "model.decoder.layers",
        ),
        (bert_config(layers=3), "bert.encoder.layer"),
    ],
)
def test_blocks_are_found_generically(config, expected):
    model = BertForMaskedLM(config) if config.model_type == "bert" else AutoModelForCausalLM.from_config(config)
    assert find_block_list(model)[0] == expected


def test_student_copies_mapped_layers_embeddings_and_head():
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(llama_config(layers=4))
    student = init_student(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    assert torch.equal(student.model.layers[0].self_attn.q_proj.weight, teacher.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()  # still tied


def test_full_map_student_equals_teacher():
    torch.manual_seed(0)
    teacher = BertForMaskedLM(bert_config(layers=3)).eval()
    student = init_student(teacher, [0, 1, 2]).eval()
    ids = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(student(ids).logits, teacher(ids).logits)


def test_per_layer_config_lists_follow_the_map():
    config = Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=64
    )
    config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    config.use_sliding_window = True
    student = init_student(AutoModelForCausalLM.from_config(config), [1, 2])
    assert student.config.layer_types == ["sliding_attention", "full_attention"]


def test_layer_map_out_of_range():
    with pytest.raises(ValueError, match=r"index 7 out of range: the teacher has layers 0..3"):
        check_layer_map([0, 7], 4)
    with pytest.raises(ValueError, match="between 1 and the teacher's 4 layers, got 5"):
        distilbert_layer_map(4, 5)


def test_layer_map_parsing():
    assert parse_layer_map("0, 2,4") == [0, 2, 4]
    with pytest.raises(ValueError, match="comma-separated layer indices such as 0,2,4, got '0;2'"):
        parse_layer_map("0;2")


def test_vocabulary_and_width_must_match():
    with pytest.raises(ValueError, match=r"vocabularies differ \(teacher vocab_size 64, student 80\)"):
        check_compatible(llama_config(), llama_config(vocab=80), need_hidden=False)
    wide = llama_config()
    wide.hidden_size = 64
    with pytest.raises(ValueError, match="--alpha-cos 0"):
        check_compatible(llama_config(), wide, need_hidden=True)
    check_compatible(llama_config(), wide, need_hidden=False)


@pytest.mark.parametrize("tied", [False, True])
def test_student_read_from_the_checkpoint_equals_the_one_copied_from_the_loaded_teacher(tmp_path, tied):
    torch.manual_seed(0)
    config = llama_config(layers=4)
    config.tie_word_embeddings = tied
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "t")
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "t")
    copied = init_student(teacher, [0, 2, 3])
    read = student_from_checkpoint(AutoModelForCausalLM, tmp_path / "t", teacher.config, [0, 2, 3])
    a, b = copied.state_dict(), read.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and read.config.num_hidden_layers == 3
    assert (read.lm_head.weight is read.model.embed_tokens.weight) == tied
