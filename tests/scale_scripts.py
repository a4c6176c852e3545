"""Scripts the scale-out tests run in subprocesses with several fake CPU devices.

`python tests/scale_scripts.py NAME ARGS...` prints one JSON line with the results.
"""

import json
import os
import sys

import jax
import numpy as np

from dpo_jax import checkpointing, fingerprints, models, planning, sharding, stages, steps
from dpo_jax.configs import load_config
from dpo_jax.data import loader
from dpo_jax.data.task import load_task

QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart.py")


def _tiny():
    config = load_config(QUICKSTART + ":runlocal")
    config.model.embed_dim = 64  # every sharded dimension divisible by 8
    return config


def state_bytes_per_device():
    """Train-state bytes on the fullest device, with the parameters split over fsdp = 1, 2, 4, 8 devices."""
    config = _tiny()
    results = {}
    for count in (1, 2, 4, 8):
        config.mesh.data, config.mesh.fsdp = 1, count
        mesh = sharding.make_mesh(config.mesh, jax.devices()[:count])
        model = planning.plan_model(config, mesh)
        plan = stages.STAGES["dpo"].plan(config, mesh, model)
        params = jax.jit(lambda: jax.tree.map(lambda p: jax.numpy.zeros(p.shape, p.dtype), model.abstract_params),
                         out_shardings=model.param_shardings)()
        state = planning.init_state(plan, params)
        results[count] = sharding.bytes_per_device(state)
    return results


def pmap_matches_jit():
    """Two DPO steps with the pmap form over 8 devices and with jit on one device: the parameters."""
    config = _tiny()
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    model = planning.plan_model(config, mesh)
    plan = stages.STAGES["dpo"].plan(config, mesh, model)
    task = load_task(config)
    batches = loader.train_batches(task.pairs_train, global_batch_size=config.train.global_batch_size, seed=0)
    params = models.init_params(config.model, seed=0, shardings=model.param_shardings)

    jit_step = jax.jit(lambda s, b: steps.train_step(s, b, loss_fn=plan.loss_fn, optimizer=plan.optimizer,
                                                     schedule=plan.schedule))
    state = plan.init_state(params)
    for step in range(2):
        state, jit_metrics = jit_step(state, batches[step])

    pmap_step = steps.pmap_train_step(loss_fn=plan.loss_fn, optimizer=plan.optimizer, schedule=plan.schedule)
    devices = jax.device_count()
    replicated = jax.tree.map(lambda x: np.stack([np.asarray(x)] * devices), plan.init_state(params))
    for step in range(2):
        split = {k: v.reshape(devices, -1, *v.shape[1:]) for k, v in batches[step].items()}
        replicated, pmap_metrics = pmap_step(replicated, split)
    pmap_params = jax.tree.map(lambda x: np.asarray(x[0]), replicated.params)
    differences = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
                                               state.params, pmap_params))
    return {"max_param_difference": max(differences), "jit_loss": float(jit_metrics["loss"]),
            "pmap_loss": float(pmap_metrics["loss"][0])}


def restore_fingerprint(directory):
    """Restores a DPO checkpoint onto this process's devices as an fsdp mesh; the params' fingerprint."""
    config = _tiny()
    config.mesh.data, config.mesh.fsdp = 1, -1
    mesh = sharding.make_mesh(config.mesh)
    model = planning.plan_model(config, mesh)
    params = checkpointing.restore_params(directory, model.abstract_params)
    shards = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(params)}
    return {"fingerprint": fingerprints.params_fingerprint(params), "devices": jax.device_count(),
            "specs": sorted(shards)}


if __name__ == "__main__":
    name, *args = sys.argv[1:]
    print(json.dumps(globals()[name](*args)))
