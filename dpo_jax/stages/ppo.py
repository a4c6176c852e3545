"""RLHF with PPO on the prompts of the pairs: rollouts sampled in the step, a learned reward model
(or a ground-truth scorer: the paper's PPO-GT), a value model, a KL penalty to the frozen start.

The policy starts from `ppo.init_from`, else the run's last policy stage; that starting policy is
also the frozen reference. The reward model is `ppo.reward_from`, else this run's reward stage; the
value model starts as the reward model (as in TRL), or, with a scorer as the reward, as the policy's
decoder under a fresh scalar head. The pure functions are in `dpo_jax.ppo`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import models, planning, ppo, scorers, steps, storage
from dpo_jax.data import synthetic
from dpo_jax.stages import base


def config_block():
    return base.optimizer_block(
        num_steps=100,                        # (PPO iterations: one rollout batch of train.global_batch_size prompts
                                              #   and its updates each)
        learning_rate=1e-5, warmup_steps=0,   # (one optimizer for the policy and the value model)
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
    )


def validate(config):
    ppo_config, stages = config.ppo, tuple(config.stages)
    base.check(not ppo_config.reward_from or storage.isdir(ppo_config.reward_from), "ppo.reward_from",
               f"{ppo_config.reward_from!r} is not a directory")
    base.check("ppo" not in stages or ppo_config.reward != "model" or ppo_config.reward_from
               or ("reward" in stages and stages.index("reward") < stages.index("ppo")),
               "ppo.reward", "'model' needs a reward model: a 'reward' stage before 'ppo' in config.stages, or "
               "ppo.reward_from (a reward stage's checkpoint directory); or set a scorer (PPO-GT)")
    base.check(ppo_config.kl_coef >= 0, "ppo.kl_coef", f"must be >= 0, got {ppo_config.kl_coef}")
    base.check(ppo_config.target_kl > 0 and ppo_config.kl_horizon > 0, "ppo.target_kl",
               "target_kl and kl_horizon must be > 0")
    base.check(ppo_config.num_epochs > 0, "ppo.num_epochs", "must be > 0")
    base.check(ppo_config.num_minibatches > 0 and ("ppo" not in stages
                                                   or config.train.global_batch_size % ppo_config.num_minibatches == 0),
               "ppo.num_minibatches",
               f"must be > 0 and divide train.global_batch_size={config.train.global_batch_size}")
    base.check(ppo_config.clip_range > 0 and ppo_config.clip_range_value > 0, "ppo.clip_range",
               "clip ranges must be > 0")
    base.check(0 <= ppo_config.gamma <= 1 and 0 <= ppo_config.lam <= 1, "ppo.gamma", "gamma and lam must be in [0, 1]")
    base.check(ppo_config.temperature > 0, "ppo.temperature", "must be > 0")
    base.check(ppo_config.max_new_tokens > 0, "ppo.max_new_tokens", "must be > 0")


def _host_reward_fn(scorer, decode):
    """Token arrays of rollouts -> scores of their texts, on the host (PPO calls it via jax.pure_callback)."""
    def texts(ids, lengths):
        return [decode(row[:length].tolist()) for row, length in zip(np.asarray(ids), np.asarray(lengths))]

    def score(prompt_ids, prompt_lengths, response_ids, response_lengths):
        return np.asarray(scorer(texts(prompt_ids, prompt_lengths), texts(response_ids, response_lengths)),
                          np.float32)
    return score


def _rollout_options(config, task):
    """What the rollouts need beyond the config: the end-of-response ids and, for a ground-truth
    reward (PPO-GT), the host function that decodes rollouts and scores them."""
    if task is None:  # shapes only
        return {"eos_ids": (), "host_reward_fn": None}
    tokenizer = task.tokenizer
    eos_ids = tuple(tokenizer.eos_ids) if tokenizer is not None else (synthetic.EOS,)
    host_reward_fn = None
    if config.ppo.reward != "model":
        if tokenizer is None:
            raise ValueError(f"config.ppo.reward={config.ppo.reward!r} scores text, but config.data has no tokenizer")
        host_reward_fn = _host_reward_fn(scorers.make_scorer(config.ppo.reward), tokenizer.decode)
    return {"eos_ids": eos_ids, "host_reward_fn": host_reward_fn}


def plan(config, mesh, model, task=None):
    scalar = planning.plan_model(config, mesh, scalar_head=True)
    param_plan = planning.ModelPlan(None, {"policy": model.abstract_params, "value": scalar.abstract_params},
                                    {"policy": model.param_shardings, "value": scalar.param_shardings})
    trainable = models.trainable_mask(param_plan.abstract_params)
    # PPO's optimizer updates several times per step: its schedule counts updates.
    optimizer, schedule = steps.make_optimizer(config.train, ppo.optimizer_schedule_config(config.ppo), trainable)
    with_reward_model = config.ppo.reward == "model"
    rollout = dict(graphdef=model.graphdef, value_graphdef=scalar.graphdef, ppo_config=config.ppo, pad_id=0,
                   **_rollout_options(config, task))
    step_fn = functools.partial(ppo.ppo_step, optimizer=optimizer, schedule=schedule, trainable=trainable,
                                micro_batches=config.train.grad_accum_steps, **rollout)
    eval_fn = functools.partial(ppo.ppo_eval_step, seed=config.seed, **rollout)
    init_state = lambda start: ppo.init_ppo_state(start["policy"], start["value"], start["reward"], optimizer,
                                                  seed=config.seed, kl_coef=config.ppo.kl_coef)
    abstract_start = {"policy": model.abstract_params, "value": scalar.abstract_params,
                      "reward": scalar.abstract_params if with_reward_model else None}
    ref_shardings = {"reference": model.param_shardings,
                     "reward": scalar.param_shardings if with_reward_model else None}
    return planning.plan_custom_stage("ppo", mesh, param_plan, optimizer, schedule, step_fn, eval_fn, init_state,
                                      abstract_start, trainable=trainable, reference_mode="ppo",
                                      ref_shardings=ref_shardings)


def initial_params(config, model, stage_plan, results):
    """{"policy", "value", "reward"}."""
    policy = base.start_from_policy(config, model, stage_plan, results)
    decoder_config = models.decoder_config(config.model)
    if config.ppo.reward != "model":
        value = models.init_scalar_params(decoder_config, policy, seed=config.seed,
                                          shardings=stage_plan.param_plan.param_shardings["value"])
        return {"policy": policy, "value": value, "reward": None}
    # Validation made sure there is one: reward_from, or this run's reward stage.
    reward = planning.restore_or(config.ppo.reward_from, stage_plan.param_plan.abstract_params["value"],
                                 lambda: results["reward_model"])
    # The value model trains; the reward model stays frozen: separate buffers.
    value = jax.tree.map(lambda x: jnp.array(x, copy=True), reward)
    return {"policy": policy, "value": value, "reward": reward}


STAGE = base.Stage(name="ppo", data="prompts", config_block=config_block, plan=plan, validate=validate,
                   initial_params=initial_params, outputs=lambda params: {"policy": params["policy"]})
