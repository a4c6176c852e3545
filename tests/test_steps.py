"""The pure SFT and DPO steps on a tiny model and the synthetic task."""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpo_jax import losses, models, planning, sharding, stages, steps
from dpo_jax.data import loader
from dpo_jax.data.task import load_task


def _setup(config, stage):
    task = load_task(config)
    graphdef, _, _ = models.abstract_model(config.model)
    params = models.init_params(config.model, seed=config.seed, shardings=None)
    optimizer, schedule = steps.make_optimizer(config.train, config[stage])
    state = steps.init_state(params, optimizer, seed=config.seed, live_reference=stage == "dpo")
    if stage == "dpo":
        loss_fn = functools.partial(steps.dpo_loss, graphdef=graphdef, dpo_config=config.dpo)
        eval_fn = functools.partial(steps.dpo_eval_step, graphdef=graphdef, dpo_config=config.dpo)
    else:
        loss_fn = functools.partial(steps.sft_loss, graphdef=graphdef)
        eval_fn = functools.partial(steps.sft_eval_step, graphdef=graphdef)
    train_step = jax.jit(functools.partial(steps.train_step, loss_fn=loss_fn, optimizer=optimizer,
                                           schedule=schedule), donate_argnums=0)
    arrays = (task.pairs_train, task.pairs_eval) if stage == "dpo" else (task.sft_train, task.sft_eval)
    batches = loader.train_batches(arrays[0], global_batch_size=config.train.global_batch_size, seed=0)
    eval_batch = loader.eval_batches(arrays[1], global_batch_size=config.data.num_eval)[0]
    return state, train_step, batches, jax.jit(eval_fn), eval_batch, graphdef


def test_sft_steps_lower_held_out_nll(tiny_config):
    tiny_config.sft.learning_rate = 3e-3
    state, train_step, batches, eval_fn, eval_batch, _ = _setup(tiny_config, "sft")
    before = float(eval_fn(state.params, None, eval_batch)["nll"])
    for step in range(30):
        state, metrics = train_step(state, batches[step])
    after = float(eval_fn(state.params, None, eval_batch)["nll"])
    assert int(state.step) == 30
    assert np.isfinite(float(metrics["loss"]))
    assert after < before - 0.1, (before, after)


def test_dpo_steps_raise_held_out_preference_accuracy(tiny_config):
    tiny_config.dpo.learning_rate = 3e-3
    state, train_step, batches, eval_fn, eval_batch, _ = _setup(tiny_config, "dpo")
    before = eval_fn(state.params, state.ref_params, eval_batch)
    # Policy == reference: every pair ties, the loss is log 2 and the KL is zero.
    assert float(before["rewards/accuracies"]) == 0.5
    np.testing.assert_allclose(float(before["loss"]), np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(float(before["kl"]), 0.0, atol=1e-6)
    for step in range(80):
        state, _ = train_step(state, batches[step])
    after = eval_fn(state.params, state.ref_params, eval_batch)
    assert float(after["rewards/accuracies"]) > 0.7, after
    assert float(after["rewards/margins"]) > 0
    assert 0 < float(after["kl"]) < 50


def test_reference_params_stay_frozen(tiny_config):
    state, train_step, batches, _, _, _ = _setup(tiny_config, "dpo")
    reference = jax.tree.map(np.asarray, state.ref_params)
    for step in range(3):
        state, _ = train_step(state, batches[step])
    jax.tree.map(np.testing.assert_array_equal, reference, jax.tree.map(np.asarray, state.ref_params))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), reference, jax.tree.map(np.asarray, state.params))
    assert any(jax.tree.leaves(changed))


