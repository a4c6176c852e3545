"""Mesh from the config, logical axis rules, and the shardings of batches and train state.

Parameters carry logical axis names (`dpo_jax.models`); `LOGICAL_AXIS_RULES` maps each name to
mesh axes, so changing the parallelism is a config change: data parallel over `data` (and over
slices with `dcn`), parameters split over `fsdp`, heads and MLP split over `tensor`. Batches are
split over `dcn` x `data` x `fsdp`.
"""

import functools
import math

import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("dcn", "data", "fsdp", "tensor")  # dcn: data parallel across TPU slices (multi-slice)
BATCH_AXES = ("dcn", "data", "fsdp")

LOGICAL_AXIS_RULES = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
}


def mesh_shape(mesh_config, num_devices):
    """Axis sizes of `config.mesh` for `num_devices`, resolving one -1 to the rest of the devices."""
    sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
    unknown = [axis for axis, size in sizes.items() if size == -1]
    if len(unknown) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {sizes}")
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"config.mesh: sizes must be positive or -1, got {sizes}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(f"config.mesh {sizes}: {num_devices} devices are not divisible by {known}")
        sizes[unknown[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"config.mesh {sizes} needs {math.prod(sizes.values())} devices, "
                         f"but {num_devices} are available")
    return sizes


def make_mesh(mesh_config, devices=None):
    """A `jax.sharding.Mesh` with axes (dcn, data, fsdp, tensor); Auto axes, so jit shardings drive
    the partitioning. Devices are ordered by the physical topology (and by slice for `dcn`)."""
    devices = jax.devices() if devices is None else devices
    sizes = mesh_shape(mesh_config, len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    if sizes["dcn"] > 1 and hasattr(devices[0], "slice_index"):
        device_array = mesh_utils.create_hybrid_device_mesh((1,) + shape[1:], (sizes["dcn"], 1, 1, 1), devices)
    else:
        device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return jax.sharding.Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def on_mesh(fn, mesh):
    """`fn` traced with `mesh` in context (`jax.sharding.get_abstract_mesh()`), to jit: the fused
    attention kernels read it to split themselves over the devices (`models.transformer.attend`).
    Only while it is traced: a mesh in context also changes how Flax creates variables."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    return traced


def logical_to_mesh(spec: PartitionSpec, shape, mesh) -> PartitionSpec:
    """Maps a logical PartitionSpec to mesh axes; an axis the mesh axis does not divide stays replicated."""
    mesh_axes = []
    for name, dim in zip(tuple(spec) + (None,) * (len(shape) - len(spec)), shape):
        axes = LOGICAL_AXIS_RULES.get(name) if name else None
        size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
        mesh_axes.append(axes if axes and size > 1 and dim % size == 0 else None)
    return PartitionSpec(*mesh_axes)


def param_shardings(abstract_params, logical_specs, mesh):
    """NamedShardings for a params tree, from its logical partition specs."""
    return jax.tree.map(lambda param, spec: NamedSharding(mesh, logical_to_mesh(spec, param.shape, mesh)),
                        abstract_params, logical_specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh):
    """Batches: leading (example) axis split over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh):
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch, mesh):
    """Assembles each process's rows of a batch into global jax.Arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in local_batch.items()}


def check_batch_size(batch_size, mesh, name):
    """Raises before any compile when the batch axes do not divide `batch_size`."""
    shards = math.prod(mesh.shape[axis] for axis in BATCH_AXES)
    if batch_size % shards:
        raise ValueError(f"{name}={batch_size} is not divisible by the mesh's batch axes "
                         f"dcn x data x fsdp = {shards}")


def opt_state_shardings(optimizer, abstract_opt_state, param_shardings, mesh):
    """Optimizer moments sharded like their parameters; counters and other scalars replicated.
    Parameters an `optax.multi_transform` leaves without state (frozen under LoRA) stay empty."""
    masked = lambda x: isinstance(x, optax.MaskedNode)
    return optax.tree_map_params(
        optimizer, lambda state, param_sharding: state if masked(state) else param_sharding, abstract_opt_state,
        param_shardings, transform_non_params=lambda _: replicated(mesh), is_leaf=masked)


def bytes_per_device(tree):
    """The most bytes any one device holds of a tree of jax.Arrays (its addressable shards)."""
    per_device = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)
