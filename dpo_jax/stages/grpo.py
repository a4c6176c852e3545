"""GRPO on the prompts of the pairs: groups of responses sampled in the step, scored by a reward model
or a scorer, advantages relative to the group, no value model; a KL penalty to the frozen start.

The policy starts from `grpo.init_from`, else the run's last policy stage (SFT); that starting
policy is also the frozen reference. The reward model is `grpo.reward_from`, else this run's
reward stage, unless `grpo.reward` names a scorer. The pure functions are in `dpo_jax.grpo`.
"""

import functools

from dpo_jax import grpo
from dpo_jax.stages import base, online


def config_block():
    return base.optimizer_block(
        num_steps=100,                        # (GRPO iterations: num_generations responses to each of
                                              #   train.global_batch_size prompts, and their updates)
        learning_rate=1e-6, warmup_steps=0,
        **online.block_keys(),
        num_generations=8,                    # G: responses sampled per prompt, the group of the advantages
        beta=0.04,                            # weight of the k3 KL penalty to the reference (0: none; TRL: beta)
        loss_type="grpo",                     # grpo: mean over each response's tokens | dr_grpo: token sum / max
                                              #   length | dapo: mean over the minibatch's tokens (TRL's names)
        scale_rewards="group",                # divide advantages by the std of: group | batch | none (Dr. GRPO)
        baseline="mean",                      # mean: the group's mean score | leave_one_out: the others' (RLOO)
        epsilon=0.2,                          # ratio clipping below (and above unless epsilon_high)
        epsilon_high=0.0,                     # ratio clipping above (0 = epsilon; DAPO's clip-higher: 0.28)
        num_epochs=1,                         # optimisation epochs over each rollout (TRL: num_iterations)
        num_minibatches=1,                    # minibatches of responses per epoch (each one optimizer update)
    )


def validate(config):
    block, stages = config.grpo, tuple(config.stages)
    online.check_block(config, "grpo")
    base.check(block.num_generations >= 2, "grpo.num_generations",
               f"must be >= 2 (advantages compare a group's responses), got {block.num_generations}")
    base.check(block.beta >= 0, "grpo.beta", f"must be >= 0, got {block.beta}")
    base.check(block.loss_type in grpo.LOSS_TYPES, "grpo.loss_type",
               f"must be one of {grpo.LOSS_TYPES}, got {block.loss_type!r}")
    base.check(block.scale_rewards in grpo.SCALE_REWARDS, "grpo.scale_rewards",
               f"must be one of {grpo.SCALE_REWARDS}, got {block.scale_rewards!r}")
    base.check(block.baseline in grpo.BASELINES, "grpo.baseline",
               f"must be one of {grpo.BASELINES}, got {block.baseline!r}")
    base.check(block.epsilon > 0 and block.epsilon_high >= 0, "grpo.epsilon",
               "epsilon must be > 0 and epsilon_high >= 0")
    base.check(block.num_epochs > 0, "grpo.num_epochs", "must be > 0")
    rows = config.train.global_batch_size * block.num_generations
    base.check(block.num_minibatches > 0 and ("grpo" not in stages or rows % block.num_minibatches == 0),
               "grpo.num_minibatches", f"must be > 0 and divide the rollout's train.global_batch_size x "
               f"num_generations = {rows} responses")


def plan(config, mesh, model, task=None):
    return online.plan_stage("grpo", config, mesh, model, task,
                                  functools.partial(grpo.grpo_step, grpo_config=config.grpo))


STAGE = base.Stage(name="grpo", data="prompts", config_block=config_block, plan=plan, validate=validate,
                   initial_params=online.initial_params, outputs=lambda params: {"policy": params["policy"]},
                   report=online.report)
