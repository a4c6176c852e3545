"""Settings shared by the DPO paper's runs (Rafailov et al. 2023, arXiv:2305.18290, appendix B).

RMSprop, learning rate 1e-6 with 150 linear warmup steps, batch 64, beta 0.1 unless a run says
otherwise; `runlocal` shrinks a run to a tiny model and a few steps that build its whole pipeline
on a CPU in about a minute.
"""

from dpo_jax.configs import presets, schema
from dpo_jax.stages import STAGES


def paper_config(preset, *, stages):
    config = schema.base_config()
    config.stages = stages
    config.model = presets.model_config(preset, dtype="bfloat16")
    config.train.optimizer = "rmsprop"
    config.train.global_batch_size = 64
    config.eval.batch_size = 64
    for stage in STAGES:
        if stage == "pretrain":  # from scratch: its own settings
            continue
        config[stage].learning_rate = 1e-6
        config[stage].warmup_steps = 150
    config.dpo.beta = 0.1
    config.checkpoint.every_steps = 500
    config.eval.every_steps = 500
    config.train.log_every_steps = 10
    return config


def make_runlocal(config, *, max_length=48, max_prompt_length=16):
    """A tiny model (a 512-token vocabulary) and a few steps of every stage on one data-parallel mesh:
    the whole pipeline in seconds to minutes on CPU."""
    config.model = presets.model_config("tiny", vocab_size=512, num_layers=1, embed_dim=32, num_heads=2,
                                       num_kv_heads=2, mlp_dim=64, max_position_embeddings=64,
                                       hf_model_type=config.model.hf_model_type)
    config.mesh.data, config.mesh.fsdp = -1, 1
    config.data.max_length, config.data.max_prompt_length = max_length, max_prompt_length
    config.train.global_batch_size = 8
    config.train.optimizer = "adamw"
    config.train.log_every_steps = 2
    for stage in STAGES:
        config[stage].num_steps = 4
        config[stage].warmup_steps = 1
        config[stage].learning_rate = 1e-3
    config.ppo.num_minibatches = 2
    config.ppo.num_epochs = 1
    config.ppo.max_new_tokens = 8
    config.online_dpo.max_new_tokens = config.grpo.max_new_tokens = 8
    config.grpo.num_generations = 4
    config.eval.every_steps = 4
    config.eval.batch_size = 8
    config.checkpoint.every_steps = 4
    config.evaluation.num_prompts = 8
    config.evaluation.samples_per_prompt = 2
    config.evaluation.max_new_tokens = 8
    config.evaluation.batch_size = 8
    return config
