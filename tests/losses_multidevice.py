"""Every preference-loss case, and KTO, under pmap and shard_map over 8 CPU devices.

Run by tests/test_losses_transforms.py in a fresh process, because the device count must be set
before JAX starts, which compares the results it pickles to OUTPUT with single-device ones:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/losses_multidevice.py OUTPUT
"""

import functools
import pickle
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from loss_cases import BATCH, all_cases, policy_gradients, random_inputs

from dpo_jax import losses

DEVICES = 8
PER_DEVICE = BATCH  # the single-device shape the other loss tests compile
BETA = 0.3


def preference_inputs():
    return random_inputs(seed=0, batch=DEVICES * PER_DEVICE)


def kto_inputs():
    rng = np.random.default_rng(1)
    size = DEVICES * PER_DEVICE
    return dict(policy_logps=-rng.uniform(5, 50, size).astype(np.float32),
                reference_logps=-rng.uniform(5, 50, size).astype(np.float32),
                desirable=rng.uniform(size=size) < 0.5,
                policy_kl_logps=-rng.uniform(5, 50, size).astype(np.float32),
                reference_kl_logps=-rng.uniform(5, 55, size).astype(np.float32))


def by_device(inputs):
    """[DEVICES, PER_DEVICE] views of [DEVICES * PER_DEVICE] inputs: device d holds examples d * PER_DEVICE, ..."""
    return {name: value.reshape(DEVICES, PER_DEVICE) for name, value in inputs.items()}


def main(output_path):
    assert jax.device_count() == DEVICES, f"expected {DEVICES} devices, got {jax.devices()} (XLA_FLAGS set?)"
    mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    # Explicit mesh axes need the inputs already split over 'data', as shard_map's in_specs say.
    batch_split = functools.partial(jax.device_put, device=NamedSharding(mesh, PartitionSpec("data")))
    inputs, kto = preference_inputs(), kto_inputs()

    def preference_shard(arrays):
        results = all_cases(arrays, BETA)
        return ([per_example for per_example, _ in results],
                [jax.lax.pmean(metrics, "data") for _, metrics in results],
                policy_gradients(arrays, BETA))

    preference_shard_map = jax.jit(jax.shard_map(
        preference_shard, mesh=mesh, in_specs=(PartitionSpec("data"),),
        out_specs=(PartitionSpec("data"), PartitionSpec(), PartitionSpec("data"))))
    def kto_shard(arrays):
        per_example, metrics = losses.kto_loss(**arrays, axis_name="data")
        return per_example, metrics["kl"]  # the other metrics are per shard

    kto_shard_map = jax.jit(jax.shard_map(kto_shard, mesh=mesh, in_specs=(PartitionSpec("data"),),
                                          out_specs=(PartitionSpec("data"), PartitionSpec())))
    results = {
        "pmap": jax.pmap(functools.partial(all_cases, beta=BETA))(by_device(inputs)),
        "kto_pmap": jax.pmap(functools.partial(losses.kto_loss, axis_name="data"), axis_name="data")(
            **by_device(kto)),
    }
    with jax.set_mesh(mesh):
        results["shard_map"] = preference_shard_map(batch_split(inputs))
        results["kto_shard_map"] = kto_shard_map(batch_split(kto))
    with open(output_path, "wb") as f:
        pickle.dump(jax.tree.map(np.asarray, results), f)


if __name__ == "__main__":
    main(sys.argv[1])
