"""SFT: next-token NLL on the responses of the SFT examples (or the pairs' chosen responses).

Starts from `sft.init_from`, else the run's last policy stage (e.g. pretraining), else the model init.
"""

import functools

from dpo_jax import planning, steps
from dpo_jax.stages import base


def config_block():
    return base.optimizer_block(num_steps=200, learning_rate=1e-3, warmup_steps=20)


def plan(config, mesh, model, task=None, *, name="sft"):
    del task
    loss_fn = functools.partial(steps.sft_loss, graphdef=model.graphdef)
    eval_fn = functools.partial(steps.sft_eval_step, graphdef=model.graphdef)
    return planning.plan_train_stage(name, config, mesh, model, loss_fn, eval_fn)


STAGE = base.Stage(name="sft", data="sft", config_block=config_block, plan=plan)
