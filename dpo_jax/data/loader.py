"""Deterministic, resumable batches with grain.

Training batches are a pure function of (seed, step): a grain MapDataset shuffles (reshuffling
every epoch, for as many epochs as the steps take), repeats and batches with random access, so
batch `step` is `dataset[step]` and a resumed run sees exactly the batches it would have seen,
with no iterator state to save (the Orbax checkpoint's step is the loader's whole state). Each
process reads only its own share of every global batch, and the global batch does not depend on
the number of processes. A unit is a row of the arrays: a pair (padded layout) or a packed row.
"""

import grain
import jax


class ArraySource:
    """A grain random-access source over a dict of equally long arrays; item i is {key: array[i]}."""

    def __init__(self, arrays):
        lengths = {key: len(value) for key, value in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"Arrays of one dataset must have equal lengths, got {lengths}")
        self._arrays = arrays
        self._length = next(iter(lengths.values()))

    def __len__(self):
        return self._length

    def __getitem__(self, index):
        return {key: value[index] for key, value in self._arrays.items()}


def _process_share(dataset, global_batch_size):
    if global_batch_size % jax.process_count():
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                         f"{jax.process_count()} processes")
    dataset = dataset.slice(slice(jax.process_index(), None, jax.process_count()))
    return dataset.batch(global_batch_size // jax.process_count(), drop_remainder=True)


def train_batches(arrays, *, global_batch_size, seed, mixture=None):
    """Endless shuffled batches (this process's rows of each global batch): index it by step.

    mixture: [(start, stop, weight)] of components (row ranges of `arrays`), each shuffled and
    repeated on its own, then interleaved in proportion to the weights (grain's MapDataset.mix).
    """
    if len(next(iter(arrays.values()))) < global_batch_size:
        raise ValueError(f"The training set has fewer examples than one global batch ({global_batch_size})")
    source = grain.MapDataset.source(ArraySource(arrays))
    if mixture is None:
        dataset = source.shuffle(seed=seed).repeat()
    else:
        components = [source[start:stop].shuffle(seed=seed + i).repeat() for i, (start, stop, _) in enumerate(mixture)]
        dataset = grain.MapDataset.mix(components, [weight for _, _, weight in mixture])
    return _process_share(dataset, global_batch_size)


def eval_batches(arrays, *, global_batch_size):
    """The held-out set in order, in full batches (a last partial batch is dropped)."""
    if len(next(iter(arrays.values()))) < global_batch_size:
        raise ValueError(f"The eval set has fewer examples than one eval batch ({global_batch_size})")
    return _process_share(grain.MapDataset.source(ArraySource(arrays)), global_batch_size)
