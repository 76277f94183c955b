"""Well-known architectures, bundled as the numbers of their published `config.json` files.

Only the fields the planner reads are kept; each entry names the Hugging Face repository its
numbers come from, so they can be checked. Nothing is downloaded.
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
}  # fmt: skip