def test_dpo_gradient_matches_the_papers_closed_form(tiny_config):
    """grad L = -beta E[sigmoid(r_rejected - r_chosen) (grad log pi(y_w) - grad log pi(y_l))]."""
    beta = tiny_config.dpo.beta
    _, _, batches, _, _, graphdef = _setup(tiny_config, "dpo")
    params = models.init_params(tiny_config.model, seed=1, shardings=None)
    reference = models.init_params(tiny_config.model, seed=2, shardings=None)
    batch = batches[0]

    grad_loss = jax.grad(lambda p: steps.dpo_loss(p, reference, batch, None, graphdef=graphdef,
                                                  dpo_config=tiny_config.dpo)[0])(params)

    def logps(p, side):
        logits = models.apply(graphdef, p, batch[side + "_input_ids"], segment_ids=batch[side + "_segment_ids"])
        return losses.sequence_logps(logits[:, :-1], batch[side + "_input_ids"][:, 1:],
                                     batch[side + "_loss_mask"][:, 1:])

    reward_chosen = beta * (logps(params, "chosen") - logps(reference, "chosen"))
    reward_rejected = beta * (logps(params, "rejected") - logps(reference, "rejected"))
    weights = jax.nn.sigmoid(reward_rejected - reward_chosen)
    assert float(jnp.std(weights)) > 1e-3  # the pairs are weighted differently, so the check has teeth
    pairs = weights.shape[0]
    closed_form = jax.grad(
        lambda p: -beta * jnp.sum(weights * (logps(p, "chosen") - logps(p, "rejected"))) / pairs)(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grad_loss, closed_form)


@pytest.mark.parametrize("optimizer", ["adamw", "rmsprop"])
@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_learning_rate_warms_up_linearly(tiny_config, optimizer, schedule):
    tiny_config.train.optimizer = optimizer
    tiny_config.sft.schedule = schedule
    tiny_config.sft.warmup_steps = 4
    _, schedule_fn = steps.make_optimizer(tiny_config.train, tiny_config.sft)
    peak = tiny_config.sft.learning_rate
    np.testing.assert_allclose([float(schedule_fn(s)) for s in range(5)], [0, peak / 4, peak / 2, 3 * peak / 4, peak],
                               rtol=1e-6)


def test_bfloat16_compute_keeps_log_probs_and_loss_in_float32(tiny_config):
    """Mixed precision: float32 parameters, bfloat16 matmuls, float32 logits (the unembedding's
    accumulator), log-probs and loss."""
    results = {}
    for dtype in ("float32", "bfloat16"):
        tiny_config.model.dtype = dtype
        graphdef, _, _ = models.abstract_model(tiny_config.model)
        params = models.init_params(tiny_config.model, seed=0, shardings=None)
        reference = models.init_params(tiny_config.model, seed=1, shardings=None)
        batch = loader.train_batches(load_task(tiny_config).pairs_train, global_batch_size=8, seed=0)[0]
        logits = models.apply(graphdef, params, batch["chosen_input_ids"])
        logps = losses.sequence_logps(logits, batch["chosen_input_ids"], batch["chosen_loss_mask"])
        loss, (metrics, _) = steps.dpo_loss(params, reference, batch, None, graphdef=graphdef,
                                            dpo_config=tiny_config.dpo)
        results[dtype] = (logits.dtype, logps.dtype, loss.dtype, float(loss), jax.tree.map(lambda p: p.dtype, params))
    assert results["bfloat16"][0] == results["float32"][0] == jnp.float32
    assert results["bfloat16"][1] == jnp.float32 and results["bfloat16"][2] == jnp.float32
    assert set(jax.tree.leaves(results["bfloat16"][4])) == {jnp.dtype("float32")}
    assert results["bfloat16"][3] == pytest.approx(results["float32"][3], abs=2e-2)


# Finite loss and gradients whose update is not: the optimizer makes the parameters NaN or inf.
POISONED_OPTIMIZERS = {
    "nan_weight_decay": optax.adamw(1e-2, weight_decay=float("nan")),
    "nan_b1": optax.adamw(1e-2, b1=float("nan")),
    "overflowing_update": optax.sgd(1e38),
}


@pytest.mark.parametrize("poison", ["nan_gradient", "inf_gradient", "overflowing_norm", "nan_loss",
                                    *POISONED_OPTIMIZERS])
