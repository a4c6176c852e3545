r"""The DPO paper's reward-KL frontier (its figure 2, left), end to end on 2 CPU cores.

Controlled sentiment generation at a scale this machine runs: a small GPT-2-architecture decoder
is pretrained from scratch on a review corpus the project generates offline (varied sentiment,
dpo_jax/data/reviews.py), fine-tuned on review continuations (SFT), and asked to continue 2-8 word
prefixes. Pairs are 4 completions per prefix sampled from the SFT model, labelled by VADER
(vaderSentiment, a lexicon-based sentiment scorer on PyPI: the stand-in for the paper's
classifier). Then DPO at several betas, PPO with a learned reward model at several KL
coefficients, PPO with the ground-truth reward (PPO-GT), Preferred-FT, Unlikelihood and
Best-of-N, all evaluated on the same held-out prefixes: mean VADER score against the sequence KL
to the SFT model, in <workdir>/results.md and <workdir>/frontier.png.

  python -m dpo_jax.main --config=configs/sentiment_frontier.py --workdir=/tmp/frontier
  python -m dpo_jax.main --config=configs/sentiment_frontier.py:runlocal --workdir=/tmp/frontier_tiny  # CI
"""

from dpo_jax.configs import model_config, paper, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    config = paper.paper_config("tiny", stages=("pretrain", "sft"))
    config.model = model_config("tiny", vocab_size=1024, num_layers=2, embed_dim=128, num_heads=4,
                                       num_kv_heads=4, mlp_dim=512, max_position_embeddings=64)
    config.train.optimizer = "adamw"  # from scratch at this scale; RMSprop at 1e-6 is for fine-tuning large models
    config.train.global_batch_size = 64
    config.data.max_length = 48
    config.data.max_prompt_length = 16
    config.pretrain.update(num_steps=1500, learning_rate=2e-3, warmup_steps=100, schedule="cosine")
    config.sft.update(num_steps=300, learning_rate=5e-4, warmup_steps=20, schedule="constant")
    config.reward.update(num_steps=400, learning_rate=2e-4, warmup_steps=20)
    config.dpo.update(num_steps=300, learning_rate=2e-4, warmup_steps=20)
    config.unlikelihood.update(num_steps=300, learning_rate=2e-4, warmup_steps=20, alpha=1.0)
    config.ppo.update(num_steps=120, learning_rate=5e-5, warmup_steps=5, num_epochs=4, num_minibatches=4,
                      max_new_tokens=24)
    config.eval.every_steps = 100
    config.eval.batch_size = 64
    config.checkpoint.every_steps = 100

    config.evaluation.update(scorer="vader", temperatures=(1.0,), samples_per_prompt=4, num_prompts=256,
                             max_new_tokens=24, batch_size=128)
    config.experiment.update(
        name="controlled_sentiment", generate_corpus=True, corpus_reviews=20000, samples_per_prompt=4,
        num_pair_prompts=2000, dpo_betas=(0.05, 0.1, 0.5, 1.0), ppo_kl_coefs=(0.01, 0.05, 0.1, 0.2),
        ppo_gt_kl_coefs=(0.05,), preferred_ft=True, unlikelihood=True, best_of_n=(4, 16))

    if arg.runlocal:  # every piece of the pipeline, tiny: the CI test
        config = paper.make_runlocal(config, max_length=40, max_prompt_length=16)
        config.experiment.update(corpus_reviews=400, num_pair_prompts=32, dpo_betas=(0.1,), ppo_kl_coefs=(0.05,),
                                 best_of_n=(2,), ipo_betas=(0.1,), online_dpo_betas=(0.1,), grpo_betas=(0.04,))
        config.evaluation.num_prompts = 16
    return config
