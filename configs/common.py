"""Shared config pieces: model presets, the default config tree, and the `key=value,...` arg parser.

Every config file builds on `base_config()`, so that all runs share one schema (and the
validation in `dpo_jax.configuration` knows every key).
"""

import ml_collections

# Decoder presets: the shapes of the checkpoints users start from, for random-init runs and
# benchmarks (to start from the weights, set `model.init_from_hf` to the downloaded directory;
# the architecture then comes from its config.json). `tiny` is the CPU model of the quickstart and tests.
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
        dtype="float32",                  # compute dtype (bfloat16 on TPU/GPU)
        param_dtype="float32",            # parameter storage dtype
        remat=False,                      # rematerialise each block in the backward pass
        attention_block_size=0,           # 0: jax.nn.dot_product_attention (fused on TPU/GPU); > 0: blockwise
                                          #   attention skipping fully masked blocks of this size (packed rows on CPU)
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


def base_config():
    """The full config tree with defaults; run configs override what they need."""
    config = ml_collections.ConfigDict()
    config.stages = ("sft", "dpo")            # stages run in order; each starts from the previous one's params
    config.seed = 0                           # seeds init, data order and dropout-free rngs

    config.model = model_config()

    config.data = ml_collections.ConfigDict(dict(
        name="synthetic",                     # synthetic | hh_rlhf/<helpful-base|harmless-base|helpful-online|
                                              #   helpful-rejection-sampled> | stanford_shp | ultrafeedback_binarized |
                                              #   tldr_comparisons | imdb_prefixes | preference_files; "a,b": a mixture
        weights=(),                           # mixture weights, one per name (empty: equal)
        data_dir="",                          # where TFDS prepares datasets ("": TFDS's default ~/tensorflow_datasets)
        manual_dir="",                        # raw files already on disk, laid out as their source repo ("": download)
        train_files="",                       # preference_files: comma-separated preference files (train split)
        eval_files="",                        # preference_files: preference files of the "test" split
        sft_train_files="",                   # preference_files: SFT files ({prompt, completion} or {messages})
        sft_eval_files="",                    # preference_files: held-out SFT files
        pretrain_files="",                    # pretrain stage: comma-separated JSONL files of {"text": ...} (any
                                              #   data.name; "" with synthetic: its pairs' prompt + chosen ids)
        pretrain_eval_files="",               # pretrain stage: held-out {"text": ...} files
        train_split="train",                  # split DPO trains on
        eval_split="test",                    # split DPO evaluates on (tldr_comparisons, stanford_shp: validation)
        sft_split="",                         # split SFT trains on ("": the chosen responses of train_split)
        sft_eval_split="",                    # split SFT evaluates on ("": the chosen responses of eval_split)
        tokenizer="",                         # Hugging Face model dir (or its tokenizer.json); "": model.init_from_hf
        chat_template=False,                  # render examples that have chat messages with the tokenizer's template
        check_boundaries=True,                # assert ids(prompt) + ids(response) == ids(prompt + response)
        on_bad_example="error",               # error | skip: a bad record raises (naming file and line) or is counted
        layout="padded",                      # padded | packed | prefix_shared | packed_prefix_shared
        row_length=0,                         # packed: tokens per row, >= max_length (0: 2 * max_length, fits any pair)
        max_pairs_per_row=8,                  # packed layouts: pairs per row at most (SFT: twice as many sequences)
        max_length=24,                        # tokens per sequence (prompt + response)
        max_prompt_length=12,                 # prompt tokens kept (truncated from the left, keeping a BOS)
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
        grad_accum_steps=1,                   # micro-batches per step (gradient accumulation; same update)
        max_nonfinite_steps=10,               # stop after this many steps in a row with a non-finite loss/gradient
        log_every_steps=10,                   # train metrics to metrics.jsonl / TensorBoard
    ))

    config.pretrain = ml_collections.ConfigDict(dict(
        num_steps=1000,                       # optimizer steps of next-token training on whole texts
        learning_rate=1e-3,                   # peak learning rate
        warmup_steps=50,                      # linear warmup steps
        schedule="cosine",                    # constant | linear | cosine (decay after warmup)
        init_from="",                         # Orbax checkpoint dir to start from ("" = model init)
    ))

    config.sft = ml_collections.ConfigDict(dict(
        num_steps=200,                        # optimizer steps of the SFT stage
        learning_rate=1e-3,                   # peak learning rate
        warmup_steps=20,                      # linear warmup steps
        schedule="constant",                  # constant | linear | cosine (decay after warmup)
        init_from="",                         # Orbax checkpoint dir to start from ("" = previous stage, else model init)
    ))

    config.reward = ml_collections.ConfigDict(dict(
        num_steps=200,                        # optimizer steps of the reward model (Bradley-Terry on the DPO pairs)
        learning_rate=1e-4,                   # peak learning rate
        warmup_steps=10,                      # linear warmup steps
        schedule="constant",                  # constant | linear | cosine (decay after warmup)
        init_from="",                         # policy checkpoint dir whose decoder it starts from, with a fresh
                                              #   scalar head ("" = the last policy stage of the run)
    ))

    config.unlikelihood = ml_collections.ConfigDict(dict(
        num_steps=100,                        # optimizer steps of the Unlikelihood baseline on the DPO pairs
        learning_rate=1e-4,                   # peak learning rate
        warmup_steps=10,                      # linear warmup steps
        schedule="constant",                  # constant | linear | cosine (decay after warmup)
        init_from="",                         # Orbax checkpoint dir to start from ("" = previous policy stage)
        alpha=1.0,                            # weight of the unlikelihood term on the rejected response's tokens
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
        reference="live",                     # live: frozen copy of the starting params, run in the step |
                                              #   precomputed: reference log-probs computed once, no reference
                                              #   model in training | lora: the weights with adapters off
        reference_cache_dir="",               # precomputed: where reference log-probs are cached and reused
                                              #   ("" = <workdir>/reference_logps)
        reference_dtype="",                   # live: store the reference in this dtype ("" = as params; bfloat16)
        reference_update_every=0,             # TR-DPO: move the reference toward the policy every N steps (0 = off)
        reference_update_alpha=0.5,           # TR-DPO: reference <- alpha * policy + (1 - alpha) * reference
    ))
    # Options of particular loss types (dpo_jax.losses); None = unset, not passed to the loss.
    unset = lambda field_type: ml_collections.FieldReference(None, field_type=field_type)
    config.dpo.loss_options = ml_collections.ConfigDict(dict(
        loss_weights=unset(str),              # a mixture's weights, e.g. "0.8,0.2,1.0" with loss_type "a,b,c"
        simpo_gamma=unset(float),             # simpo: target margin gamma (--simpo-gamma)
        rpo_alpha=unset(float),               # rpo: weight of the NLL term on the chosen response (--rpo-alpha)
        ipo_length_normalize=unset(bool),     # ipo: average log-ratios over tokens (default True)
        discopop_tau=unset(float),            # discopop: temperature tau
        f_divergence_type=unset(str),         # reverse_kl | forward_kl | js_divergence | alpha_divergence
        f_alpha=unset(float),                 # alpha_divergence: alpha
        use_weighting=unset(bool),            # WPO weighting of each pair's loss
    ))

    config.ppo = ml_collections.ConfigDict(dict(
        num_steps=100,                        # PPO iterations: one rollout batch (train.global_batch_size prompts)
                                              #   and its updates each
        learning_rate=1e-5,                   # peak learning rate (policy and value model, one optimizer)
        warmup_steps=0,                       # linear warmup steps
        schedule="constant",                  # constant | linear | cosine (decay after warmup)
        init_from="",                         # policy checkpoint dir to start from ("" = previous policy stage);
                                              #   the starting policy is also the frozen reference
        reward_from="",                       # reward-stage checkpoint dir: the reward model and the value model's
                                              #   start ("" = this run's reward stage)
        reward="model",                       # model: the learned reward model | a scorer spec (e.g. "vader",
                                              #   "command:<cmd>"): the ground-truth reward (the paper's PPO-GT)
        kl_coef=0.05,                         # per-token KL penalty coefficient (initial value if adaptive)
        adaptive_kl=False,                    # adapt kl_coef towards target_kl (Ziegler et al. 2019)
        target_kl=6.0,                        # adaptive: target sequence KL in nats
        kl_horizon=10000,                     # adaptive: horizon (in rollouts) of the proportional controller
        num_epochs=4,                         # optimisation epochs over each rollout batch
        num_minibatches=4,                    # minibatches per epoch (each one optimizer update)
        clip_range=0.2,                       # policy ratio clipping
        clip_range_value=0.2,                 # value prediction clipping around the rollout's values
        value_coef=0.1,                       # weight of the value loss
        gamma=1.0,                            # discount
        lam=0.95,                             # GAE lambda
        whiten_rewards=False,                 # whiten the per-token rewards before GAE
        temperature=1.0,                      # rollout sampling temperature
        max_new_tokens=24,                    # rollout response length at most (EOS ends a response earlier)
    ))

    config.evaluation = ml_collections.ConfigDict(dict(
        scorer="",                            # what scores samples: vader | command:<cmd> | reward_model:<dir> |
                                              #   hf_classifier:<dir> ("" = no sample evaluation)
        judge="",                             # win rates against reference responses: command:<cmd> |
                                              #   scorer:<scorer spec>, e.g. scorer:reward_model:<dir> ("" = none)
        temperatures="1.0",                   # sampling temperatures, comma-separated
        samples_per_prompt=4,                 # samples drawn per held-out prompt and temperature
        num_prompts=256,                      # held-out prompts evaluated (the first N of the eval split)
        max_new_tokens=24,                    # sampled response length at most
        batch_size=64,                        # prompts per sampling batch
    ))

    config.experiment = ml_collections.ConfigDict(dict(
        name="",                              # "": one run of config.stages | controlled_sentiment: the DPO paper's
                                              #   IMDb pipeline (dpo_jax/experiment.py): a base run of config.stages,
                                              #   pairs sampled from it and labelled by a scorer, a reward model, then
                                              #   one run per method below, all evaluated on the same prompts
        generate_corpus=False,                # train on a review corpus generated offline (dpo_jax/data/reviews.py)
        corpus_reviews=20000,                 # generate_corpus: pretraining reviews (SFT gets a fifth more)
        samples_per_prompt=4,                 # completions sampled per prompt; every two with different scores make a pair
        num_pair_prompts=0,                   # training prompts sampled for pairs (0 = all)
        pair_scorer="",                       # the ground-truth scorer labelling pairs ("" = evaluation.scorer)
        dpo_betas="0.1",                      # one DPO run per beta (comma-separated)
        ppo_kl_coefs="",                      # one PPO run (learned reward model) per KL coefficient
        ppo_gt_kl_coefs="",                   # one PPO-GT run (reward = the pair scorer) per KL coefficient
        preferred_ft=False,                   # Preferred-FT: SFT on the chosen responses of the pairs
        unlikelihood=False,                   # Unlikelihood on the pairs
        best_of_n="",                         # Best-of-N against the reward model, one evaluation per N
    ))

    config.eval = ml_collections.ConfigDict(dict(
        every_steps=50,                       # evaluate on held-out data every N steps (and at 0 and the end)
        batch_size=64,                        # held-out pairs per eval batch
    ))

    config.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=50,                       # save every N steps (and at the end of a stage, and on SIGTERM)
        every_minutes=0.0,                    # also save when this many minutes passed since the last save (0 = off)
        max_to_keep=2,                        # the latest checkpoints kept per stage
        best_metric="",                       # also keep the best checkpoint by this eval metric (e.g. loss)
        best_mode="min",                      # min | max: which value of best_metric is best
    ))

    config.mesh = ml_collections.ConfigDict(dict(
        dcn=1,                                # data-parallel axis across TPU slices (multi-slice runs)
        data=-1,                              # data-parallel axis size (-1: all remaining devices)
        fsdp=1,                               # parameter-sharding axis size
        tensor=1,                             # tensor-parallel axis size
    ))
    return config
