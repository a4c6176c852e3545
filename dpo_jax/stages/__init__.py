"""The stages a run chains (`config.stages`), one module each, behind one protocol (`base.Stage`).

    stage = dpo_jax.stages.STAGES["dpo"]
    plan = stage.plan(config, mesh, model, task)        # what it compiles (dpo_jax.planning.StagePlan)

To add a stage: a module here with its config block, data kind, plan and whatever hooks it
overrides, one line in `STAGES`, and its data reader in `dpo_jax/data` if it reads a new kind.
"""

from dpo_jax.stages import dpo, grpo, kto, online_dpo, ppo, pretrain, reward, sft, unlikelihood
from dpo_jax.stages.base import Stage

# In the order a run usually chains them.
STAGES = {stage.name: stage for stage in (pretrain.STAGE, sft.STAGE, reward.STAGE, unlikelihood.STAGE, dpo.STAGE,
                                         kto.STAGE, ppo.STAGE, online_dpo.STAGE, grpo.STAGE)}
# The stages' tuple-valued keys (dpo_jax.configs.schema.LIST_KEYS) and their items' type.
LIST_KEYS = {"dpo.loss_type": str, "dpo.loss_options.loss_weights": float, "kto.train_files": str,
             "kto.eval_files": str, "online_dpo.beta_schedule": float}

__all__ = ["LIST_KEYS", "STAGES", "Stage"]
