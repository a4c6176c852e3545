"""Pretraining: next-token training on whole texts (`data.pretrain_files`, or the synthetic task's).

Its batches are SFT batches whose loss mask covers every token after the first, so its loss is the
SFT loss. Starts from `pretrain.init_from`, else the model init.
"""

import functools

from dpo_jax.stages import base, sft


def config_block():
    return base.optimizer_block(num_steps=1000, learning_rate=1e-3, warmup_steps=50, schedule="cosine")


STAGE = base.Stage(name="pretrain", data="pretrain", config_block=config_block,
                   plan=functools.partial(sft.plan, name="pretrain"))
