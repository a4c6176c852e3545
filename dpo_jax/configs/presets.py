"""Model presets: the shapes of the checkpoints users start from, and the `config.model` block.

For random-init runs and benchmarks; to start from the weights, set `model.init_from_hf` to the
downloaded directory (the architecture then comes from its config.json). `tiny` is the CPU model of
the quickstart and tests; `tiny-<family>` adds each Hugging Face family's features to it.
"""

import ml_collections

_LLAMA_LIKE = dict(position_embedding="rope", norm="rmsnorm", activation="silu", gated_mlp=True,
                   tie_embeddings=False, attention_bias=False, attention_out_bias=False, mlp_bias=False)
MODEL_PRESETS = {
    "tiny": dict(vocab_size=64, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=4, mlp_dim=256,
                 max_position_embeddings=128),
    "gpt2": dict(vocab_size=50257, num_layers=12, embed_dim=768, num_heads=12, num_kv_heads=12, mlp_dim=3072,
                 max_position_embeddings=1024),
    "gpt2-large": dict(vocab_size=50257, num_layers=36, embed_dim=1280, num_heads=20, num_kv_heads=20,
                       mlp_dim=5120, max_position_embeddings=1024),
    "pythia-2.8b": dict(vocab_size=50304, num_layers=32, embed_dim=2560, num_heads=32, num_kv_heads=32,
                        mlp_dim=10240, max_position_embeddings=2048, position_embedding="rope",
                        rotary_fraction=0.25, rope_theta=10000.0, parallel_residual=True, tie_embeddings=False,
                        activation="gelu_exact", hf_model_type="gpt_neox"),
    "gpt-j-6b": dict(vocab_size=50400, num_layers=28, embed_dim=4096, num_heads=16, num_kv_heads=16,
                     mlp_dim=16384, max_position_embeddings=2048, position_embedding="rope", rotary_fraction=0.25,
                     parallel_residual=True, shared_block_norm=True, tie_embeddings=False, attention_bias=False,
                     attention_out_bias=False, lm_head_bias=True, hf_model_type="gptj"),
    "llama-3.1-8b": dict(_LLAMA_LIKE, vocab_size=128256, num_layers=32, embed_dim=4096, num_heads=32, num_kv_heads=8,
                         mlp_dim=14336, max_position_embeddings=131072, rope_theta=500000.0, rope_scaling="llama3",
                         rope_scaling_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                         rope_original_max_position_embeddings=8192, norm_eps=1e-5, hf_model_type="llama"),
    "llama-3.2-1b": dict(_LLAMA_LIKE, vocab_size=128256, num_layers=16, embed_dim=2048, num_heads=32, num_kv_heads=8,
                         head_dim=64, mlp_dim=8192, max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling="llama3", rope_scaling_factor=32.0, rope_low_freq_factor=1.0,
                         rope_high_freq_factor=4.0, rope_original_max_position_embeddings=8192, norm_eps=1e-5,
                         tie_embeddings=True, hf_model_type="llama"),
    "mistral-7b-v0.1": dict(_LLAMA_LIKE, vocab_size=32000, num_layers=32, embed_dim=4096, num_heads=32,
                            num_kv_heads=8, mlp_dim=14336, max_position_embeddings=32768, sliding_window=4096,
                            norm_eps=1e-5, hf_model_type="mistral"),
    "qwen2.5-0.5b": dict(_LLAMA_LIKE, vocab_size=151936, num_layers=24, embed_dim=896, num_heads=14, num_kv_heads=2,
                         mlp_dim=4864, max_position_embeddings=32768, rope_theta=1000000.0, norm_eps=1e-6,
                         tie_embeddings=True, attention_bias=True, hf_model_type="qwen2"),
    "gemma-2b": dict(_LLAMA_LIKE, vocab_size=256000, num_layers=18, embed_dim=2048, num_heads=8, num_kv_heads=1,
                     head_dim=256, mlp_dim=16384, max_position_embeddings=8192, activation="gelu", norm_eps=1e-6,
                     norm_scale_offset=1.0, scale_embeddings=True, tie_embeddings=True, hf_model_type="gemma"),
}
# `tiny` with each family's features, so every code path (and every export format) runs on CPU in seconds.
_TINY_FAMILY_FEATURES = {
    "gpt_neox": dict(position_embedding="rope", rotary_fraction=0.25, parallel_residual=True, tie_embeddings=False,
                     activation="gelu_exact"),
    "gptj": dict(position_embedding="rope", rotary_fraction=0.5, parallel_residual=True, shared_block_norm=True,
                 tie_embeddings=False, attention_bias=False, attention_out_bias=False, lm_head_bias=True),
    "llama": dict(_LLAMA_LIKE, num_kv_heads=2, rope_scaling="llama3", rope_scaling_factor=8.0,
                  rope_original_max_position_embeddings=32),
    "mistral": dict(_LLAMA_LIKE, num_kv_heads=2, sliding_window=8),
    "qwen2": dict(_LLAMA_LIKE, num_kv_heads=2, attention_bias=True),
    "gemma": dict(_LLAMA_LIKE, num_kv_heads=1, head_dim=32, activation="gelu", norm_scale_offset=1.0,
                  scale_embeddings=True, tie_embeddings=True),
}
MODEL_PRESETS.update({f"tiny-{family}": dict(MODEL_PRESETS["tiny"], hf_model_type=family, **features)
                      for family, features in _TINY_FAMILY_FEATURES.items()})


