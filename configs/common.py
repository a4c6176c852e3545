"""Shared config pieces: model presets, the default config tree, and the `key=value,...` arg parser.

Every config file builds on `base_config()`, so that all runs share one schema (and the
validation in `dpo_jax.config_validation` knows every key).
"""

import ml_collections

# Decoder presets. Names follow the checkpoints users start from; `tiny` is the CPU model of
# the quickstart and the tests.
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
                        activation="gelu"),
}


def parse_arg(arg, **defaults):
    """Parses a config arg such as `runlocal,variant=B` into a ConfigDict over `defaults`.

    A bare word sets a boolean default to True. Values are converted to the type of their default.
    """
    result = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"Unknown config arg {key!r}; known: {sorted(defaults)}")
        if not sep:
            result[key] = True
        elif isinstance(defaults[key], bool):
            result[key] = value.lower() in ("1", "true", "yes")
        else:
            result[key] = type(defaults[key])(value) if defaults[key] is not None else value
    return result


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
        norm="layernorm",                 # layernorm | rmsnorm
        norm_eps=1e-5,                    # epsilon of the norms
        activation="gelu",                # gelu (tanh approximation) | gelu_exact | silu | relu
        gated_mlp=False,                  # True: SwiGLU/GeGLU style gate * up projections
        parallel_residual=False,          # True: x + attn(ln1(x)) + mlp(ln2(x)) as in GPT-NeoX / GPT-J
        tie_embeddings=True,              # output projection shares the token embedding
        attention_bias=True,              # biases on q/k/v/o projections
        mlp_bias=True,                    # biases on MLP projections
        dtype="float32",                  # compute dtype (bfloat16 on TPU/GPU)
        param_dtype="float32",            # parameter storage dtype
        remat=False,                      # rematerialise each block in the backward pass
        init_from_hf="",                  # local Hugging Face model dir to start from ("" = random init)
    ))
    model.update(MODEL_PRESETS[preset])
    model.update(overrides)
    return model


def base_config():
    """The full config tree with defaults; run configs override what they need."""
    config = ml_collections.ConfigDict()
    config.stages = ("sft", "dpo")            # stages run in order; each starts from the previous one's params
    config.seed = 0                           # seeds init, data order and dropout-free rngs

    config.model = model_config()

    config.data = ml_collections.ConfigDict(dict(
        name="synthetic",                     # synthetic (built in)
        max_length=24,                        # tokens per sequence (prompt + response)
        max_prompt_length=12,                 # prompt tokens kept (truncated from the left)
        num_train=4096,                       # synthetic: training pairs
        num_eval=256,                         # synthetic: held-out pairs
    ))

    config.train = ml_collections.ConfigDict(dict(
        global_batch_size=32,                 # pairs (DPO) or sequences (SFT) per step, over all devices
        optimizer="adamw",                    # adamw | rmsprop
        b1=0.9,                               # adamw beta1
        b2=0.999,                             # adamw beta2
        weight_decay=0.0,                     # adamw decoupled weight decay
        grad_clip_norm=1.0,                   # global-norm gradient clipping (0 = off)
        log_every_steps=10,                   # train metrics to metrics.jsonl / TensorBoard
    ))

    config.sft = ml_collections.ConfigDict(dict(
        num_steps=200,                        # optimizer steps of the SFT stage
        learning_rate=1e-3,                   # peak learning rate
        warmup_steps=20,                      # linear warmup steps
        schedule="constant",                  # constant | linear | cosine (decay after warmup)
        init_from="",                         # Orbax checkpoint dir to start from ("" = model init)
    ))

    config.dpo = ml_collections.ConfigDict(dict(
        num_steps=100,                        # optimizer steps of the DPO stage
        learning_rate=1e-4,                   # peak learning rate
        warmup_steps=10,                      # linear warmup steps
        schedule="constant",                  # constant | linear | cosine (decay after warmup)
        init_from="",                         # Orbax checkpoint dir to start from ("" = previous stage)
        beta=0.1,                             # how far the policy may move from the reference (--dpo-beta)
        loss_type="sigmoid",                  # preference loss (dpo_jax.losses.LOSS_TYPES)
        label_smoothing=0.0,                  # cDPO: assumed probability that a label is flipped
        reference="live",                     # live: frozen copy of the starting params
    ))
    # Options of particular loss types (dpo_jax.losses); None = unset, not passed to the loss.
    config.dpo.loss_options = ml_collections.ConfigDict()

    config.eval = ml_collections.ConfigDict(dict(
        every_steps=50,                       # evaluate on held-out data every N steps (and at 0 and the end)
        batch_size=64,                        # held-out pairs per eval batch
    ))

    config.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=50,                       # save every N steps (and at the end of a stage)
        max_to_keep=2,                        # checkpoints kept per stage
    ))

    config.mesh = ml_collections.ConfigDict(dict(
        data=-1,                              # data-parallel axis size (-1: all remaining devices)
        fsdp=1,                               # parameter-sharding axis size
        tensor=1,                             # tensor-parallel axis size
    ))
    return config
