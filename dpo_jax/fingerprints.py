"""Content fingerprints: of parameters (for summaries and caches) and of host arrays (datasets)."""

import hashlib

import jax
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
