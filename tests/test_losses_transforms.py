"""Every preference-loss case gives the same numbers under jit, vmap, pmap and shard_map."""

import functools
import os

import jax
import numpy as np

from conftest import run_python
from loss_cases import BATCH_COUPLED, CASES, all_cases, case_id, loss_types_of, policy_gradients, random_inputs

BETA = 0.3
GROUPS, GROUP_SIZE = 4, 6
# Shared by the tests, so each shape compiles once.
jitted_cases = jax.jit(functools.partial(all_cases, beta=BETA))
jitted_gradients = jax.jit(functools.partial(policy_gradients, beta=BETA))


def assert_trees_close(got, expected, message):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-6,
                                                         err_msg=message), got, expected)


def test_jit_gives_the_eager_numbers_and_gradients():
    inputs = random_inputs(seed=0, batch=GROUP_SIZE)
    assert_trees_close(jitted_cases(inputs), all_cases(inputs, BETA), "jit")
    assert_trees_close(jitted_gradients(inputs), policy_gradients(inputs, BETA), "jit grad")


def test_vmap_over_groups_equals_a_loop_over_them():
    inputs = random_inputs(seed=1, batch=GROUPS * GROUP_SIZE)
    groups = {name: value.reshape(GROUPS, GROUP_SIZE) for name, value in inputs.items()}
    mapped = jax.jit(jax.vmap(functools.partial(all_cases, beta=BETA)))(groups)
    mapped_gradients = jax.jit(jax.vmap(functools.partial(policy_gradients, beta=BETA)))(groups)
    for group in range(GROUPS):
        arrays = {name: value[group] for name, value in groups.items()}
        assert_trees_close(jax.tree.map(lambda x: x[group], mapped), jitted_cases(arrays), f"vmap group {group}")
        assert_trees_close(jax.tree.map(lambda x: x[group], mapped_gradients), jitted_gradients(arrays),
                           f"vmap grad group {group}")

    # What makes data parallelism exact: the losses of a batch are those of its parts, except for
    # the variants that sort over the batch.
    whole = jitted_cases(inputs)
    for case, (whole_losses, _), (group_losses, _) in zip(CASES, whole, mapped):
        coupled = any(loss_type in BATCH_COUPLED for loss_type in loss_types_of(case))
        assert np.allclose(whole_losses, group_losses.reshape(-1), rtol=2e-6, atol=1e-6) != coupled, case_id(case)


def test_pmap_and_shard_map_over_8_devices_give_the_single_device_numbers():
    """In a fresh process: the device count must be set before JAX initialises its backend."""
    result = run_python([os.path.join("tests", "losses_multidevice.py")],
                        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert result.stdout.startswith(f"ok: {len(CASES)} cases"), result.stdout
