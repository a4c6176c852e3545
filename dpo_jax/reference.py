"""The precomputed reference: its log-probs for a whole dataset, computed once and cached.

With `config.dpo.reference = 'precomputed'` training holds no reference model at all: a first
pass runs the reference over every pair and stores the two sequence log-probs per pair in
`<cache dir>/<key>.npz`. The key is a fingerprint of the token arrays (so of the dataset and its
tokenisation and truncation settings) and of the reference parameters, so a later run with the
same data and reference reuses the file, and any change to either recomputes it.
"""

import hashlib
import os
import zipfile

import jax
import numpy as np
import tqdm
from absl import logging

from dpo_jax import fingerprints, sharding, steps, storage
from dpo_jax.data import loader


def _compute(arrays, params, *, graphdef, mesh, param_shardings, batch_size, desc):
    num_pairs = len(next(iter(arrays.values())))  # units: pairs, or packed rows of pairs
    padded = -num_pairs % batch_size  # the last batch is completed with copies of pair 0, then dropped
    arrays = {key: np.concatenate([value, np.repeat(value[:1], padded, axis=0)]) for key, value in arrays.items()}
    compute = jax.jit(sharding.on_mesh(lambda p, batch: steps.reference_logps(p, batch, graphdef=graphdef), mesh),
                      in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                      out_shardings=sharding.replicated(mesh))
    outputs = [jax.device_get(compute(params, sharding.global_batch(local_batch, mesh)))
               for local_batch in tqdm.tqdm(loader.eval_batches(arrays, global_batch_size=batch_size), desc=desc,
                                            disable=jax.process_index() != 0)]
    return {key: np.concatenate([out[key] for out in outputs])[:num_pairs] for key in outputs[0]}


CACHED_KEYS = ("reference_chosen_logps", "reference_rejected_logps")


def _read_cache(path, splits):
    """{split: {key: log-probs}} of the cache file `path`, checked against the splits' arrays; a file
    that is not such a cache (corrupt, forged, pickled) is a ValueError naming it. Never unpickles."""
    retry = "; delete it to compute the reference log-probs again"
    try:
        with storage.open_file(path, "rb") as f:
            cached = np.load(f, allow_pickle=False)
            if not isinstance(cached, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not an .npz archive")
            with cached:
                logps = {name: {k[len(name) + 1:]: cached[k] for k in cached.files if k.startswith(name + "/")}
                         for name in splits}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as error:
        problem = "it holds pickled data, which is never loaded" if "pickle" in str(error) else error
        raise ValueError(f"{path}: not a readable reference log-probs cache ({problem}){retry}") from None
    for name, arrays in splits.items():
        shape = arrays["pair_mask"].shape if "pair_mask" in arrays else (len(next(iter(arrays.values()))),)
        for key in CACHED_KEYS:
            value = logps[name].get(key)
            if value is None or value.dtype.kind != "f" or value.shape != shape:
                found = "absent" if value is None else f"{value.dtype}{list(value.shape)}"
                raise ValueError(f"{path}: not a reference log-probs cache of this data: {name}/{key} is {found}, "
                                 f"expected float{list(shape)}{retry}")
    return logps


def with_reference_logps(splits, params, *, graphdef, mesh, param_shardings, batch_size, cache_dir):
    """Each split's arrays plus `reference_chosen_logps` / `reference_rejected_logps` [pairs] float32."""
    key = hashlib.sha256("".join([fingerprints.params_fingerprint(params)] + [
        f"{name}:{fingerprints.arrays_fingerprint(arrays)}" for name, arrays in sorted(splits.items())
    ]).encode()).hexdigest()[:32]
    path = os.path.join(cache_dir, f"{key}.npz")
    if storage.exists(path):
        logging.info("Reference log-probs from %s", path)
        logps = _read_cache(path, splits)
    else:
        logps = {name: _compute(arrays, params, graphdef=graphdef, mesh=mesh, param_shardings=param_shardings,
                                batch_size=batch_size, desc=f"reference log-probs ({name})")
                 for name, arrays in splits.items()}
        flat = {f"{name}/{k}": v for name, split in logps.items() for k, v in split.items()}
        storage.write_bytes(path, lambda f: np.savez(f, **flat))
        logging.info("Reference log-probs written to %s", path)
    return {name: {**arrays, **logps[name]} for name, arrays in splits.items()}
