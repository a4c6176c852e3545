"""Fault tolerance: kills, preemption, corrupt checkpoints, non-finite steps, full disks, bad configs.

One test per promise of the README's Reliability section; the runs are subprocesses of
`python -m dpo_jax.main` on the tiny config, killed or signalled while they work.
"""

import copy
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, run_config, workdir_records, workdir_summary
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpo_jax import checkpointing, fingerprints, planning, sharding
from dpo_jax.configs import validation
from dpo_jax.metrics import read_jsonl

# Save every step, so that kills land during asynchronous writes too.
RUN = ["-m", "dpo_jax.main", "--config=configs/quickstart.py:runlocal", "--config.checkpoint.every_steps=1",
       "--config.checkpoint.max_to_keep=3"]


def _start(workdir, *flags, **kwargs):
    return subprocess.Popen([sys.executable, *RUN, f"--workdir={workdir}", *flags], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _finish(workdir, *flags, **kwargs):
    process = _start(workdir, *flags, **kwargs)
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def _wait_for(condition, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before the kill point:\n{process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "the kill point was never reached"
        time.sleep(0.002)


def _writing(workdir, stage):
    directory = os.path.join(workdir, "checkpoints", stage)
    return os.path.isdir(directory) and any("orbax-checkpoint-tmp" in name for name in os.listdir(directory))


def _has_record(workdir, stage, split):
    path = os.path.join(workdir, "metrics.jsonl")
    return os.path.exists(path) and any(r["stage"] == stage and r["split"] == split for r in read_jsonl(path))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    code, _, err = _finish(workdir)
    assert code == 0, err[-3000:]
    return workdir


KILL_POINTS = {
    "during the first asynchronous checkpoint write": lambda w: _writing(w, "sft"),
    "after the first SFT metrics": lambda w: _has_record(w, "sft", "train"),
    "during a DPO checkpoint write": lambda w: _writing(w, "dpo"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kill_point", list(KILL_POINTS))
def test_sigkill_at_any_moment_then_rerun_equals_an_uninterrupted_run(uninterrupted, tmp_path, kill_point):
    workdir = str(tmp_path / "killed")
    process = _start(workdir)
    _wait_for(lambda: KILL_POINTS[kill_point](workdir), process)
    process.kill()
    process.wait()
    code, _, err = _finish(workdir)
    assert code == 0, err[-3000:]
    for stage in ("sft", "dpo"):
        assert (workdir_summary(workdir)[stage]["params_fingerprint"]
                == workdir_summary(uninterrupted)[stage]["params_fingerprint"])
    assert workdir_records(workdir) == workdir_records(uninterrupted)


def test_sigterm_saves_the_current_step_and_exits_with_the_preemption_code(uninterrupted, tmp_path):
    workdir = str(tmp_path / "preempted")
    process = _start(workdir)
    _wait_for(lambda: _has_record(workdir, "sft", "train"), process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 4, err[-3000:]
    assert "preempted; saved step" in err
    saved = int(err.split("preempted; saved step ")[1].split(",")[0])
    directory = os.path.join(workdir, "checkpoints", "sft")
    assert str(saved) in os.listdir(directory)
    assert not any("tmp" in name for name in os.listdir(directory)), "the checkpoint was complete before exit"
    code, _, err = _finish(workdir)
    assert code == 0, err[-3000:]
    assert (workdir_summary(workdir)["dpo"]["params_fingerprint"]
            == workdir_summary(uninterrupted)["dpo"]["params_fingerprint"])


def _abstract_params(config):
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    return planning.plan_model(config, mesh).abstract_params


def _state(value):
    return {"params": {"w": np.full((4, 4), value, np.float32)}}


def test_saves_every_n_steps_and_every_t_minutes(tmp_path):
    checkpoints = checkpointing.StageCheckpoints(tmp_path / "c", max_to_keep=10, save_every_steps=100,
                                                 save_every_minutes=1 / 60)
    assert checkpoints.save(1, _state(1))       # the first save: nothing saved yet
    assert not checkpoints.save(2, _state(2))   # neither 100 steps nor a second since
    checkpoints.wait()
    time.sleep(1.5)
    assert checkpoints.save(3, _state(3))       # a second has passed
    assert checkpoints.save(100, _state(100))   # the step interval
    checkpoints.wait()
    assert checkpoints.all_steps() == [1, 3, 100]
    checkpoints.close()


def test_keeps_the_last_k_plus_the_best_by_an_eval_metric(tmp_path):
    checkpoints = checkpointing.StageCheckpoints(tmp_path / "c", max_to_keep=2, best_metric="loss", best_mode="min")
    for step, loss in zip(range(1, 6), [5.0, 1.0, 4.0, 3.0, 2.0]):
        checkpoints.save(step, _state(step), metrics={"loss": loss})
        checkpoints.wait()
    assert checkpoints.all_steps() == [2, 4, 5]
    checkpoints.close()


def _truncate_a_data_file(step_dir):
    files = [os.path.join(root, name) for root, _, names in os.walk(step_dir) for name in names
             if "ocdbt" in root or name.startswith("d")]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)


@pytest.mark.parametrize("damage", ["truncated file", "missing directory", "wrong tree"])
def test_a_corrupt_checkpoint_is_never_loaded_and_an_older_one_is_used(tmp_path, damage):
    config = run_config("quickstart", "runlocal")
    abstract = _abstract_params(config)
    params = jax.tree.map(lambda a: np.random.default_rng(0).normal(size=a.shape).astype(a.dtype), abstract)
    newer = jax.tree.map(lambda x: x + 1, params)
    directory = tmp_path / "sft"
    checkpoints = checkpointing.StageCheckpoints(directory, max_to_keep=5)
    checkpoints.save(1, {"params": params})
    checkpoints.wait()
    if damage == "wrong tree":
        checkpoints.save(2, {"params": {"something": np.zeros(3, np.float32)}})
    else:
        checkpoints.save(2, {"params": newer})
    checkpoints.wait()
    checkpoints.close()
    if damage == "truncated file":
        _truncate_a_data_file(directory / "2")
    elif damage == "missing directory":
        shutil.rmtree(next(p for p in (directory / "2").iterdir() if p.is_dir()))

    restored = checkpointing.restore_params(str(directory), abstract)
    assert fingerprints.params_fingerprint(restored) == fingerprints.params_fingerprint(params)
    quarantined = os.listdir(tmp_path / "quarantine")
    assert len(quarantined) == 1 and quarantined[0].startswith("sft-2-")  # kept, out of the way
    assert sorted(os.listdir(directory)) == ["1"]


def test_no_good_checkpoint_is_a_clear_error_naming_the_directory(tmp_path):
    config = run_config("quickstart", "runlocal")
    directory = tmp_path / "sft"
    checkpoints = checkpointing.StageCheckpoints(directory)
    checkpoints.save(1, {"params": {"w": np.zeros(3, np.float32)}})
    checkpoints.wait()
    checkpoints.close()
    with pytest.raises(checkpointing.CheckpointError, match=f"No checkpoint in {directory} restores"):
        checkpointing.restore_params(str(directory), _abstract_params(config))


def test_a_corrupt_latest_checkpoint_resumes_from_the_previous_one_exactly(uninterrupted, tmp_path):
    workdir = str(tmp_path / "run")
    code, _, err = _finish(workdir, "--halt_after_steps=4")
    assert code == 3, err[-3000:]
    _truncate_a_data_file(os.path.join(workdir, "checkpoints", "sft", "4"))
    code, _, err = _finish(workdir)
    assert code == 0, err[-3000:]
    assert "does not restore" in err
    assert (workdir_summary(workdir)["dpo"]["params_fingerprint"]
            == workdir_summary(uninterrupted)["dpo"]["params_fingerprint"])
    assert workdir_records(workdir) == workdir_records(uninterrupted)


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    workdir = str(tmp_path / "run")
    # A learning rate of 1e30 makes the parameters overflow after the first update.
    code, _, err = _finish(workdir, "--config.sft.learning_rate=1e30", "--config.train.max_nonfinite_steps=3")
    assert code != 0
    assert "3 steps in a row" in err and "non-finite" in err
    bad = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "nonfinite"]
    assert len(bad) >= 3 and all(len(r["example_ids"]) == 8 for r in bad)
    config = run_config("quickstart", "runlocal")
    params = checkpointing.restore_params(os.path.join(workdir, "checkpoints", "sft"), _abstract_params(config))
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(params))


def _limit_file_size():
    # Writes past 64 KiB fail with EFBIG (Python ignores SIGXFSZ): a full disk, for new files.
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_a_full_disk_while_saving_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    code, _, err = _finish(workdir, "--halt_after_steps=2")
    assert code == 3, err[-3000:]
    config = run_config("quickstart", "runlocal")
    directory = os.path.join(workdir, "checkpoints", "sft")
    before = fingerprints.params_fingerprint(checkpointing.restore_params(directory, _abstract_params(config)))
    code, _, err = _finish(workdir, preexec_fn=_limit_file_size)
    assert code != 0
    assert "Could not write a checkpoint" in err and "the checkpoint of step 2 is intact" in err
    after = fingerprints.params_fingerprint(checkpointing.restore_params(directory, _abstract_params(config)))
    assert after == before


KEYS = sorted(validation.flatten(run_config("quickstart", "runlocal")))
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=5),
                   st.just(-1), st.just(0))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS + ["dpo.betta", "nope"]), VALUES, min_size=1, max_size=3))
def test_any_config_is_validated_cleanly_or_refused_naming_a_key(overrides):
    config = run_config("quickstart", "runlocal")
    config.unlock()
    flat = validation.flatten(config)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        try:
            node[leaf] = value
        except (TypeError, ValueError, KeyError, AttributeError):
            return  # ml_collections itself refuses the type: the command line never gets this far
    try:
        validation.validate(config)
    except ValueError as error:
        assert "config." in str(error)
    else:
        for key, value in overrides.items():
            if flat.get(key) is not None and value is not None:  # optional (None) fields are typed by ml_collections
                assert type(flat[key]) is type(value) or isinstance(flat[key], float), (key, value)
    assert copy.deepcopy(config) is not None
