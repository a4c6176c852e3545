"""Orbax checkpoints of the train state; the only module that imports orbax.

One `CheckpointManager` per stage under `<workdir>/checkpoints/<stage>/`.
- Saves are asynchronous (training goes on while a checkpoint is written) and atomic: Orbax
  writes into a temporary directory and renames it when complete, so a run killed mid-write
  leaves the previous checkpoints as they were.
- A save happens every N steps, every T minutes (if set), at a preemption, and when forced.
- Kept: the last K checkpoints, plus the best one by an eval metric (if set).
- Restores take abstract arrays with shardings, so a checkpoint restores straight onto the
  current mesh, each process reading only its shards. A checkpoint that fails to restore
  (truncated, missing files, a different tree) is moved aside to `<checkpoints>/quarantine/` (never
  deleted) and the next newest is tried.
"""

import logging as std_logging
import os
import sys
import time
import warnings

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as policies

from dpo_jax import fingerprints, storage


def _orbax_warnings_only(record):
    return "/orbax/" not in record.pathname or record.levelno >= std_logging.WARNING


def quiet_orbax_logs():
    """Orbax logs every save and every checkpoint it opens at INFO: keep its warnings and errors only."""
    logging.get_absl_logger().addFilter(_orbax_warnings_only)


# The file of a step directory in which Orbax keeps the step's metadata, `custom_metadata` included.
_STEP_METADATA = "_CHECKPOINT_METADATA"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or none could be restored."""


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs of `abstract_tree` carrying `shardings` (a tree of the same structure)."""
    return jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        abstract_tree, shardings)


def _restore_args(abstract_tree, *, partial=False):
    return ocp.args.PyTreeRestore(item=abstract_tree,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_tree),
                                  partial_restore=partial)


def _check_complete(restored, abstract_tree):
    """Orbax fills leaves missing from a partial restore with their abstract values: a checkpoint
    of another tree must not pass for this one."""
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(abstract_tree)):
        name = jax.tree_util.keystr(path)
        if not isinstance(got, jax.Array):
            raise ValueError(f"the checkpoint has no array {name} (a different model?)")
        if (got.shape, got.dtype) != (want.shape, want.dtype):
            raise ValueError(f"the checkpoint's {name} is {got.shape} {got.dtype}, expected {want.shape} {want.dtype}")
    return restored


