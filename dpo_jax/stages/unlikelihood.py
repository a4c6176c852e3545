"""The Unlikelihood baseline on the preference pairs: likelihood on the chosen response, token-level
unlikelihood on the rejected one (`losses.unlikelihood_loss`).

Starts from `unlikelihood.init_from`, else the run's last policy stage, else the model init.
"""

import functools

from dpo_jax import planning, steps
from dpo_jax.stages import base


def config_block():
    return base.optimizer_block(
        num_steps=100, learning_rate=1e-4, warmup_steps=10,
        alpha=1.0,                            # weight of the unlikelihood term on the rejected response's tokens
    )


def validate(config):
    base.check(config.unlikelihood.alpha >= 0, "unlikelihood.alpha", "must be >= 0")


def plan(config, mesh, model, task=None):
    del task
    alpha = config.unlikelihood.alpha
    return planning.plan_train_stage(
        "unlikelihood", config, mesh, model,
        functools.partial(steps.unlikelihood_loss, graphdef=model.graphdef, alpha=alpha),
        functools.partial(steps.unlikelihood_eval_step, graphdef=model.graphdef, alpha=alpha))


STAGE = base.Stage(name="unlikelihood", data="pairs", config_block=config_block, plan=plan, validate=validate)
