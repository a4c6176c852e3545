"""Orbax checkpoints of the train state; the only module that imports orbax.

One `CheckpointManager` per stage under `<workdir>/checkpoints/<stage>/`. Saves are asynchronous
(training goes on while a checkpoint is written) and every process writes its own shards.
Restores take abstract arrays with shardings, so a checkpoint restores straight onto the
current mesh, each process reading only its shards.
"""

import os

import jax
import orbax.checkpoint as ocp


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs of `abstract_tree` carrying `shardings` (a tree of the same structure)."""
    return jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        abstract_tree, shardings)


def _restore_args(abstract_tree, *, partial=False):
    return ocp.args.PyTreeRestore(item=abstract_tree,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_tree),
                                  partial_restore=partial)


class StageCheckpoints:
    """Save / restore the train state of one stage."""

    def __init__(self, directory, *, max_to_keep=None, save_every_steps=1):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_every_steps, create=True,
            enable_async_checkpointing=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self):
        return self._manager.latest_step()

    def save(self, step, state, *, force=False):
        """Starts an asynchronous save if `step` is a save step (or `force`); returns whether it did."""
        return self._manager.save(step, args=ocp.args.PyTreeSave(state), force=force)

    def restore(self, abstract_state, step=None):
        """The state saved at `step` (default: the latest), placed as `abstract_state`'s shardings say."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}")
        return self._manager.restore(step, args=_restore_args(abstract_state))

    def restore_params(self, abstract_params, step=None):
        """Only the `params` of a saved train state (e.g. to start a new stage from them)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}")
        return self._manager.restore(step, args=_restore_args({"params": abstract_params}, partial=True))["params"]

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.close()


def restore_params(directory, abstract_params):
    """The params of the newest checkpoint in a stage's checkpoint directory."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"Checkpoint directory {directory} does not exist")
    checkpoints = StageCheckpoints(directory)
    try:
        return checkpoints.restore_params(abstract_params)
    finally:
        checkpoints.close()
