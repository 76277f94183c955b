"""Tiny random mixture-of-experts models of five architectures, built from configs (tests of experts and offload)."""

from __future__ import annotations

import torch
import transformers
from transformers import AutoModelForCausalLM

from llmslim.quant.experts import experts_modules

_SMALL = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
MOE_CONFIGS = {
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        intermediate_size=128, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2, **_SMALL
    ),
    "mixtral": lambda: transformers.MixtralConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, **_SMALL),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(  # a shared expert beside the routed ones
        intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2, **_SMALL
    ),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(  # MLA attention, shared experts, a dense first layer
        intermediate_size=128,
        moe_intermediate_size=64,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        **(_SMALL | dict(num_key_value_heads=4, head_dim=8)),
    ),
    "gpt_oss": lambda: transformers.GptOssConfig(  # transposed experts with biases, interleaved gate/up
        intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"] * 2, **_SMALL
    ),
}


def float_moe(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MOE_CONFIGS[arch]()).eval()
    with torch.no_grad():
        for name, module in experts_modules(model):
            for p in module.parameters(recurse=False):
                if p.dim() == 3:
                    p.normal_(0, 0.05)
            mlp = model.get_submodule(name.rpartition(".")[0])
            for p in mlp.parameters():  # decisive routers: quantization noise must not flip a near-tie of the top-k
                if p.dim() == 2 and p.shape[0] == module.num_experts:
                    p.normal_(0, 1.0)
    return model
