"""RLHF with PPO on the prompts of the pairs: rollouts sampled in the step, a learned reward model
(or a ground-truth scorer: the paper's PPO-GT), a value model, a KL penalty to the frozen start.

The policy starts from `ppo.init_from`, else the run's last policy stage; that starting policy is
also the frozen reference. The reward model is `ppo.reward_from`, else this run's reward stage; the
value model starts as the reward model (as in TRL), or, with a scorer as the reward, as the policy's
decoder under a fresh scalar head. The pure functions are in `dpo_jax.ppo`.
"""

import functools

from dpo_jax import models, planning, ppo, rollout, steps
from dpo_jax.stages import base, online


def config_block():
    return base.optimizer_block(
        num_steps=100,                        # (PPO iterations: one rollout batch of train.global_batch_size prompts
                                              #   and its updates each)
        learning_rate=1e-5, warmup_steps=0,   # (one optimizer for the policy and the value model)
        **online.block_keys(),               # (reward_from: also the value model's start)
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
    )


def validate(config):
    ppo_config, stages = config.ppo, tuple(config.stages)
    online.check_block(config, "ppo")
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


def plan(config, mesh, model, task=None):
    scalar = planning.plan_model(config, mesh, scalar_head=True)
    param_plan = planning.ModelPlan(None, {"policy": model.abstract_params, "value": scalar.abstract_params},
                                    {"policy": model.param_shardings, "value": scalar.param_shardings})
    trainable = models.trainable_mask(param_plan.abstract_params)
    # PPO's optimizer updates several times per step: its schedule counts updates.
    optimizer, schedule = steps.make_optimizer(config.train, rollout.updates_schedule_config(config.ppo), trainable)
    with_reward_model = config.ppo.reward == "model"
    options = dict(graphdef=model.graphdef, value_graphdef=scalar.graphdef, pad_id=0,
                   **online.rollout_options(config, "ppo", task))
    step_fn = functools.partial(ppo.ppo_step, ppo_config=config.ppo, optimizer=optimizer, schedule=schedule,
                                trainable=trainable, micro_batches=config.train.grad_accum_steps, **options)
    eval_fn = functools.partial(rollout.eval_step, block=config.ppo, seed=config.seed, **options)
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
    reward = online.reward_model(config, "ppo", stage_plan.param_plan.abstract_params["value"], results)
    # The value model trains; the reward model stays frozen: separate buffers.
    value = rollout.copy_tree(reward)
    return {"policy": policy, "value": value, "reward": reward}


STAGE = base.Stage(name="ppo", data="prompts", config_block=config_block, plan=plan, validate=validate,
                   initial_params=initial_params, outputs=lambda params: {"policy": params["policy"]},
                   report=online.report)