def model_config(preset="tiny", **overrides):
    """The `config.model` block: a preset plus overrides; every field has a one-line meaning."""
    model = ml_collections.ConfigDict(dict(
        vocab_size=64,                    # tokens in the vocabulary
        num_layers=2,                     # decoder blocks
        embed_dim=64,                     # residual stream width
        num_heads=4,                      # query heads
        num_kv_heads=4,                   # key/value heads (< num_heads: grouped-query attention)
        head_dim=0,                       # 0: embed_dim // num_heads
        mlp_dim=256,                      # hidden width of the MLP
        max_position_embeddings=128,      # longest sequence (size of learned positions, rope cache bound)
        position_embedding="learned",     # learned | rope
        rope_theta=10000.0,               # rotary base frequency
        rotary_fraction=1.0,              # fraction of head_dim that is rotated (GPT-NeoX: 0.25)
        rope_scaling="none",              # none | linear | llama3 (Llama 3.1+ long-context frequencies)
        rope_scaling_factor=1.0,          # linear / llama3: how much the context is stretched
        rope_low_freq_factor=1.0,         # llama3: wavelengths above original / this are slowed by the factor
        rope_high_freq_factor=4.0,        # llama3: wavelengths below original / this are kept
        rope_original_max_position_embeddings=8192,  # llama3: the pretraining context length
        sliding_window=0,                 # attend to the last N positions only (Mistral); 0 = full attention
        norm="layernorm",                 # layernorm | rmsnorm
        norm_eps=1e-5,                    # epsilon of the norms
        norm_scale_offset=0.0,            # rmsnorm multiplies by (offset + scale); Gemma: 1.0
        activation="gelu",                # gelu (tanh approximation) | gelu_exact | silu | relu
        gated_mlp=False,                  # True: SwiGLU/GeGLU style gate * up projections
        parallel_residual=False,          # True: x + attn(ln1(x)) + mlp(ln2(x)) as in GPT-NeoX / GPT-J
        shared_block_norm=False,          # parallel residual through one norm, x + attn(ln(x)) + mlp(ln(x)) (GPT-J)
        tie_embeddings=True,              # output projection shares the token embedding
        scale_embeddings=False,           # multiply token embeddings by sqrt(embed_dim) (Gemma)
        attention_bias=True,              # biases on q/k/v projections
        attention_out_bias=True,          # bias on the attention output projection (Qwen2: False with q/k/v True)
        mlp_bias=True,                    # biases on MLP projections
        lm_head_bias=False,               # bias on an untied output projection (GPT-J)
        hf_model_type="gpt2",             # Hugging Face format save_hf writes: gpt2 | gpt_neox | gptj | llama |
                                          #   mistral | qwen2 | gemma (set from config.json with init_from_hf)
        dtype="auto",                     # compute dtype: auto = bfloat16 on TPU/GPU, float32 on CPU; log-probs,
                                          #   losses and norms' statistics are float32 whatever it is
        param_dtype="float32",            # parameter storage dtype
        remat=False,                      # rematerialise each block in the backward pass
        attention_kernel="auto",          # training attention: auto = splash on TPU, pallas_gpu on GPU, dense on
                                          #   CPU | dense (the masked path below) | splash | pallas_gpu (fused
                                          #   kernels taking segment ids; interpret mode on CPU); docs/models.md
        attention_kernel_block_size=128,  # the fused kernels' query and key block (splash: a multiple of 128)
        attention_block_size=0,           # dense path: 0 = jax.nn.dot_product_attention; > 0: blockwise attention
                                          #   skipping fully masked blocks of this size (packed rows on CPU)
        fused_qkv=True,                   # one matmul for the query, key and value projections, their kernels
                                          #   interleaved per tensor-parallel slice (the split stays local); not
                                          #   with LoRA on them
        fused_gate_up=True,               # gated MLPs: one matmul for the gate and up projections, interleaved per
                                          #   tensor-parallel slice; not with LoRA on them
        fused_parallel_inputs=True,       # parallel blocks with one norm (GPT-J): one matmul for q, k, v and the
                                          #   MLP's input (with fused_qkv); not with LoRA on them
        logits_chunk_size=128,            # training log-probs from logits of the scored (response) tokens only, this
                                          #   many per row at a time (memory bounded in the vocabulary); 0: full logits
        init_from_hf="",                  # local Hugging Face model dir to start from ("" = random init); its
                                          #   config.json then decides the architecture fields above
        lora=ml_collections.ConfigDict(dict(
            rank=0,                       # LoRA adapter rank; 0 = no adapters (full fine-tuning)
            alpha=16.0,                   # adapter output scale is alpha / rank
            targets=("query", "key", "value", "out", "gate", "up", "down"),  # projections that get adapters
        )),
    ))
    model.update(MODEL_PRESETS[preset])
    model.update(overrides)
    return model
