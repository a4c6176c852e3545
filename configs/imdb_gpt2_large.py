r"""The DPO paper's controlled sentiment generation: GPT-2 large on IMDb (section 6.1, figure 2).

SFT of GPT-2 large on IMDb reviews for one epoch; prompts are 2-8 word prefixes of reviews (the
paper says tokens; words keep the prefix independent of the tokenizer); 4 completions per prefix
are sampled from the SFT model and every two with different sentiment scores make a preference
pair, labelled by a sentiment classifier (the paper: siebert/sentiment-roberta-large-english, any
Hugging Face sequence classifier works); then DPO at betas 0.05, 0.1, 1 and 5, PPO with adaptive
KL to targets 3, 6, 9 and 12, PPO-GT, Preferred-FT, Unlikelihood and Best-of-N, every run
evaluated every 100 steps on held-out prefixes (reward against the sequence KL from policy
samples: the whole of figure 2, left). Download gpt2-large and the classifier first
(safetensors), then:

  python -m dpo_jax.main --config=configs/imdb_gpt2_large.py:model_dir=/models/gpt2-large,classifier=/models/siebert \
      --workdir=gs://bucket/imdb --config.data.data_dir=gs://bucket/tfds
  python -m dpo_jax.main --config=configs/imdb_gpt2_large.py:runlocal --workdir=/tmp/imdb_tiny   # CPU, minutes

`runlocal` runs the same pipeline with a tiny model on the generated review corpus and VADER as the
classifier (no downloads).
"""

from dpo_jax.configs import paper, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, model_dir="", classifier="")
    config = paper.paper_config("gpt2-large", stages=("sft",))
    config.model.init_from_hf = arg.model_dir
    config.data.name = ("imdb_prefixes",)
    config.data.sft_split, config.data.sft_eval_split = "sft_train", "sft_test"
    config.data.max_length = 64           # prefix + completion, as the paper's short continuations
    config.data.max_prompt_length = 16
    config.sft.num_steps = -(-25_000 // config.train.global_batch_size)  # one epoch of the training reviews (C.1)
    config.reward.num_steps = 1000
    config.dpo.num_steps = 2000
    config.ppo.update(num_steps=500, max_new_tokens=48, kl_coef=0.1)
    config.evaluation.update(scorer=f"hf_classifier:{arg.classifier}" if arg.classifier else "", temperatures=(1.0,),
                             samples_per_prompt=4, num_prompts=512, max_new_tokens=48, batch_size=64)
    config.experiment.update(
        name="controlled_sentiment", samples_per_prompt=4, dpo_betas=(0.05, 0.1, 1.0, 5.0),
        ppo_target_kls=(3.0, 6.0, 9.0, 12.0),  # the paper's PPO: adaptive KL to these targets, from kl_coef 0.1
        ppo_gt_kl_coefs=(0.05, 0.1), preferred_ft=True, unlikelihood=True, best_of_n=(16, 64, 128),
        trajectory_every=100)  # every run evaluated every 100 steps, as the paper's figure 2

    if arg.runlocal:  # the same pipeline on the generated reviews, tiny, scored by VADER
        config = paper.make_runlocal(config, max_length=40, max_prompt_length=16)
        config.data.name = ("synthetic",)  # replaced by the generated corpus's files
        config.evaluation.scorer = "vader"
        config.evaluation.num_prompts = 16
        config.experiment.update(generate_corpus=True, corpus_reviews=400, num_pair_prompts=32, dpo_betas=(0.1,),
                                 ppo_target_kls=(6.0,), ppo_gt_kl_coefs=(), unlikelihood=False, best_of_n=(2,),
                                 trajectory_every=2)
    return config
