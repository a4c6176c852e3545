"""A Bradley-Terry reward model on the preference pairs: the decoder's trunk under a scalar head.

Starts from the decoder of `reward.init_from` (a policy checkpoint dir), else of the run's last
policy stage, else of the model init, with a fresh scalar head. Its result is the run's reward
model (PPO's reward and the start of its value model), not a policy.
"""

import functools

from dpo_jax import models, planning, steps
from dpo_jax.stages import base


def config_block():
    return base.optimizer_block(num_steps=200, learning_rate=1e-4, warmup_steps=10)


def plan(config, mesh, model, task=None):
    del model, task
    scalar = planning.plan_model(config, mesh, scalar_head=True)
    return planning.plan_train_stage("reward", config, mesh, scalar,
                                     functools.partial(steps.reward_loss, graphdef=scalar.graphdef),
                                     functools.partial(steps.reward_eval_step, graphdef=scalar.graphdef))


def initial_params(config, model, stage_plan, results):
    decoder = base.start_from_policy(config, model, stage_plan, results)
    return models.init_scalar_params(models.decoder_config(config.model), decoder, seed=config.seed,
                                     shardings=stage_plan.param_plan.param_shardings)


STAGE = base.Stage(name="reward", data="pairs", config_block=config_block, plan=plan,
                   initial_params=initial_params, outputs=lambda final: {"reward_model": final})
