"""Content fingerprints: of parameters (for summaries and caches), of host arrays (datasets), and the
on-device checksums that checkpoints are verified with."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils


def params_fingerprint(params):
    """sha256 over the parameters' bytes, leaves in sorted key-path order (identical on every mesh)."""
    digest = hashlib.sha256()
    leaves = sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda item: jax.tree_util.keystr(item[0]))
    for path, leaf in leaves:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()


def arrays_fingerprint(arrays):
    """sha256 over a dict of host arrays: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{value.dtype}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


def _leaf_checksum(x):
    """Two 32-bit lanes over a leaf's bits: the sum, mod 2^32, of each element's bits times an odd weight
    of its position. Integer sums do not depend on the order of addition, so the checksum is the same on
    every mesh and sharding; any single flipped bit changes a lane (2^k times an odd number is not 0
    mod 2^32). Computed where the leaf lives, so no parameter leaves its device."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:  # 8-byte values become pairs of 32-bit words
        bits = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize]).astype(jnp.uint32)
    index, stride = jnp.zeros(bits.shape, jnp.uint32), 1
    for axis in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    first = bits * (index * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15) | jnp.uint32(1))
    second = (bits ^ (bits >> 15)) * ((index ^ jnp.uint32(0x5BD1E995)) * jnp.uint32(0x85EBCA77) | jnp.uint32(1))
    return jnp.stack([jnp.sum(first, dtype=jnp.uint32), jnp.sum(second, dtype=jnp.uint32)])


_tree_checksums = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def tree_checksums(tree):
    """{"params/layers/0/kernel": hex, ...}: a checksum per array leaf, named by its path (a dataclass
    field and a dict key of the same name give the same name, so a state and a dict of its parts agree)."""
    leaves = jax.tree_util.tree_leaves_with_path(_tree_checksums(tree))
    checksums = {}
    for path, lanes in leaves:
        if not lanes.is_fully_addressable:
            lanes = multihost_utils.process_allgather(lanes, tiled=True)
        first, second = np.asarray(lanes).tolist()
        checksums[jax.tree_util.keystr(path, simple=True, separator="/")] = f"{first:08x}{second:08x}"
    return checksums


def tree_digest(tree):
    """One hex digest of a tree's checksums: a cheap fingerprint of parameters that stay on their devices."""
    digest = hashlib.sha256()
    for name, checksum in sorted(tree_checksums(tree).items()):
        digest.update(f"{name}={checksum};".encode())
    return digest.hexdigest()
