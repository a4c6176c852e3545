"""The DPO train step selects every preference loss by `config.dpo.loss_type` and takes a step with it."""

import functools

import jax
import numpy as np
import pytest
from conftest import run_config

from dpo_jax import losses, models, steps
from dpo_jax.configs import validation
from dpo_jax.data import loader
from dpo_jax.data.task import load_task

DESIGN_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                  "logps/chosen", "logps/rejected", "grad_norm", "learning_rate")


@pytest.fixture(scope="module")
def model_and_batch():
    config = run_config("quickstart", "runlocal")
    task = load_task(config)
    graphdef, _, _ = models.abstract_model(config.model)
    params = models.init_params(config.model, seed=config.seed, shardings=None)
    batch = loader.train_batches(task.pairs_train, global_batch_size=config.train.global_batch_size, seed=0)[0]
    return config, graphdef, params, batch


# Run eagerly, not jitted: the model's operations then compile once for all variants instead of
# a whole step per variant; the losses under jit are tested in test_losses_transforms.py.
@pytest.mark.slow
@pytest.mark.parametrize("loss_type,loss_options", [(loss_type, {}) for loss_type in losses.LOSS_TYPES] + [
    ("simpo", dict(simpo_gamma=1.0)), ("sigmoid", dict(f_divergence_type="js_divergence", use_weighting=True))])
def test_one_dpo_step_with_each_loss_type(model_and_batch, loss_type, loss_options):
    config, graphdef, params, batch = model_and_batch
    config = config.copy_and_resolve_references()
    config.dpo.loss_type = (loss_type,)
    config.dpo.warmup_steps = 0  # a nonzero learning rate at the first step
    config.dpo.loss_options.update(loss_options)
    validation.validate(config)
    optimizer, schedule = steps.make_optimizer(config.train, config.dpo)
    state = steps.init_state(params, optimizer, seed=config.seed, live_reference=True)
    loss_fn = functools.partial(steps.dpo_loss, graphdef=graphdef, dpo_config=config.dpo)

    new_state, metrics = steps.train_step(state, batch, loss_fn=loss_fn, optimizer=optimizer, schedule=schedule)

    assert set(DESIGN_METRICS) <= set(metrics)
    assert all(np.isfinite(float(value)) for value in metrics.values()), metrics
    assert float(metrics["grad_norm"]) > 0
    moved = jax.tree.map(lambda old, new: not np.array_equal(old, new), state.params, new_state.params)
    assert any(jax.tree.leaves(moved))
