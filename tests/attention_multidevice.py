"""The decoder's fused attention split over 8 CPU devices by `jax.shard_map`, against one device.

Run by tests/test_kernels.py in a fresh process (the device count is set before JAX starts):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/attention_multidevice.py IMPLEMENTATION BLOCK
Prints one JSON line: the loss and the largest gradient error relative to each leaf's largest entry,
on meshes splitting rows and heads (data x fsdp x tensor; traced under `sharding.on_mesh`, as
training's steps are) and rows only (data; under `jax.set_mesh`, as in a user's code), and with no
mesh in context (where the decoder takes the dense path, which jit partitions). BLOCK is `gated`
(SwiGLU: q, k, v and gate, up fused, each split over `tensor`) or `parallel` (GPT-J's one-norm
parallel block: q, k, v and the MLP's input as one matmul, split over `tensor`).
"""

import contextlib
import functools
import json
import sys

import jax
import numpy as np
from conftest import run_config
from test_kernels import _decoder_pairs

from dpo_jax import models, sharding, steps
from dpo_jax.data import layouts

BLOCKS = {"gated": dict(gated_mlp=True, activation="silu"),
          "parallel": dict(parallel_residual=True, shared_block_norm=True, attention_bias=False)}


def main(implementation, block):
    config = run_config("quickstart", "runlocal")
    config.model.update(position_embedding="rope", num_heads=4, num_kv_heads=2, num_layers=1,
                        max_position_embeddings=256, **BLOCKS[block])
    arrays = layouts.pair_arrays(_decoder_pairs(8, seed=0, max_length=60), "packed_prefix_shared", max_length=60,
                                 row_length=120, max_pairs_per_row=2)
    rows = len(arrays["input_ids"])
    keep = rows - rows % 4  # whole rows per device on the meshes below
    arrays = {key: value[:keep] for key, value in arrays.items()}
    params = models.init_params(config.model, seed=1, shardings=None)
    reference_params = jax.tree.map(lambda p: p * 1.05, params)

    def loss_and_grads(kernel, mesh=None, context=None, fused=True):
        model_config = {**config.model, "attention_kernel": kernel, "fused_qkv": fused, "fused_gate_up": fused,
                        "fused_parallel_inputs": fused}
        graphdef = models.abstract_model(model_config)[0]
        loss_fn = functools.partial(steps.dpo_loss, graphdef=graphdef, dpo_config=config.dpo)
        fn = jax.value_and_grad(lambda p, batch: loss_fn(p, reference_params, batch, None)[0])
        if mesh is None:
            return jax.jit(fn)(params, arrays)
        plan = models.abstract_model(model_config)
        shardings = sharding.param_shardings(plan[1], plan[2], mesh)
        batch = {key: jax.device_put(value, sharding.batch_sharding(mesh)) for key, value in arrays.items()}
        if context == "on_mesh":  # as training jits its steps
            fn = sharding.on_mesh(fn, mesh)
        with jax.set_mesh(mesh) if context == "set_mesh" else contextlib.nullcontext():
            jaxpr = str(jax.make_jaxpr(fn)(params, batch))
            loss, grads = jax.jit(fn, in_shardings=(shardings, sharding.batch_sharding(mesh)))(
                jax.device_put(params, shardings), batch)
        return loss, grads, "shard_map" in jaxpr and "pallas_call" in jaxpr

    # One device, dense attention and separate projections: what each mesh's fused paths must equal.
    expected_loss, expected_grads = loss_and_grads("dense", fused=False)
    results = {}
    rows_and_heads = dict(dcn=1, data=2, fsdp=2, tensor=2)
    rows = dict(dcn=1, data=8 if keep % 8 == 0 else 4, fsdp=1, tensor=-1)
    for name, mesh_config, context in (("rows_and_heads", rows_and_heads, "on_mesh"), ("rows", rows, "set_mesh"),
                                       ("no_mesh_in_context", rows_and_heads, None)):
        mesh = sharding.make_mesh(mesh_config)
        loss, grads, kernel_per_device = loss_and_grads(implementation, mesh, context)
        errors = jax.tree.map(lambda g, e: float(np.abs(np.asarray(g) - np.asarray(e)).max()
                                                 / max(np.abs(np.asarray(e)).max(), 1e-30)), grads, expected_grads)
        results[name] = {"loss": float(loss), "max_gradient_error": max(jax.tree.leaves(errors)),
                         "devices": mesh.size, "kernel_per_device": kernel_per_device}
    print(json.dumps({"expected_loss": float(expected_loss), "meshes": results}))


if __name__ == "__main__":
    main(*sys.argv[1:])
