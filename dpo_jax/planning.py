"""Plans: what a model and a stage compile, as shapes and shardings, before anything is allocated.

A `ModelPlan` is a model's graph and its parameters' shapes and shardings on a mesh. A `StagePlan`
is everything a stage compiles: optimizer, the step and eval functions, the train state's shapes
and shardings. Each stage module (`dpo_jax.stages`) builds its plan here, and training, the
benchmark, the scorers and the experiment all jit the plan's step with `jit_train_step`, so that
what is benchmarked is what is trained: they differ only in the loop around the step.
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax

from dpo_jax import checkpointing, models, sharding, steps


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    graphdef: Any                 # the Flax graph of the model (static)
    abstract_params: Any          # ShapeDtypeStructs carrying their shardings
    param_shardings: Any          # NamedShardings from the logical axis rules


def plan_model(config, mesh, *, scalar_head=False):
    """The model's graph and its parameters' shapes and shardings on `mesh`, nothing allocated.

    scalar_head: the reward / value model (the decoder's trunk and a scalar head) instead of the decoder.
    """
    if scalar_head:
        graphdef, abstract_params, logical_specs = models.abstract_scalar_model(models.decoder_config(config.model))
    else:
        graphdef, abstract_params, logical_specs = models.abstract_model(config.model)
    param_shardings = sharding.param_shardings(abstract_params, logical_specs, mesh)
    return ModelPlan(graphdef, checkpointing.with_shardings(abstract_params, param_shardings), param_shardings)


@dataclasses.dataclass(frozen=True)
class StagePlan:
    name: str
    optimizer: Any
    schedule: Any
    loss_fn: Optional[Callable]   # (params, ref_params, batch, rng) -> (loss, (metrics, weight)); None for PPO
    step_fn: Callable             # (state, batch) -> (state, metrics): the train step to jit
    eval_fn: Callable             # (params, ref_params, batch) -> metrics
    reference_mode: Optional[str]  # None (no reference) | live | precomputed | lora | ppo
    param_plan: ModelPlan         # the stage's params: the decoder; reward: the scalar model; ppo: {policy, value}
    trainable: Any                # bools shaped like the params: what the optimizer updates (LoRA: adapters)
    init_state: Callable          # starting params -> TrainState at step 0
    abstract_state: Any
    state_shardings: Any
    # (splits {"train", "eval"}, starting params, workdir) -> splits: arrays the stage derives from its
    # starting point before training (DPO's precomputed reference log-probs); None: the data as read.
    prepare_data: Optional[Callable] = None


def _opt_state_shardings(optimizer, abstract_state, param_plan, mesh):
    return sharding.opt_state_shardings(optimizer, abstract_state.opt_state, param_plan.param_shardings, mesh)


def plan_train_stage(name, config, mesh, param_plan, loss_fn, eval_fn, *, reference_mode=None,
                     reference_dtype=None, reference_update=None, prepare_data=None):
    """The plan of a stage trained by `steps.train_step` on `loss_fn` (every stage but PPO).

    reference_mode "live" keeps a frozen copy of the starting params in the state (in
    `reference_dtype`); reference_update is TR-DPO's (every, alpha).
    """
    replicated = sharding.replicated(mesh)
    trainable = models.trainable_mask(param_plan.abstract_params)
    optimizer, schedule = steps.make_optimizer(config.train, config[name], trainable)
    live_reference = reference_mode == "live"
    step_fn = functools.partial(steps.train_step, loss_fn=loss_fn, optimizer=optimizer, schedule=schedule,
                                micro_batches=config.train.grad_accum_steps, reference_update=reference_update,
                                trainable=trainable)
    init_state = functools.partial(steps.init_state, optimizer=optimizer, seed=config.seed,
                                   live_reference=live_reference, reference_dtype=reference_dtype)
    abstract_state = jax.eval_shape(init_state, param_plan.abstract_params)
    state_shardings = steps.TrainState(
        step=replicated, params=param_plan.param_shardings,
        opt_state=_opt_state_shardings(optimizer, abstract_state, param_plan, mesh),
        rng=replicated, ref_params=param_plan.param_shardings if live_reference else None)
    return StagePlan(name, optimizer, schedule, loss_fn, step_fn, eval_fn, reference_mode, param_plan, trainable,
                     init_state, checkpointing.with_shardings(abstract_state, state_shardings), state_shardings,
                     prepare_data)


def plan_custom_stage(name, mesh, param_plan, optimizer, schedule, step_fn, eval_fn, init_state, abstract_start,
                      *, trainable, reference_mode, ref_shardings):
    """The plan of a stage with its own step function and train state (PPO): `init_state(start)` builds
    step 0 from `abstract_start`-shaped params; `ref_shardings` places its frozen models."""
    replicated = sharding.replicated(mesh)
    abstract_state = jax.eval_shape(init_state, abstract_start)
    state_shardings = steps.TrainState(
        step=replicated, params=param_plan.param_shardings,
        opt_state=_opt_state_shardings(optimizer, abstract_state, param_plan, mesh), rng=replicated,
        ref_params=ref_shardings, stage_state=jax.tree.map(lambda _: replicated, abstract_state.stage_state))
    return StagePlan(name, optimizer, schedule, None, step_fn, eval_fn, reference_mode, param_plan, trainable,
                     init_state, checkpointing.with_shardings(abstract_state, state_shardings), state_shardings)


# ---------------------------------------------------------------------------------------------
# Compiled steps: the one jit of a plan's step that training and the benchmark share
# ---------------------------------------------------------------------------------------------

def jit_train_step(plan, mesh, *, donate=True):
    """The plan's train step jitted with its state and batch shardings, the state donated (traced
    with the mesh in context, `sharding.on_mesh`)."""
    return jax.jit(sharding.on_mesh(plan.step_fn, mesh),
                   in_shardings=(plan.state_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(plan.state_shardings, sharding.replicated(mesh)),
                   donate_argnums=0 if donate else ())


def jit_eval_step(plan, mesh):
    """The plan's eval step: (params, ref_params, batch) -> metrics, replicated."""
    return jax.jit(sharding.on_mesh(plan.eval_fn, mesh),
                   in_shardings=(plan.param_plan.param_shardings, plan.state_shardings.ref_params,
                                 sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def init_state(plan, start_params):
    """Step 0 of the plan's train state from its starting params, placed by the plan's shardings."""
    return jax.jit(plan.init_state, out_shardings=plan.state_shardings)(start_params)


# ---------------------------------------------------------------------------------------------
# Starting parameters
# ---------------------------------------------------------------------------------------------

def restore_or(init_from, abstract_params, fallback):
    """The params of checkpoint directory `init_from` when given, else `fallback()`."""
    return checkpointing.restore_params(init_from, abstract_params) if init_from else fallback()


def last_policy_or_init(config, model, results):
    """The last policy this run trained (`results["policy"]`), else the decoder's initialisation."""
    if results.get("policy") is not None:
        return results["policy"]
    return models.init_params(config.model, seed=config.seed, shardings=model.param_shardings)
