"""Every preference-loss case gives the same numbers under jit, vmap, pmap and shard_map."""

import functools
import os
import pickle

import jax
import losses_multidevice
import numpy as np
from conftest import host_devices, run_python
from loss_cases import BATCH, CASES, all_cases, case_id, policy_gradients, random_inputs

from dpo_jax import losses

BETA = 0.3
GROUPS = 4
# Shared by the tests, so each shape compiles once.
jitted_cases = jax.jit(functools.partial(all_cases, beta=BETA))
jitted_gradients = jax.jit(functools.partial(policy_gradients, beta=BETA))


def assert_trees_close(got, expected, message):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-6,
                                                         err_msg=message), got, expected)


def test_jit_gives_the_eager_numbers_and_gradients():
    inputs = random_inputs(seed=0)
    assert_trees_close(jitted_cases(inputs), all_cases(inputs, BETA), "jit")
    assert_trees_close(jitted_gradients(inputs), policy_gradients(inputs, BETA), "jit grad")


def test_vmap_over_groups_equals_a_loop_over_them():
    groups = {name: value.reshape(GROUPS, BATCH) for name, value in random_inputs(seed=1, batch=GROUPS * BATCH).items()}
    mapped = jax.jit(jax.vmap(functools.partial(all_cases, beta=BETA)))(groups)
    mapped_gradients = jax.jit(jax.vmap(functools.partial(policy_gradients, beta=BETA)))(groups)
    for group in range(GROUPS):
        arrays = {name: value[group] for name, value in groups.items()}
        assert_trees_close(jax.tree.map(lambda x: x[group], mapped), jitted_cases(arrays), f"vmap group {group}")
        assert_trees_close(jax.tree.map(lambda x: x[group], mapped_gradients), jitted_gradients(arrays),
                           f"vmap grad group {group}")


def test_pmap_and_shard_map_over_8_devices_give_the_single_device_numbers(tmp_path):
    """Run in a fresh process (the device count must be set before JAX initialises its backend),
    compared here with the single-device numbers of each device's share of the batch."""
    output = tmp_path / "results.pickle"
    run_python([os.path.join("tests", "losses_multidevice.py"), str(output)],
               env=host_devices(losses_multidevice.DEVICES))
    with open(output, "rb") as f:
        results = pickle.load(f)
    devices = range(losses_multidevice.DEVICES)
    shares = losses_multidevice.by_device(losses_multidevice.preference_inputs())
    expected = [jitted_cases({name: value[device] for name, value in shares.items()}) for device in devices]
    expected_gradients = [jitted_gradients({name: value[device] for name, value in shares.items()})
                          for device in devices]

    for device in devices:
        assert_trees_close(jax.tree.map(lambda x: x[device], results["pmap"]), expected[device], f"pmap {device}")

    # shard_map: losses and gradients of the shards side by side, metrics averaged by pmean.
    got_losses, got_metrics, got_gradients = results["shard_map"]
    for index, case in enumerate(CASES):
        stack = lambda function, trees: jax.tree.map(lambda *shards: function(shards), *trees)
        assert_trees_close(got_losses[index], np.concatenate([e[index][0] for e in expected]), case_id(case))
        assert_trees_close(got_metrics[index], stack(np.mean, [e[index][1] for e in expected]), case_id(case))
        assert_trees_close(got_gradients[index], stack(np.concatenate, [g[index] for g in expected_gradients]),
                           case_id(case))

    # KTO with axis_name: every device uses the KL reference point of the whole batch.
    whole_losses, whole_metrics = losses.kto_loss(**losses_multidevice.kto_inputs())
    pmap_losses, pmap_metrics = results["kto_pmap"]
    assert_trees_close(pmap_losses.reshape(-1), whole_losses, "kto pmap")
    assert_trees_close(pmap_metrics["kl"], np.full(len(devices), whole_metrics["kl"]), "kto pmap kl")
    assert_trees_close(results["kto_shard_map"], (whole_losses, whole_metrics["kl"]), "kto shard_map")
