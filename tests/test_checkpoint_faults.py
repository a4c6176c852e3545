"""Damaged checkpoints: each fault either restores exactly what was saved, or is caught, set aside in
`quarantine/`, and the previous step restores exactly. Never a changed parameter.

The checkpoints hold the tiny quickstart model's parameters (random values) at steps 1 and 2; step 2
is damaged, then restored the way a resumed run restores it.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import run_config

from dpo_jax import checkpointing, planning, sharding


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(directory of checkpoints 1 and 2, abstract params, {step: params})."""
    config = run_config("quickstart", "runlocal")
    abstract = planning.plan_model(config, sharding.make_mesh(config.mesh, jax.devices()[:1])).abstract_params
    rng = np.random.default_rng(0)
    params = {1: jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), abstract)}
    params[2] = jax.tree.map(lambda x: x * 0.5 + 1, params[1])
    on_device = lambda tree: jax.device_put(tree, jax.devices()[0])  # as a run saves them: with shardings
    directory = str(tmp_path_factory.mktemp("saved") / "sft")
    checkpoints = checkpointing.StageCheckpoints(directory, max_to_keep=5)
    for step in (1, 2):
        checkpoints.save(step, on_device({"params": params[step], "step": np.int32(step)}), start="start-digest")
        checkpoints.wait()
    checkpoints.close()
    return directory, abstract, params


def _copy(saved, tmp_path):
    directory, _, _ = saved
    copy = str(tmp_path / "sft")
    shutil.copytree(directory, copy)
    return copy


def _files(step_dir):
    return sorted(os.path.join(root, name) for root, _, names in os.walk(step_dir) for name in names)


def _restore(directory, abstract):
    """(step restored, params) as a resumed run gets them."""
    checkpoints = checkpointing.StageCheckpoints(directory)
    try:
        params = checkpoints.restore_params(abstract)
        return checkpoints.restored_step, params
    finally:
        checkpoints.close()


def _equal(tree, other):
    return all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(other)))


# Which files of a step directory to flip bits in, by what they hold.
ROLES = {
    "array data": lambda path: "/d/" in path and "ocdbt.process" in path,
    "array index": lambda path: path.endswith("manifest.ocdbt"),
    "tree metadata": lambda path: path.endswith(os.path.join("default", "_METADATA")),
    "shardings": lambda path: path.endswith("_sharding"),
    "array metadata": lambda path: "array_metadatas" in path,
    "step metadata (checksums)": lambda path: path.endswith(checkpointing._STEP_METADATA),
}


@pytest.mark.parametrize("role", list(ROLES))
def test_a_flipped_bit_anywhere_never_loads_changed_parameters(saved, tmp_path, role, caplog):
    _, abstract, params = saved
    targets = [path for path in _files(os.path.join(saved[0], "2")) if ROLES[role](path) and os.path.getsize(path)]
    assert targets, f"no {role} file in the checkpoint"
    rng = np.random.default_rng(sum(map(ord, role)))
    for trial in range(6):
        directory = _copy(saved, tmp_path / str(trial))
        target = directory + targets[trial % len(targets)][len(saved[0]):]
        data = bytearray(open(target, "rb").read())
        data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
        open(target, "wb").write(data)
        step, restored = _restore(directory, abstract)
        assert _equal(restored, params[step]), f"step {step} restored with changed parameters ({target})"
        if step == 1:  # caught: the damaged step is kept aside, not deleted
            assert os.listdir(tmp_path / str(trial) / "quarantine")
    if role == "array data":  # some flips land in the values themselves, which decode: the checksum catches them
        assert any("does not match the checksum saved with it" in record.getMessage() for record in caplog.records)


def _truncate_largest(directory):
    path = max((p for p in _files(os.path.join(directory, "2")) if "/d/" in p), key=os.path.getsize)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _empty_largest(directory):
    path = max((p for p in _files(os.path.join(directory, "2")) if "/d/" in p), key=os.path.getsize)
    open(path, "wb").close()


def _delete_data(directory):
    for path in _files(os.path.join(directory, "2")):
        if "/d/" in path:
            os.remove(path)


def _delete_item(directory):
    shutil.rmtree(os.path.join(directory, "2", "default"))


def _delete_step_metadata(directory):
    os.remove(os.path.join(directory, "2", checkpointing._STEP_METADATA))


def _step_metadata_not_json(directory):
    with open(os.path.join(directory, "2", checkpointing._STEP_METADATA), "w") as f:
        f.write("{not json")


def _forge_a_checksum(directory):
    path = os.path.join(directory, "2", checkpointing._STEP_METADATA)
    metadata = json.load(open(path))
    checksums = metadata["custom_metadata"]["checksums"]
    name = sorted(checksums)[0]
    checksums[name] = "0" * 16
    json.dump(metadata, open(path, "w"))


