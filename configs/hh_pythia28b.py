r"""The DPO paper's single-turn dialogue run: Pythia 2.8B on Anthropic HH (section 6.2, figure 3 right).

SFT of Pythia 2.8B on the chosen responses of HH, then DPO with beta 0.1, evaluated by win rate
against the chosen responses of held-out prompts. The paper's judge is GPT-4; here it is any
command given as `evaluation.judge=command:<cmd>` (reads {"prompt", "a", "b"} JSON lines, prints
P(a is better) per line), or `scorer:<scorer spec>`. Download Pythia 2.8B (safetensors), then:

  python -m dpo_jax.main --config=configs/hh_pythia28b.py:model_dir=/models/pythia-2.8b --workdir=gs://bucket/hh \
      --config.evaluation.judge='command:python my_gpt4_judge.py' --config.mesh.fsdp=8
  python -m dpo_jax.main --config=configs/hh_pythia28b.py:runlocal --workdir=/tmp/hh_tiny \
      --config.data.tokenizer=TOKENIZER_DIR     # CPU, a minute, on ../shared/data/hh-rlhf

`runlocal` trains on the harmless-base file at ../shared/data/hh-rlhf (its `test` split) with a
tiny model; VADER judges (only to exercise the pipeline).

`method=online_dpo` or `method=grpo` replaces DPO by an online stage that samples from the policy:
SFT, a reward model on the HH pairs, then the online stage against it (docs/rlhf.md, "Which
method, when"). Their `runlocal` form scores the samples with VADER instead of a reward model:

  python -m dpo_jax.main --config=configs/hh_pythia28b.py:model_dir=/models/pythia-2.8b,method=grpo \
      --workdir=gs://bucket/hh_grpo --config.mesh.fsdp=8
  python -m dpo_jax.main --config=configs/hh_pythia28b.py:runlocal,method=online_dpo --workdir=/tmp/hh_online \
      --config.data.tokenizer=TOKENIZER_DIR
"""

import os

from dpo_jax.configs import paper, parse_arg

_SHARED_HH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir, "shared", "data",
                          "hh-rlhf")


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, model_dir="", method="dpo")
    if arg.method not in ("dpo", "online_dpo", "grpo"):
        raise ValueError(f"Unknown method {arg.method!r}; known: dpo, online_dpo, grpo")
    online = arg.method != "dpo"
    config = paper.paper_config("pythia-2.8b", stages=("sft", "reward", arg.method) if online else ("sft", "dpo"))
    config.model.init_from_hf = arg.model_dir
    config.data.name = tuple(f"hh_rlhf/{subset}" for subset in ("helpful-base", "harmless-base", "helpful-online",
                                                                  "helpful-rejection-sampled"))
    config.data.max_length = 512
    config.data.max_prompt_length = 256
    config.sft.num_steps = 2000
    config.dpo.num_steps = 2500
    config.dpo.beta = 0.1
    config.reward.num_steps = 2000
    # Responses of up to 128 tokens to 64 prompts per iteration: 2 per prompt for online DPO's pair, a
    # group of 8 for GRPO, whose 512 responses make 4 updates.
    config.online_dpo.update(num_steps=1000, max_new_tokens=128, num_generations=2, beta=0.1)
    config.grpo.update(num_steps=1000, max_new_tokens=128, num_generations=8, num_minibatches=4)
    config.mesh.fsdp = -1
    config.mesh.data = 1
    config.evaluation.update(judge="", temperatures=(0.25, 0.5, 0.75, 1.0), samples_per_prompt=1, num_prompts=256,
                             max_new_tokens=256, batch_size=32)

    if arg.runlocal:
        config = paper.make_runlocal(config, max_length=64, max_prompt_length=48)
        config.data.name = ("hh_rlhf/harmless-base",)
        config.data.manual_dir = _SHARED_HH if os.path.isdir(_SHARED_HH) else ""
        config.data.train_split = config.data.eval_split = "test"  # the split on disk
        config.evaluation.update(judge="scorer:vader", temperatures=(1.0,))
        if online:  # VADER scores the samples: no reward model to train
            config.stages = ("sft", arg.method)
            config[arg.method].update(reward="vader", max_new_tokens=8)
            config.grpo.update(num_generations=4, num_minibatches=2)
    return config