class StageCheckpoints:
    """Save / restore the train state of one stage."""

    def __init__(self, directory, *, max_to_keep=None, save_every_steps=1, save_every_minutes=0.0,
                 best_metric="", best_mode="min"):
        self.directory = storage.absolute(directory)
        self.restored_step = None
        save_policies = [policies.FixedIntervalPolicy(save_every_steps), policies.PreemptionCheckpointingPolicy()]
        if save_every_minutes:
            save_policies.append(policies.ContinuousCheckpointingPolicy(
                minimum_interval_secs=int(save_every_minutes * 60)))
        keep = [policies.LatestN(max_to_keep)]
        if best_metric:
            keep.append(policies.BestN(get_metric_fn=lambda metrics: metrics[best_metric], n=1,
                                       reverse=best_mode == "min", keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy(save_policies),
            preservation_policy=policies.AnyPreservationPolicy(keep), create=True,
            enable_async_checkpointing=True)
        # One item per checkpoint, declared rather than inferred from what a step directory holds,
        # so that a damaged step cannot change how the others are read.
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=ocp.PyTreeCheckpointHandler())

    def latest_step(self):
        return self._manager.latest_step()

    def all_steps(self):
        return list(self._manager.all_steps())

    def should_save(self, step):
        """Whether `save(step, ...)` without `force` will write a checkpoint."""
        return self._manager.should_save(step)

    def reached_preemption(self, step):
        """True on every process at the same step once any process got a preemption notice
        (multi-process runs; JAX's preemption service propagates SIGTERM)."""
        return self._manager.reached_preemption(step)

    def save(self, step, state, *, metrics=None, force=False, start=None):
        """Starts an asynchronous save if the policies say so (or `force`); returns whether it did.

        The step's metadata holds a checksum of every array (`fingerprints.tree_checksums`), which
        restores verify, and `start`: the digest of what the stage started from (`start_digest`).
        A failure of an earlier asynchronous save surfaces here or in `wait` as CheckpointError;
        the checkpoints written before it are intact.
        """
        if not force and not self._manager.should_save(step):
            return False
        custom_metadata = {"checksums": fingerprints.tree_checksums(state), "start": start}
        try:
            return self._manager.save(step, args=ocp.args.PyTreeSave(state), metrics=metrics, force=force,
                                      custom_metadata=custom_metadata)
        except Exception as error:  # noqa: BLE001 - any write failure is reported the same way
            raise self._write_error(step, error) from error

    def wait(self):
        try:
            self._manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001
            raise self._write_error(None, error) from error

    def _write_error(self, step, error):
        self._drop_echoes_of_a_failed_save()
        done = [s for s in self._manager.all_steps() if step is None or s < step]
        kept = f"the checkpoint of step {max(done)} is intact" if done else "no earlier checkpoint exists"
        return CheckpointError(f"Could not write a checkpoint to {self.directory} (disk full or not writable?): "
                               f"{type(error).__name__}: {error}. {kept}.")

    @staticmethod
    def _drop_echoes_of_a_failed_save():
        """A failed save leaves writes in flight on an event loop Orbax has closed (its `asyncio.gather`
        does not cancel the other writes when one fails). As they end, each prints a traceback of the
        same failure, some after the run's error message, up to its exit: TensorStore's callbacks'
        `RuntimeError: Event loop is closed`, asyncio's "exception was never retrieved" and "coroutine
        ... was never awaited". The CheckpointError carries the cause; these echoes are dropped."""
        if getattr(sys.unraisablehook, "drops_closed_loop_echoes", False):
            return
        previous_hook = sys.unraisablehook
        echo = lambda unraisable: (isinstance(unraisable.exc_value, RuntimeError)
                                   and str(unraisable.exc_value) == "Event loop is closed")
        hook = lambda unraisable: None if echo(unraisable) else previous_hook(unraisable)
        hook.drops_closed_loop_echoes = True
        sys.unraisablehook = hook
        std_logging.getLogger("asyncio").addFilter(lambda record: "exception was never retrieved" not in
                                                   record.getMessage())
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)

    def _quarantine(self, step, error):
        """Moves a checkpoint that failed to restore out of the way, keeping its files."""
        quarantine = os.path.join(os.path.dirname(self.directory), "quarantine")
        target = os.path.join(quarantine, f"{os.path.basename(self.directory)}-{step}-{time.time_ns()}")
        logging.warning("Checkpoint %s/%d does not restore (%s: %s); moved to %s, trying an older one",
                        self.directory, step, type(error).__name__, str(error).splitlines()[0][:300], target)
        if jax.process_index() == 0:
            storage.move(os.path.join(self.directory, str(step)), target)
        self._manager.reload()

    def _custom_metadata(self, step):
        """What `save` recorded with `step`. Read here rather than through Orbax, which takes an
        unreadable metadata file for an empty one."""
        path = storage.join(self.directory, str(step), _STEP_METADATA)
        try:
            metadata = storage.read_json(path)
        except (OSError, ValueError) as error:
            raise ValueError(f"its metadata {path} does not read ({type(error).__name__}: {error})") from error
        if not isinstance(metadata, dict):
            raise ValueError(f"its metadata {path} is not a JSON object")
        return metadata.get("custom_metadata") or {}

    def recorded_start(self):
        """The digest of what the stage started from (`save`'s `start`), as the newest step whose
        metadata reads recorded it; None if none did."""
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                return self._custom_metadata(step).get("start")
            except ValueError:
                continue
        return None

    def _verify(self, step, restored):
        """Checks the restored arrays against the checksums saved with them: a flipped bit in an array
        file can decode to a plausible value, which only the checksum tells apart."""
        saved = self._custom_metadata(step).get("checksums")
        if saved is None:
            logging.warning("Checkpoint %s/%d holds no checksums (written by an earlier version); restored "
                            "unverified", self.directory, step)
            return restored
        for name, checksum in fingerprints.tree_checksums(restored).items():
            if saved.get(name) != checksum:
                raise ValueError(f"its array {name} does not match the checksum saved with it "
                                 f"(the checkpoint's files changed after they were written)")
        return restored

    def _restore_newest_good(self, restore_one):
        """Tries the checkpoints newest first; those newer than the first that restores are moved
        aside. If none restores, nothing is moved (the fault may not be the checkpoints').
        `restored_step` is the step restored."""
        errors = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored = self._verify(step, restore_one(step))
            except Exception as error:  # noqa: BLE001 - whatever is wrong with it, it is not loaded
                errors.append((step, error))
                continue
            for bad_step, error in errors:
                self._quarantine(bad_step, error)
            self.restored_step = step
            return restored
        detail = "; ".join(f"step {step}: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
                           for step, error in errors) or "it holds no checkpoint"
        raise CheckpointError(f"No checkpoint in {self.directory} restores ({detail})")

    def restore(self, abstract_state):
        """The newest train state that restores, placed as `abstract_state`'s shardings say."""
        return self._restore_newest_good(lambda step: _check_complete(
            self._manager.restore(step, args=_restore_args(abstract_state)), abstract_state))

    def restore_params(self, abstract_params, *, step=None):
        """Only the `params` of the newest saved train state that restores, or of `step` (which must
        restore: an error names it, and nothing is moved). A stage whose params hold several models
        under names (PPO's {"policy", "value"}, the online stages' {"policy"}) gives its policy, when
        `abstract_params` is one model."""
        def restore_one(step):  # the tree as saved (its checksums name its paths)
            named = self._holds_named_policy(step, abstract_params)
            abstract = {"params": {"policy": abstract_params} if named else abstract_params}
            return _check_complete(self._manager.restore(step, args=_restore_args(abstract, partial=True)), abstract)

        if step is None:
            params = self._restore_newest_good(restore_one)["params"]
        else:
            if step not in self._manager.all_steps():
                raise CheckpointError(f"{self.directory} holds no checkpoint of step {step} "
                                      f"(it holds {sorted(self._manager.all_steps())})")
            try:
                params = self._verify(step, restore_one(step))["params"]
            except Exception as error:  # noqa: BLE001 - whatever is wrong with it, it is not loaded
                raise CheckpointError(f"Checkpoint {self.directory}/{step} does not restore: "
                                      f"{type(error).__name__}: {str(error).splitlines()[0][:300]}") from error
            self.restored_step = step
        return params["policy"] if self._holds_named_policy(self.restored_step, abstract_params) else params

    def _holds_named_policy(self, step, abstract_params):
        """Whether `step` saved params {"policy": ..., ...} while `abstract_params` is not so named."""
        if isinstance(abstract_params, dict) and "policy" in abstract_params:
            return False
        try:
            saved = self._manager.item_metadata(step)["params"]
        except Exception:  # noqa: BLE001 - unreadable metadata: the restore itself says what is wrong
            return False
        return isinstance(saved, dict) and "policy" in saved

    def delete(self, step):
        """Deletes the checkpoint of `step` (e.g. one evaluated and no longer needed)."""
        self._manager.delete(step)

    def close(self):
        self._manager.close()


def restore_params(directory, abstract_params):
    """The params of the newest checkpoint in a stage's checkpoint directory."""
    if not storage.isdir(directory):
        raise CheckpointError(f"Checkpoint directory {directory} does not exist")
    checkpoints = StageCheckpoints(directory)
    try:
        return checkpoints.restore_params(abstract_params)
    finally:
        checkpoints.close()
