"""The stage protocol: what one stage of a run provides to the driver, the planner and the data layer."""

import dataclasses
from typing import Callable

import ml_collections

from dpo_jax import planning

# The token arrays a stage trains and evaluates on (`dpo_jax.data.task.Task`, `<kind>_train` / `<kind>_eval`).
DATA_KINDS = ("pretrain", "sft", "pairs", "unpaired", "prompts")
SCHEDULES = ("constant", "linear", "cosine")


def check(condition, key, message):
    """Raises ValueError naming `config.<key>` unless `condition`."""
    if not condition:
        raise ValueError(f"config.{key}: {message}")


def optimizer_block(*, num_steps, learning_rate, warmup_steps, schedule="constant", **extra):
    """A stage's config block: the keys every stage has, then its own (`extra`, commented by the caller)."""
    return ml_collections.ConfigDict(dict(
        num_steps=num_steps,                  # optimizer steps of the stage
        learning_rate=learning_rate,          # peak learning rate
        warmup_steps=warmup_steps,            # linear warmup steps
        schedule=schedule,                    # constant | linear | cosine (decay after warmup)
        init_from="",                         # Orbax checkpoint dir to start from ("" = the stage's default start,
                                              #   in its module's docstring: most start from the last policy stage)
        **extra,
    ))


def check_optimizer_block(config, name):
    """The checks of `optimizer_block`'s keys of `config.<name>`."""
    block = config[name]
    check(block.num_steps >= 0, f"{name}.num_steps", "must be >= 0")
    check(block.learning_rate > 0, f"{name}.learning_rate", "must be > 0")
    check(block.warmup_steps >= 0, f"{name}.warmup_steps", "must be >= 0")
    check(block.schedule in SCHEDULES, f"{name}.schedule",
          f"must be constant, linear or cosine, got {block.schedule!r}")


def start_from_policy(config, model, plan, results):
    """The default starting point: the stage's `init_from` checkpoint, else the run's last policy,
    else the model's initialisation."""
    return planning.restore_or(config[plan.name].init_from, model.abstract_params,
                               lambda: planning.last_policy_or_init(config, model, results))


def policy_output(final_params):
    """The default result: a policy, which the next policy stage starts from."""
    return {"policy": final_params}


def final_eval_lines(result):
    """The default report: the final eval metrics on one line."""
    final = result.get("eval") or {}
    return ["  " + ", ".join(f"{key}={value:.4f}" for key, value in sorted(final.items()))] if final else []


def no_checks(config):
    del config


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a run. `train.py` loops over `config.stages` and calls only these.

    name: the stage's name in `config.stages` and its config block `config.<name>`.
    data: which token arrays it reads (`DATA_KINDS`).
    config_block: () -> its config block with defaults, one comment per key.
    plan: (config, mesh, model, task) -> `planning.StagePlan`; `model` is the decoder's `ModelPlan`,
      `task` the run's `Task` (None where only shapes are planned).
    validate: (config) -> None, raising ValueError that names the key; runs for every stage, so a
      bad value fails before anything compiles.
    initial_params: (config, model, plan, results) -> its params at step 0; `results` holds what
      earlier stages produced ({"policy": ..., "reward_model": ...}).
    outputs: final (or starting) params -> what later stages start from, e.g. {"policy": params}.
    report: the stage's summary entry -> lines of the end-of-run table under its heading.
    """
    name: str
    data: str
    config_block: Callable
    plan: Callable
    validate: Callable = no_checks
    initial_params: Callable = start_from_policy
    outputs: Callable = policy_output
    report: Callable = final_eval_lines

    def __post_init__(self):
        check(self.data in DATA_KINDS, "stages", f"stage {self.name!r} reads unknown data {self.data!r}")
