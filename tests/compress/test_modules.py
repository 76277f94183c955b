"""FactorizedEmbedding / FactorizedHead and layer sharing on tiny models in memory."""

from __future__ import annotations

import pytest
import torch
from train.tiny import write_causal
from transformers import AutoModelForCausalLM

from llmslim import SlimConfig
from llmslim.compress import FactorizedEmbedding, FactorizedHead, compress_
from llmslim.distill.heal import mark_trainable_
from llmslim.stats import model_nbytes


@pytest.fixture(scope="module")
def tied_path(tmp_path_factory):
    return write_causal(tmp_path_factory.mktemp("tied") / "llama")


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_tied_head_logits_equal_the_materialised_product(tied_path):
    model = load(tied_path)
    compress_(model, SlimConfig(weights=None, embedding_rank=8))
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, FactorizedEmbedding) and isinstance(head, FactorizedHead)
    hidden = torch.randn(2, 5, 32)
    torch.testing.assert_close(head(hidden), hidden @ emb.materialize().t(), atol=1e-5, rtol=1e-5)
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(emb(ids), emb.materialize()[ids])
    assert "lm_head.weight" not in model.state_dict()


def test_factors_are_counted_once_and_smaller(tied_path):
    model = load(tied_path)
    before = model_nbytes(model)
    compress_(model, SlimConfig(weights=None, embedding_rank=8))
    assert before - model_nbytes(model) == (64 * 32 - (64 * 8 + 8 * 32)) * 4


def test_untie_keeps_the_head(tied_path):
    model, original = load(tied_path), load(tied_path)
    compress_(model, SlimConfig(weights=None, embedding_rank=8, untie_embeddings=True))
    torch.testing.assert_close(model.lm_head.weight, original.lm_head.weight)
    assert model.lm_head.weight is not None and not model.config.tie_word_embeddings


def test_quantized_table_rows_match_its_dequantized_weight(tied_path):
    model = load(tied_path)
    compress_(model, SlimConfig(weights=None, embedding_rank=8, embedding_weights="int8"))
    emb = model.get_input_embeddings()
    ids = torch.tensor([[0, 5, 63]])
    torch.testing.assert_close(emb.table_rows(ids), emb.table.dequantized_weight(torch.float32)[ids])


def test_shared_blocks_have_one_storage(tied_path):
    model = load(tied_path)
    before = model_nbytes(model)
    compress_(model, SlimConfig(weights=None, share_layers=2))
    layers = model.model.layers
    assert layers[0].mlp.up_proj is layers[1].mlp.up_proj and layers[2].mlp.up_proj is layers[3].mlp.up_proj
    assert layers[1].mlp.up_proj is not layers[2].mlp.up_proj
    assert layers[0].input_layernorm is not layers[1].input_layernorm  # norms stay per layer
    assert layers[1].self_attn.layer_idx == 1  # blocks stay distinct (KV cache index)
    per_block = sum(p.numel() for n, p in layers[0].named_parameters() if "norm" not in n) * 4
    assert before - model_nbytes(model) == 2 * per_block


def test_mean_and_member_init(tied_path):
    original = load(tied_path)
    w = [original.model.layers[i].mlp.up_proj.weight for i in range(4)]
    mean, member = load(tied_path), load(tied_path)
    compress_(mean, SlimConfig(weights=None, share_layers=[[0, 1, 2]]))
    compress_(member, SlimConfig(weights=None, share_layers="all", share_init=2))
    torch.testing.assert_close(mean.model.layers[1].mlp.up_proj.weight, (w[0] + w[1] + w[2]) / 3)
    torch.testing.assert_close(member.model.layers[3].mlp.up_proj.weight, w[2])


def test_only_compressed_parts_train(tied_path):
    model = load(tied_path)
    compress_(model, SlimConfig(weights=None, embedding_rank=8, share_layers=[[0, 1]]))
    mark_trainable_(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.proj" in trainable and "model.layers.0.mlp.up_proj.weight" in trainable
    assert "model.layers.2.mlp.up_proj.weight" not in trainable and "model.norm.weight" not in trainable


@pytest.mark.parametrize(
    "config, match",
    [
        (SlimConfig(weights=None, embedding_rank=32), r"embedding_rank=32 must be below min\(vocab, hidden\) = 32"),
        (SlimConfig(weights=None, share_layers=5), r"share_layers=5 groups must be between 2 and the model's 4 layers"),
        (SlimConfig(weights=None, share_layers=[[2, 3, 4]]), r"sharing group \[2, 3, 4\] has layer 4 beyond the model's depth"),
        (SlimConfig(weights=None, share_layers=[[0, 1], [1, 2]]), r"layer 1 is in two sharing groups"),
        (SlimConfig(weights=None, share_layers=2, share_init=2), r"share_init=2 names no member of the sharing group \[0, 1\]"),
    ],
)
def test_bad_input_fails_before_any_change(tied_path, config, match):
    model = load(tied_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        compress_(model, config)
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_layers_of_different_shapes_cannot_share(tied_path):
    model = load(tied_path)
    model.model.layers[1].mlp.up_proj = torch.nn.Linear(32, 48, bias=False)
    with pytest.raises(ValueError, match=r"layers 0 and 1 cannot share weights: mlp.up_proj"):
        compress_(model, SlimConfig(weights=None, share_layers=2))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(embedding_rank=0), r"embedding_rank must be a positive integer such as 256.*got 0"),
        (dict(embedding_rank=8, embedding_energy=0.9), r"give embedding_rank \(8\) or embedding_energy \(0.9\), not both"),
        (dict(embedding_energy=1.5), r"embedding_energy must be a share in \(0, 1\)"),
        (dict(untie_embeddings=True), r"untie_embeddings applies to a factorized embedding"),
        (dict(share_layers=1), r"share_layers must be 'all', a group size k >= 2"),
        (dict(share_layers=2, share_init="first"), r"share_init must be 'mean' or the index"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SlimConfig(weights=None, **kwargs)
