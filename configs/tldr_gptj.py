r"""The DPO paper's summarisation run: GPT-J 6B on Reddit TL;DR (section 6.2, figure 3 left).

SFT of GPT-J on the filtered TL;DR posts, then DPO with beta 0.5 on the human comparisons
(`tldr_comparisons`), evaluated by win rate against the reference summaries at temperatures 0, 0.25,
0.5, 0.75 and 1.0. The paper's judge is GPT-4; here it is any command given as
`evaluation.judge=command:<cmd>` (reads {"prompt", "a", "b"} JSON lines, prints P(a is better) per line),
or `scorer:<scorer spec>`. Download GPT-J (safetensors) first, then:

  python -m dpo_jax.main --config=configs/tldr_gptj.py:model_dir=/models/gpt-j-6b --workdir=gs://bucket/tldr \
      --config.evaluation.judge='command:python my_gpt4_judge.py' --config.mesh.fsdp=8
  python -m dpo_jax.main --config=configs/tldr_gptj.py:runlocal --workdir=/tmp/tldr_tiny \
      --config.data.manual_dir=DIR --config.data.tokenizer=TOKENIZER_DIR    # CPU, a minute

`runlocal`: a tiny model and a few steps; the raw TL;DR files and a tokenizer come from the
command line, and VADER judges (only to exercise the pipeline).
"""

from dpo_jax.configs import paper, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, model_dir="")
    config = paper.paper_config("gpt-j-6b", stages=("sft", "dpo"))
    config.model.init_from_hf = arg.model_dir
    config.model.remat = True
    config.data.name = ("tldr_comparisons",)
    config.data.train_split, config.data.eval_split = "train", "validation"
    config.data.sft_split, config.data.sft_eval_split = "sft_train", "sft_validation"
    config.data.max_length = 640
    config.data.max_prompt_length = 512
    config.sft.num_steps = 2000
    config.dpo.num_steps = 1500
    config.dpo.beta = 0.5
    config.mesh.fsdp = -1
    config.mesh.data = 1
    config.evaluation.update(judge="", temperatures=(0.0, 0.25, 0.5, 0.75, 1.0), samples_per_prompt=1, num_prompts=256,
                             max_new_tokens=128, batch_size=32)

    if arg.runlocal:
        config = paper.make_runlocal(config, max_length=64, max_prompt_length=48)
        config.evaluation.update(judge="scorer:vader", temperatures=(0.0, 1.0))
    return config
