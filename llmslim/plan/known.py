"""Well-known architectures, bundled as the numbers of their published `config.json` files.

Only the fields the planner reads are kept; each entry names the Hugging Face repository its
numbers come from, so they can be checked, and for the mixture-of-experts models where the numbers
were checked against a public copy of that config.json. Nothing is downloaded.
"""

from __future__ import annotations

_LLAMA2 = dict(
    model_type="llama", vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="float16"
)

KNOWN_CONFIGS: dict[str, dict] = {
    "llama-2-7b": dict(
        _LLAMA2, _source="meta-llama/Llama-2-7b-hf", hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    ),
    "llama-2-13b": dict(
        _LLAMA2, _source="meta-llama/Llama-2-13b-hf", hidden_size=5120, intermediate_size=13824,
        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
    ),
    "llama-2-70b": dict(
        _LLAMA2, _source="meta-llama/Llama-2-70b-hf", hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
    ),
    "llama-3-405b": dict(
        _source="meta-llama/Llama-3.1-405B", model_type="llama", hidden_size=16384, intermediate_size=53248,
        num_hidden_layers=126, num_attention_heads=128, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16",
    ),
    "bloom-176b": dict(
        _source="bigscience/bloom", model_type="bloom", hidden_size=14336, n_layer=70, n_head=112,
        vocab_size=250880, seq_length=2048, tie_word_embeddings=True, torch_dtype="bfloat16",
    ),
    "opt-175b": dict(
        _source="facebook/opt-66b (same family; 175B numbers from the OPT paper, Table 1)", model_type="opt",
        hidden_size=12288, ffn_dim=49152, num_hidden_layers=96, num_attention_heads=96, vocab_size=50272,
        max_position_embeddings=2048, word_embed_proj_dim=12288, do_layer_norm_before=True, enable_bias=True,
        tie_word_embeddings=True, torch_dtype="float16",
    ),
    "falcon-180b": dict(
        _source="tiiuae/falcon-180B", model_type="falcon", hidden_size=14848, num_hidden_layers=80,
        num_attention_heads=232, num_kv_heads=8, new_decoder_architecture=True, parallel_attn=True, bias=False,
        alibi=False, vocab_size=65024, max_position_embeddings=2048, tie_word_embeddings=True, torch_dtype="bfloat16",
    ),
    "mixtral-8x7b": dict(
        _source="mistralai/Mixtral-8x7B-v0.1", model_type="mixtral", hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        vocab_size=32000, max_position_embeddings=32768, sliding_window=None, tie_word_embeddings=False, torch_dtype="bfloat16",
    ),
    # Mixture of experts. Checked against: Cerebras/modelzoo models/nlp/mixtral/configs/params_mixtral_8x22b.yaml
    # ("based on mistral-community/Mixtral-8x22B-v0.1": every number below); 141B total, 39B active (Mistral AI)
    "mixtral-8x22b": dict(
        _source="mistralai/Mixtral-8x22B-v0.1", model_type="mixtral", hidden_size=6144, intermediate_size=16384,
        num_hidden_layers=56, num_attention_heads=48, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        vocab_size=32000, max_position_embeddings=65536, rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False,
        torch_dtype="bfloat16",
    ),
    # Checked against: zyzshishui/slime scripts/models/qwen3-235B-A22B.sh (94 layers, hidden 4096, 64 heads / 4 KV
    # groups of 128, dense 12288, 128 experts of 1536, top 8, vocab 151936, untied, rope 1e6); max_position_embeddings
    # 40960 is the Qwen3 family's (checked on Qwen3-30B-A3B's config.json), not seen for this repository itself
    "qwen3-235b-a22b": dict(
        _source="Qwen/Qwen3-235B-A22B", model_type="qwen3_moe", hidden_size=4096, intermediate_size=12288,
        moe_intermediate_size=1536, num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, use_sliding_window=False, sliding_window=None,
        tie_word_embeddings=False, torch_dtype="bfloat16",
    ),
    # Checked against: a verbatim copy of deepseek-ai/DeepSeek-R1's config.json (same architecture, every field below
    # equal) and transformers' DeepseekV3Config defaults ("similar to DeepSeek-V3"). The Hub checkpoint is FP8
    # (128 x 128 blocks) and adds one multi-token-prediction layer (14B) that transformers does not build: the 671B
    # main model is planned, from bfloat16
    "deepseek-v3": dict(
        _source="deepseek-ai/DeepSeek-V3", model_type="deepseek_v3", hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8, first_k_dense_replace=3, n_group=8, topk_group=4,
        norm_topk_prob=True, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
        qk_nope_head_dim=128, v_head_dim=128, vocab_size=129280, max_position_embeddings=163840, rope_theta=10000,
        tie_word_embeddings=False, torch_dtype="bfloat16",
    ),
    # Checked against: transformers' GptOssConfig defaults ("similar to GPT-OSS-120B": 36 layers, 128 experts, top 4,
    # hidden 2880, vocab 201088, window 128, 131072 positions) and several copies of the config's numbers. The Hub
    # checkpoint stores the experts in MXFP4; llmslim plans them from bfloat16
    "gpt-oss-120b": dict(
        _source="openai/gpt-oss-120b", model_type="gpt_oss", hidden_size=2880, intermediate_size=2880,
        num_hidden_layers=36, num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=128,
        num_experts_per_tok=4, vocab_size=201088, sliding_window=128, max_position_embeddings=131072, rope_theta=150000.0,
        attention_bias=True, tie_word_embeddings=False, torch_dtype="bfloat16",
    ),
    # Its text_config (the vision tower is not planned). Checked against: NVIDIA/TensorRT-LLM
    # tests/unittest/_torch/modeling/test_modeling_llama_min_latency.py, a copy of this config.json with the layers
    # cut from 48 to 2
    "llama-4-maverick": dict(
        _source="meta-llama/Llama-4-Maverick-17B-128E-Instruct, its text_config", model_type="llama4_text", hidden_size=5120,
        intermediate_size=8192, intermediate_size_mlp=16384, num_hidden_layers=48, num_attention_heads=40,
        num_key_value_heads=8, head_dim=128, num_local_experts=128, num_experts_per_tok=1, interleave_moe_layer_step=2,
        use_qk_norm=False, attention_chunk_size=8192, vocab_size=202048, max_position_embeddings=1048576,
        rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16",
    ),
}  # fmt: skip
