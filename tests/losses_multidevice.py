"""pmap and shard_map of every preference-loss case over 8 CPU devices give the single-device numbers.

Run by tests/test_losses_transforms.py in a fresh process, because the device count must be set
before JAX starts:  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/losses_multidevice.py
Exits non-zero (an AssertionError) on any mismatch.
"""

import functools

import jax
import numpy as np
from jax.sharding import PartitionSpec

from dpo_jax import losses
from loss_cases import ARRAY_NAMES, CASES, all_cases, case_id, policy_gradients, random_inputs

DEVICES = 8
PER_DEVICE = 3
BETA = 0.3


def assert_close(got, expected, message):
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=2e-6, atol=1e-6, err_msg=message)


def shards(inputs):
    """[DEVICES, PER_DEVICE] views of [DEVICES * PER_DEVICE] inputs."""
    return {name: value.reshape(DEVICES, PER_DEVICE) for name, value in inputs.items()}


def batch_sharded(inputs, mesh):
    """The inputs placed with their batch split over the mesh's 'data' axis (explicit axes require it)."""
    return jax.device_put(inputs, jax.sharding.NamedSharding(mesh, PartitionSpec("data")))


single_device_cases = jax.jit(functools.partial(all_cases, beta=BETA))
single_device_gradients = jax.jit(functools.partial(policy_gradients, beta=BETA))


def check_pmap(inputs):
    """pmap over devices == the single-device function on each device's slice."""
    mapped = jax.pmap(functools.partial(all_cases, beta=BETA))(shards(inputs))
    for device in range(DEVICES):
        expected = single_device_cases({name: value[device] for name, value in shards(inputs).items()})
        for case, (got_losses, got_metrics), (want_losses, want_metrics) in zip(CASES, mapped, expected):
            assert_close(got_losses[device], want_losses, f"pmap losses {case_id(case)}")
            for name, value in want_metrics.items():
                assert_close(got_metrics[name][device], value, f"pmap {name} {case_id(case)}")


def check_shard_map(inputs):
    """The batch split over a 'data' mesh axis: losses and gradients equal the single-device function's on
    each shard, and the pmean of the metrics equals the mean of theirs (the whole batch's: equal shards)."""
    mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))

    def per_shard(arrays):
        results = all_cases(arrays, BETA)
        return ([per_example for per_example, _ in results],
                [jax.lax.pmean(metrics, "data") for _, metrics in results],
                policy_gradients(arrays, BETA))

    sharded = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(PartitionSpec("data"),),
                                    out_specs=(PartitionSpec("data"), PartitionSpec(), PartitionSpec("data"))))
    with jax.set_mesh(mesh):
        got_losses, got_metrics, got_gradients = sharded(batch_sharded(inputs, mesh))
    shard_inputs = [{name: value[device] for name, value in shards(inputs).items()} for device in range(DEVICES)]
    by_shard = [single_device_cases(arrays) for arrays in shard_inputs]
    by_shard_gradients = [single_device_gradients(arrays) for arrays in shard_inputs]
    for index, case in enumerate(CASES):
        assert_close(got_losses[index], np.concatenate([results[index][0] for results in by_shard]),
                     f"shard_map losses {case_id(case)}")
        for name in ARRAY_NAMES[:2]:
            assert_close(got_gradients[index][name],
                         np.concatenate([gradients[index][name] for gradients in by_shard_gradients]),
                         f"shard_map grad {name} {case_id(case)}")
        for name in got_metrics[index]:
            assert_close(got_metrics[index][name], np.mean([results[index][1][name] for results in by_shard]),
                         f"shard_map {name} {case_id(case)}")


def check_kto(seed):
    """KTO with axis_name: every device uses the whole batch's KL reference point."""
    rng = np.random.default_rng(seed)
    size = DEVICES * PER_DEVICE
    inputs = dict(policy_logps=-rng.uniform(5, 50, size).astype(np.float32),
                  reference_logps=-rng.uniform(5, 50, size).astype(np.float32),
                  desirable=rng.uniform(size=size) < 0.5,
                  policy_kl_logps=-rng.uniform(5, 50, size).astype(np.float32),
                  reference_kl_logps=-rng.uniform(5, 55, size).astype(np.float32))
    whole, whole_metrics = jax.jit(losses.kto_loss)(**inputs)
    mapped, mapped_metrics = jax.pmap(functools.partial(losses.kto_loss, axis_name="data"),
                                      axis_name="data")(**shards(inputs))
    assert_close(mapped.reshape(-1), whole, "kto pmap losses")
    assert_close(mapped_metrics["kl"], np.full(DEVICES, whole_metrics["kl"]), "kto pmap kl")
    mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    sharded = jax.jit(jax.shard_map(lambda arrays: losses.kto_loss(**arrays, axis_name="data")[0], mesh=mesh,
                                    in_specs=(PartitionSpec("data"),), out_specs=PartitionSpec("data")))
    with jax.set_mesh(mesh):
        assert_close(sharded(batch_sharded(inputs, mesh)), whole, "kto shard_map losses")


def main():
    assert jax.device_count() == DEVICES, f"expected {DEVICES} devices, got {jax.devices()} (XLA_FLAGS set?)"
    inputs = random_inputs(seed=0, batch=DEVICES * PER_DEVICE)
    check_pmap(inputs)
    check_shard_map(inputs)
    check_kto(seed=1)
    print(f"ok: {len(CASES)} cases under pmap and shard_map on {DEVICES} devices, and KTO")


if __name__ == "__main__":
    main()