def test_a_step_with_a_non_finite_loss_gradient_or_update_changes_nothing(poison):
    """The loss may be finite while a gradient is not (sqrt at 0), or every gradient finite while
    their norm overflows float32, or loss and gradients finite while the update is not (a NaN
    hyperparameter, an update past float32's range); each skips the update and is counted."""
    params = {"w": jnp.ones((3,)), "v": jnp.zeros((2,))}
    optimizer = POISONED_OPTIMIZERS.get(poison, optax.adamw(1e-2))
    scale = {"nan_gradient": 0.0, "inf_gradient": 0.0, "overflowing_norm": 1e30, "nan_loss": 0.0}.get(poison, 1.0)

    def loss_fn(params, ref_params, batch, rng):
        w, v = params["w"], params["v"]
        loss = jnp.sum(w ** 2) + scale * jnp.sum(v + 1.0)  # d/dv = scale: 1e30 squares past float32
        if poison == "nan_gradient":
            loss = loss + jnp.sum(jnp.where(v > 0, jnp.log(v), 0.0) * 0.0)  # finite loss, 0 * inf = NaN gradient
        if poison == "inf_gradient":
            loss = loss + jnp.sum(jnp.sqrt(jnp.abs(v)))  # finite loss, infinite gradient at 0
        if poison == "nan_loss":
            loss = loss + jnp.nan
        return loss, ({}, 1.0)  # (metrics, weight)

    state = steps.init_state(params, optimizer, seed=0, live_reference=False)
    new_state, metrics = jax.jit(functools.partial(steps.train_step, loss_fn=loss_fn, optimizer=optimizer,
                                                   schedule=lambda step: 1e-2))(state, {"x": jnp.zeros(1)})
    assert float(metrics["nonfinite"]) == 1.0
    for before, after in zip(jax.tree.leaves((state.params, state.opt_state)),
                             jax.tree.leaves((new_state.params, new_state.opt_state))):
        np.testing.assert_array_equal(before, after)
    assert int(new_state.step) == 1  # the batch is consumed


def test_a_reference_free_loss_runs_no_reference_and_logs_the_rewards_it_defines(tiny_config):
    _, _, batches, _, eval_batch, graphdef = _setup(tiny_config, "dpo")
    batch = batches[0]
    mesh = sharding.make_mesh(tiny_config.mesh, jax.devices()[:1])
    model = planning.plan_model(tiny_config, mesh)
    params = models.init_params(tiny_config.model, seed=tiny_config.seed, shardings=model.param_shardings)
    beta = tiny_config.dpo.beta

    def policy_logps(side):
        logits = models.apply(graphdef, params, batch[side + "_input_ids"], segment_ids=batch[side + "_segment_ids"])
        mask = batch[side + "_loss_mask"][:, 1:]
        return losses.sequence_logps(logits[:, :-1], batch[side + "_input_ids"][:, 1:], mask), mask.sum(axis=1)

    chosen_logps, chosen_lengths = policy_logps("chosen")
    rejected_logps, rejected_lengths = policy_logps("rejected")
    for loss_type, normalised in (("sigmoid_ref_free", False), ("simpo", True), ("orpo", True)):
        config = copy.deepcopy(tiny_config)
        config.dpo.loss_type = (loss_type,)
        config.dpo.reference = "precomputed"  # nothing to precompute for a loss that reads no reference
        plan = stages.STAGES["dpo"].plan(config, mesh, model)
        assert plan.reference_mode is None and plan.prepare_data is None, loss_type
        assert planning.init_state(plan, params).ref_params is None  # no reference model in the state

        loss, (metrics, _) = steps.dpo_loss(params, None, batch, None, graphdef=graphdef, dpo_config=config.dpo)
        # The rewards the loss defines: beta * log pi(y | x), per token for the length-normalised losses.
        chosen = beta * (chosen_logps / chosen_lengths if normalised else chosen_logps)
        rejected = beta * (rejected_logps / rejected_lengths if normalised else rejected_logps)
        np.testing.assert_allclose(metrics["rewards/chosen"], chosen.mean(), rtol=1e-5, err_msg=loss_type)
        np.testing.assert_allclose(metrics["rewards/margins"], (chosen - rejected).mean(), rtol=1e-4, atol=1e-6)
        if loss_type == "sigmoid_ref_free":  # -log sigmoid(beta (log pi(y_w) - log pi(y_l)))
            np.testing.assert_allclose(loss, -jax.nn.log_sigmoid(chosen - rejected).mean(), rtol=1e-5)
        evaluated = steps.dpo_eval_step(params, None, eval_batch, graphdef=graphdef, dpo_config=config.dpo)
        assert "kl" not in evaluated and np.isfinite(float(evaluated["loss"])), loss_type
