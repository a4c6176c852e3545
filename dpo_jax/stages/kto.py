"""KTO (Ethayarajh et al. 2024, arXiv:2402.01306): preference tuning from unpaired examples, each a
prompt with one completion labelled desirable or not, against a live frozen reference.

Reads unpaired examples (`dpo_jax.data.unpaired`): `kto.train_files` / `eval_files`, or the
preference pairs of `config.data` split in two. Starts from `kto.init_from`, else the run's last
policy stage (SFT), else the model init; that starting point is the reference.
"""

import functools

from dpo_jax import planning, steps, storage
from dpo_jax.stages import base


def config_block():
    return base.optimizer_block(
        num_steps=100, learning_rate=1e-4, warmup_steps=10,
        beta=0.1,                             # how far the policy may move from the reference
        desirable_weight=1.0,                 # weight of a desirable example's loss (lambda_D)
        undesirable_weight=1.0,               # weight of an undesirable example's loss (lambda_U)
        train_files=(),                       # unpaired files {prompt, completion, label} (.jsonl[.gz], .json,
                                              #   .parquet); () = the preference pairs of config.data, split in two
        eval_files=(),                        # held-out unpaired files (needed with train_files)
    )


def validate(config):
    kto = config.kto
    base.check(kto.beta > 0, "kto.beta", f"must be > 0, got {kto.beta}")
    base.check(kto.desirable_weight > 0 and kto.undesirable_weight > 0, "kto.desirable_weight",
               "desirable_weight and undesirable_weight must be > 0")
    base.check("kto" not in config.stages or config.data.layout == "padded", "data.layout",
               f"the kto stage reads padded rows; got {config.data.layout!r}")
    base.check(bool(kto.train_files) == bool(kto.eval_files), "kto.eval_files",
               "kto.train_files and kto.eval_files go together: KTO evaluates on held-out unpaired examples")
    for key in ("train_files", "eval_files"):
        for path in kto[key]:
            base.check(storage.isfile(path), f"kto.{key}", f"{path!r} is not a file")
    tokenizer = config.data.tokenizer or config.model.init_from_hf
    base.check(not kto.train_files or tokenizer, "data.tokenizer",
               "kto.train_files hold text: they need a tokenizer (data.tokenizer or model.init_from_hf)")


def plan(config, mesh, model, task=None):
    del task
    return planning.plan_train_stage(
        "kto", config, mesh, model, functools.partial(steps.kto_loss, graphdef=model.graphdef, kto_config=config.kto),
        functools.partial(steps.kto_eval_step, graphdef=model.graphdef, kto_config=config.kto), reference_mode="live")


STAGE = base.Stage(name="kto", data="unpaired", config_block=config_block, plan=plan, validate=validate)