def _empty_step_directory(directory):
    shutil.rmtree(os.path.join(directory, "2"))
    os.makedirs(os.path.join(directory, "2"))


def _step_is_a_file(directory):
    shutil.rmtree(os.path.join(directory, "2"))
    open(os.path.join(directory, "2"), "w").close()


def _swap_arrays_between_steps(directory):
    """Step 2's array files replaced by step 1's: a well-formed checkpoint of other values."""
    shutil.rmtree(os.path.join(directory, "2", "default"))
    shutil.copytree(os.path.join(directory, "1", "default"), os.path.join(directory, "2", "default"))


FAULTS = {
    "truncated array file": _truncate_largest,
    "empty array file": _empty_largest,
    "array files deleted": _delete_data,
    "item directory deleted": _delete_item,
    "step metadata deleted": _delete_step_metadata,
    "step metadata not JSON": _step_metadata_not_json,
    "a checksum forged": _forge_a_checksum,
    "empty step directory": _empty_step_directory,
    "step directory is a file": _step_is_a_file,
    "another step's arrays": _swap_arrays_between_steps,
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one_exactly(saved, tmp_path, fault):
    _, abstract, params = saved
    directory = _copy(saved, tmp_path)
    FAULTS[fault](directory)
    step, restored = _restore(directory, abstract)
    assert step == 1 and _equal(restored, params[1])
    if fault == "step directory is a file":  # not a checkpoint: ignored, and left as it is
        assert sorted(os.listdir(directory)) == ["1", "2"] and not os.path.exists(tmp_path / "quarantine")
    else:  # set aside, kept
        assert sorted(os.listdir(directory)) == ["1"]
        assert len(os.listdir(tmp_path / "quarantine")) == 1


def test_checkpoints_written_before_checksums_restore_unverified(saved, tmp_path):
    _, abstract, params = saved
    directory = _copy(saved, tmp_path)
    path = os.path.join(directory, "2", checkpointing._STEP_METADATA)
    metadata = json.load(open(path))
    del metadata["custom_metadata"]
    json.dump(metadata, open(path, "w"))
    step, restored = _restore(directory, abstract)
    assert step == 2 and _equal(restored, params[2])


def test_every_damaged_checkpoint_is_one_error_naming_the_directory_and_nothing_moves(saved, tmp_path):
    _, abstract, _ = saved
    directory = _copy(saved, tmp_path)
    for step in ("1", "2"):
        os.remove(os.path.join(directory, step, checkpointing._STEP_METADATA))
    with pytest.raises(checkpointing.CheckpointError, match=f"No checkpoint in {directory} restores") as error:
        _restore(directory, abstract)
    assert "step 2:" in str(error.value) and "step 1:" in str(error.value)
    assert sorted(os.listdir(directory)) == ["1", "2"] and not os.path.exists(tmp_path / "quarantine")


def test_the_start_of_a_stage_is_recorded_with_its_checkpoints(saved, tmp_path):
    directory = _copy(saved, tmp_path)
    checkpoints = checkpointing.StageCheckpoints(directory)
    assert checkpoints.recorded_start() == "start-digest"
    checkpoints.close()
    _step_metadata_not_json(directory)  # the newest that reads tells
    checkpoints = checkpointing.StageCheckpoints(directory)
    assert checkpoints.recorded_start() == "start-digest"
    checkpoints.close()


def test_a_given_step_restores_exactly_and_a_damaged_one_is_an_error_that_moves_nothing(saved, tmp_path):
    _, abstract, params = saved
    directory = _copy(saved, tmp_path)
    checkpoints = checkpointing.StageCheckpoints(directory)
    try:
        assert _equal(checkpoints.restore_params(abstract, step=1), params[1]) and checkpoints.restored_step == 1
        with pytest.raises(checkpointing.CheckpointError, match=r"holds no checkpoint of step 3 \(it holds \[1, 2\]\)"):
            checkpoints.restore_params(abstract, step=3)
        _forge_a_checksum(directory)  # step 2's
        damaged = f"Checkpoint {directory}/2 does not restore: .*checksum"
        with pytest.raises(checkpointing.CheckpointError, match=damaged):
            checkpoints.restore_params(abstract, step=2)
        assert sorted(os.listdir(directory)) == ["1", "2"] and not os.path.exists(tmp_path / "quarantine")
        checkpoints.delete(1)
        assert checkpoints.all_steps() == [2] and sorted(os.listdir(directory)) == ["2"]
    finally:
        checkpoints.close()
