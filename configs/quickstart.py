r"""The embedded default: a synthetic preference task, SFT then DPO of a tiny decoder on CPU.

The task (dpo_jax/data/synthetic.py): a prompt names a mood; responses are word sequences, and of two
responses the one with more words of the prompt's mood is preferred. SFT learns to answer on the
chosen responses; DPO then moves the policy away from the frozen SFT model towards the preferred
mood. Finishes in a few minutes on 2 CPU cores.

  python -m dpo_jax.main --config=configs/quickstart.py --workdir=/tmp/dpo_quickstart
  python -m dpo_jax.main --config=configs/quickstart.py:runlocal --workdir=/tmp/dpo_tiny   # seconds
  python -m dpo_jax.main --config=configs/quickstart.py:method=grpo --workdir=/tmp/grpo_quickstart

`method` picks the preference stage after SFT: dpo (offline, on the task's pairs), or one of the
online stages, which sample from the policy and learn from a reward model trained first on the
pairs: online_dpo, grpo or ppo (stages sft, reward, <method>).
  python -m dpo_jax.bench --mode=state_memory --config=configs/quickstart.py:model=pythia-2.8b
"""

from dpo_jax.configs import base_config, model_config, parse_arg

METHODS = ("dpo", "online_dpo", "grpo", "ppo")


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, model="", method="dpo")
    config = base_config()
    if arg.method not in METHODS:
        raise ValueError(f"Unknown method {arg.method!r}; known: {', '.join(METHODS)}")
    if arg.method != "dpo":
        config.stages = ("sft", "reward", arg.method)
        config.reward.num_steps = 100
        # The tiny model from scratch moves at rates far above a pretrained model's defaults.
        config.online_dpo.learning_rate = 1e-4
        config.grpo.learning_rate = 5e-5
    if arg.model:  # a preset of dpo_jax/configs/presets.py, e.g. `:model=gpt2` to plan memory with bench
        config.model = model_config(arg.model)
    if arg.runlocal:
        # Just enough to exercise every piece: used by the end-to-end tests.
        config.data.num_train = 256
        config.data.num_eval = 64
        config.model.num_layers = 1
        config.model.embed_dim = 32
        config.model.mlp_dim = 64
        config.train.global_batch_size = 8
        config.train.log_every_steps = 2
        config.sft.num_steps = 6
        config.sft.warmup_steps = 2
        config.dpo.num_steps = 6
        config.dpo.warmup_steps = 2
        config.eval.every_steps = 3
        config.eval.batch_size = 16
        config.checkpoint.every_steps = 3
        config.reward.num_steps = 6
        for method in METHODS[1:]:
            config[method].update(num_steps=6, max_new_tokens=8)
        config.online_dpo.learning_rate = config.grpo.learning_rate = 1e-3
        config.grpo.num_generations = 4
        config.ppo.num_minibatches = 2
    return config
