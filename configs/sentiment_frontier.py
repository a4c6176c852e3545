r"""The DPO paper's reward-KL frontier (its figure 2, left), end to end on 2 CPU cores.

Controlled sentiment generation at a scale this machine runs: a small GPT-2-architecture decoder
is pretrained from scratch on a review corpus the project generates offline (varied sentiment,
dpo_jax/data/reviews.py), fine-tuned on review continuations (SFT), and asked to continue 2-8 word
prefixes. Pairs are 4 completions per prefix sampled from the SFT model, labelled by VADER
(vaderSentiment, a lexicon-based sentiment scorer on PyPI: the stand-in for the paper's
classifier). Then DPO at the paper's betas and 3 learning rates, PPO with a learned reward model
to the paper's 4 target KLs, DPO, PPO and online DPO at 3 seeds each, PPO with the ground-truth
reward (PPO-GT), IPO, GRPO, Preferred-FT, Unlikelihood and Best-of-N. Every run is evaluated
every 50 steps on the same held-out prefixes (common random numbers): mean VADER score against
the sequence KL to the SFT model. <workdir>/budgets.md gives each method's best score within KL
budgets over seeds, <workdir>/frontier.png the trajectories and each method's envelope.

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
    config.dpo.update(num_steps=150, learning_rate=2e-4, warmup_steps=20)
    config.unlikelihood.update(num_steps=150, learning_rate=2e-4, warmup_steps=20, alpha=1.0)
    config.ppo.update(num_steps=100, learning_rate=5e-5, warmup_steps=5, num_epochs=4, num_minibatches=4,
                      max_new_tokens=24, kl_coef=0.1, kl_horizon=500)
    config.online_dpo.update(num_steps=100, learning_rate=5e-5, warmup_steps=5, num_epochs=4, num_minibatches=4,
                             max_new_tokens=24)
    config.grpo.update(num_steps=100, learning_rate=5e-5, warmup_steps=5, num_generations=4, num_minibatches=4,
                       max_new_tokens=24)
    config.eval.every_steps = 100
    config.eval.batch_size = 64
    config.checkpoint.every_steps = 100

    # Every run's policy every 50 steps on the same 128 held-out prefixes, 4 samples each.
    config.evaluation.update(scorer="vader", temperatures=(1.0,), samples_per_prompt=4, num_prompts=128,
                             max_new_tokens=24, batch_size=128)
    config.experiment.update(
        name="controlled_sentiment", generate_corpus=True, corpus_reviews=20000, samples_per_prompt=4,
        num_pair_prompts=2000,
        dpo_betas=(0.05, 0.1, 1.0, 5.0), dpo_learning_rates=(1.5e-5, 5e-5, 1.5e-4),  # the paper's betas
        ppo_target_kls=(3.0, 6.0, 9.0, 12.0),  # adaptive KL from kl_coef 0.1, as the paper's PPO runs
        ppo_gt_kl_coefs=(0.05,), online_dpo_betas=(0.1,), grpo_betas=(0.04,), ipo_betas=(0.1,),
        preferred_ft=True, unlikelihood=True, best_of_n=(4, 16),
        num_seeds=3, seeded_methods=("dpo", "ppo", "online_dpo"), trajectory_every=50,
        kl_budgets=(1.0, 2.0, 5.0, 10.0))

    if arg.runlocal:  # every piece of the pipeline, tiny: the CI test
        config = paper.make_runlocal(config, max_length=40, max_prompt_length=16)
        config.experiment.update(corpus_reviews=400, num_pair_prompts=32, dpo_betas=(0.1,),
                                 dpo_learning_rates=(1e-3, 3e-3), ppo_target_kls=(6.0,), best_of_n=(2,),
                                 num_seeds=2, seeded_methods=("dpo",), trajectory_every=2)
        config.evaluation.num_prompts = 16
    return config
