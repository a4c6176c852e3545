"""A run's policies read back from its workdir, as training had them: what `python -m dpo_jax.sample` samples
from and `python -m dpo_jax.evaluate` evaluates.

    config = restore.read_config(workdir)                 # config.json, as the run resolved it
    restore.check_finished(workdir, config)               # every stage of config.stages trained to the end
    policy = restore.restore_policy(workdir, config, mesh, with_reference=True)
    policy.params, policy.reference, policy.model.graphdef, policy.stage

`restore_policy` walks `config.stages` as `train.run` does: each stage's newest checkpoint restored in
order, its `Stage.outputs` added to the results; the policy is the last policy stage's (or `stage`'s)
params, the reference that stage's starting point, `Stage.initial_params` of the results before it
(the SFT model for DPO and PPO). Nothing in the workdir is written.
"""

import dataclasses
from typing import Any

import ml_collections

from dpo_jax import checkpointing, planning, stages, storage


def _as_tuples(value):
    """A config.json value with its lists as tuples, as the config's list-valued keys are."""
    if isinstance(value, dict):
        return {key: _as_tuples(item) for key, item in value.items()}
    if isinstance(value, list):
        return tuple(_as_tuples(item) for item in value)
    return value


def read_config(workdir):
    """The resolved config a run recorded in `<workdir>/config.json`."""
    if not storage.isdir(workdir):
        raise FileNotFoundError(f"{workdir}: no such directory")
    path = storage.join(workdir, "config.json")
    if not storage.isfile(path):
        raise FileNotFoundError(f"{workdir}: not a dpo_jax workdir (it has no config.json)")
    return ml_collections.ConfigDict(_as_tuples(storage.read_json(path)))


def checkpoint_dir(workdir, stage):
    return storage.join(workdir, "checkpoints", stage)


def has_checkpoint(workdir, stage):
    """Whether the stage saved a checkpoint (a step directory under checkpoints/<stage>/)."""
    return any(name.isdigit() for name in storage.listdir(checkpoint_dir(workdir, stage)))


def check_finished(workdir, config):
    """Raises ValueError unless every stage of `config.stages` trained to its `num_steps` (summary.json)."""
    names = list(config.stages)
    if not any(has_checkpoint(workdir, name) for name in names):
        raise ValueError(f"{storage.join(workdir, 'checkpoints')}: holds no checkpoint of the stages {names} "
                         "(the run has not trained yet)")
    path = storage.join(workdir, "summary.json")
    summary = storage.read_json(path) if storage.isfile(path) else {}
    for name in names:
        if not has_checkpoint(workdir, name):
            raise ValueError(f"{checkpoint_dir(workdir, name)}: no checkpoint of stage {name!r} (the run has not "
                             "trained it yet): resume the run with python -m dpo_jax.main first")
        steps = (summary.get(name) or {}).get("steps")
        if steps != config[name].num_steps:
            done = f"finished at {steps} steps" if steps is not None else "not finished"
            raise ValueError(f"{workdir}: stage {name!r} of the run is {done}, config.{name}.num_steps is "
                             f"{config[name].num_steps}: resume the run with python -m dpo_jax.main first (or "
                             f"sample its latest checkpoint with python -m dpo_jax.sample --stage={name})")


@dataclasses.dataclass(frozen=True)
class Policy:
    stage: str                  # the stage whose checkpoint the params are
    model: planning.ModelPlan   # the decoder: graph, abstract params and shardings
    plan: planning.StagePlan    # the stage's plan (its shapes only: planned without the task)
    params: Any                 # the policy's params (the decoder's tree)
    reference: Any = None       # with_reference: the stage's starting point (the decoder's tree)


def policy_stages(config, stage_plans):
    """The stages of `config.stages` whose outputs hold a policy (not the reward stage)."""
    return [name for name in config.stages
            if "policy" in stages.STAGES[name].outputs(stage_plans[name].param_plan.abstract_params)]


def _restore_stage(workdir, name, plan):
    directory = checkpoint_dir(workdir, name)
    if not has_checkpoint(workdir, name):
        raise ValueError(f"{directory}: no checkpoint of stage {name!r} (the run has not saved one)")
    return checkpointing.restore_params(directory, plan.param_plan.abstract_params)


def restore_policy(workdir, config, mesh, *, stage=None, with_reference=False):
    """The policy of `stage`'s newest checkpoint in `workdir`: a `Policy`, its params placed on `mesh`.

    stage: a policy stage of `config.stages` (default: the last one with a checkpoint; for a finished
    run, the last policy stage, whose final params training evaluates). with_reference: also its
    starting point, for which the stages before it are restored too (their newest checkpoints: check
    `check_finished` first for their final params).
    """
    names = list(config.stages)
    model = planning.plan_model(config, mesh)
    stage_plans = {name: stages.STAGES[name].plan(config, mesh, model, None) for name in names}
    policies = policy_stages(config, stage_plans)
    if stage is None:
        trained = [name for name in policies if has_checkpoint(workdir, name)]
        if not trained:
            raise ValueError(f"{storage.join(workdir, 'checkpoints')}: holds no checkpoint of a policy stage "
                             f"(config.stages {names}, of which policy stages {policies})")
        stage = trained[-1]
    elif stage not in names:
        raise ValueError(f"stage {stage!r}: not a stage of the run in {workdir} (config.stages {names})")
    elif stage not in policies:
        produced = sorted(stages.STAGES[stage].outputs(stage_plans[stage].param_plan.abstract_params))
        raise ValueError(f"stage {stage!r}: trains no policy (it gives {produced}); the run's policy stages are "
                         f"{policies}")
    results = {}
    for name in names[:names.index(stage)] if with_reference else []:
        results.update(stages.STAGES[name].outputs(_restore_stage(workdir, name, stage_plans[name])))
    target, plan = stages.STAGES[stage], stage_plans[stage]
    reference = None
    if with_reference:
        reference = target.outputs(target.initial_params(config, model, plan, results))["policy"]
    params = target.outputs(_restore_stage(workdir, stage, plan))["policy"]
    return Policy(stage=stage, model=model, plan=plan, params=params, reference=reference)
