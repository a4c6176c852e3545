"""Online and iterative DPO on the prompts of the pairs: pairs sampled from the policy in the step,
labelled by a reward model, a scorer or a judge, DPO updates against the frozen reference.

The policy starts from `online_dpo.init_from`, else the run's last policy stage (SFT); that
starting policy is also the frozen reference (and, iterative with `round_reference`, each round's
start). The reward model is `online_dpo.reward_from`, else this run's reward stage, unless
`online_dpo.reward` names a scorer or `online_dpo.judge` a judge. The pure functions are in
`dpo_jax.online_dpo`.
"""

import functools

from dpo_jax import online_dpo
from dpo_jax.stages import base, online


def config_block():
    return base.optimizer_block(
        num_steps=100,                        # (iterations: a pair sampled for each of train.global_batch_size
                                              #   prompts, and its DPO updates)
        learning_rate=5e-7, warmup_steps=0,
        **online.block_keys(),
        judge="",                             # a judge spec ("scorer:<spec>", "command:<cmd>") that prefers one of
                                              #   two responses, instead of scores (needs num_generations=2)
        num_generations=2,                    # responses sampled per prompt; the best and worst make its pair
        beta=0.1,                             # DPO's beta (a constant; see beta_schedule)
        beta_schedule=(),                     # betas for equal spans of num_steps, in order (TRL's list of betas)
        loss_type="sigmoid",                  # sigmoid (DPO) | ipo
        round_steps=0,                        # 0: online, pairs of the current policy | N: iterative DPO, pairs of
                                              #   a snapshot of the policy taken every N iterations (a round)
        round_reference=True,                 # iterative: each round's DPO reference is its snapshot
        num_epochs=1,                         # optimisation epochs over each iteration's pairs
        num_minibatches=1,                    # minibatches of pairs per epoch (each one optimizer update)
    )


def validate(config):
    block, stages = config.online_dpo, tuple(config.stages)
    online.check_block(config, "online_dpo")
    base.check(block.num_generations >= 2, "online_dpo.num_generations",
               f"must be >= 2 (a pair needs two responses), got {block.num_generations}")
    base.check(not block.judge or block.num_generations == 2, "online_dpo.judge",
               f"a judge compares two responses: needs online_dpo.num_generations=2, got {block.num_generations}")
    base.check(block.beta > 0 and all(beta > 0 for beta in block.beta_schedule), "online_dpo.beta",
               "beta and every beta of online_dpo.beta_schedule must be > 0")
    base.check(block.loss_type in online_dpo.LOSS_TYPES, "online_dpo.loss_type",
               f"must be one of {online_dpo.LOSS_TYPES}, got {block.loss_type!r}")
    base.check(block.round_steps >= 0, "online_dpo.round_steps", f"must be >= 0, got {block.round_steps}")
    base.check(block.num_epochs > 0, "online_dpo.num_epochs", "must be > 0")
    base.check(block.num_minibatches > 0 and ("online_dpo" not in stages
                                              or config.train.global_batch_size % block.num_minibatches == 0),
               "online_dpo.num_minibatches",
               f"must be > 0 and divide the iteration's train.global_batch_size={config.train.global_batch_size} "
               f"pairs")


def plan(config, mesh, model, task=None):
    return online.plan_stage("online_dpo", config, mesh, model, task,
                                  functools.partial(online_dpo.online_dpo_step, online_config=config.online_dpo),
                                  extra_references=online_dpo.extra_references(config.online_dpo),
                                  eval_logps_temperature=1.0)  # the policy's own log-probs, as in the loss


STAGE = base.Stage(name="online_dpo", data="prompts", config_block=config_block, plan=plan, validate=validate,
                   initial_params=online.initial_params, outputs=lambda params: {"policy": params["policy"]},
                   report=online.report)
