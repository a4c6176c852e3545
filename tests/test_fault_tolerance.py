"""Fault tolerance: kills, preemption, corrupt checkpoints, non-finite steps, full disks, bad configs.

One test per promise of the README's Reliability section; the runs are subprocesses of
`python -m dpo_jax.main` on the tiny config, killed or signalled while they work.
"""

import copy
import json
import os
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


def _truncate_the_array_files(step_dir):
    """Cuts every file of array data of a checkpoint step in half (one file alone may hold no array
    that a restore reads)."""
    for root, _, names in os.walk(step_dir):
        for name in names:
            if os.path.basename(root) == "d":
                path = os.path.join(root, name)
                os.truncate(path, os.path.getsize(path) // 2)


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
        _truncate_the_array_files(directory / "2")
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
    _truncate_the_array_files(os.path.join(workdir, "checkpoints", "sft", "4"))
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


# ------------------------------------------------------------------------------------------------
# Stages that know what they were trained on
# ------------------------------------------------------------------------------------------------

def _copy_run(uninterrupted, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(uninterrupted, workdir)
    return workdir


def _error_line(err):
    return err.strip().splitlines()[-1]


def test_a_corrupt_final_checkpoint_of_a_finished_stage_trains_it_again_and_keeps_what_followed(
        uninterrupted, tmp_path):
    workdir = _copy_run(uninterrupted, tmp_path)
    _truncate_the_array_files(os.path.join(workdir, "checkpoints", "sft", "6"))
    code, _, err = _finish(workdir)
    assert code == 0, err[-3000:]
    assert "sft/6 does not restore" in err
    summary, expected = workdir_summary(workdir), workdir_summary(uninterrupted)
    # SFT trained again from step 5 to the same parameters, so DPO, trained from them, stands.
    assert summary["sft"]["params_fingerprint"] == expected["sft"]["params_fingerprint"]
    assert summary["dpo"]["params_fingerprint"] == expected["dpo"]["params_fingerprint"]
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "superseded"))
    # The same records; SFT's last ones, written again, now come after DPO's.
    in_order = lambda records: sorted(records, key=json.dumps)
    assert in_order(workdir_records(workdir)) == in_order(workdir_records(uninterrupted))


@pytest.mark.slow
def test_training_an_earlier_stage_longer_trains_the_later_ones_again(uninterrupted, tmp_path):
    workdir = _copy_run(uninterrupted, tmp_path)
    code, _, err = _finish(workdir, "--config.sft.num_steps=8")
    assert code == 0, err[-3000:]
    assert "training dpo again" in err
    fresh = str(tmp_path / "fresh")
    code, _, err = _finish(fresh, "--config.sft.num_steps=8")
    assert code == 0, err[-3000:]
    summary, expected = workdir_summary(workdir), workdir_summary(fresh)
    assert summary["sft"]["steps"] == 8
    for stage in ("sft", "dpo"):
        assert summary[stage]["params_fingerprint"] == expected[stage]["params_fingerprint"]
    assert workdir_records(workdir) == workdir_records(fresh)
    superseded = os.listdir(os.path.join(workdir, "checkpoints", "superseded"))
    assert len(superseded) == 1 and superseded[0].startswith("dpo-")  # kept, out of the way


def test_a_stage_shorter_than_its_saved_steps_is_refused_and_nothing_changes(uninterrupted, tmp_path):
    workdir = _copy_run(uninterrupted, tmp_path)
    before = {name: os.listdir(os.path.join(workdir, "checkpoints", name)) for name in ("sft", "dpo")}
    code, _, err = _finish(workdir, "--config.dpo.num_steps=3")
    assert code == 1
    assert _error_line(err).startswith("Error: config.dpo.num_steps=3 is below step 6, saved in ")
    assert "Traceback" not in err
    assert {name: os.listdir(os.path.join(workdir, "checkpoints", name)) for name in before} == before
    assert workdir_summary(workdir) == workdir_summary(uninterrupted)


def test_skipped_updates_are_counted_over_every_invocation(tmp_path):
    workdir = str(tmp_path / "run")
    flags = ("--config.sft.learning_rate=1e30", "--config.train.max_nonfinite_steps=100", "--config.stages=sft")
    code, _, err = _finish(workdir, *flags, "--halt_after_steps=3")
    assert code == 3, err[-3000:]
    code, out, err = _finish(workdir, *flags)
    assert code == 0, err[-3000:]
    skipped = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "nonfinite"]
    assert len(skipped) > 3  # more than the last invocation's steps
    assert workdir_summary(workdir)["sft"]["nonfinite_steps"] == len(skipped)
    assert f"{len(skipped)} updates skipped as non-finite" in out


def test_sigterm_while_starting_is_one_line_and_the_preemption_code(tmp_path):
    """During the imports (dpo_jax.main's first handler) or the first moments of the run (train's,
    outside a stage's loop): whichever the signal meets, it stops with a message and code 4."""
    process = _start(str(tmp_path / "run"))
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 4, err[-3000:]
    assert "preempted (SIGTERM)" in err.strip().splitlines()[-1] and "Traceback" not in err


def test_sigterm_during_data_preparation_stops_at_once_with_nothing_written(tmp_path, monkeypatch):
    from dpo_jax import train

    def preparing(config):  # a preemption notice while the data is prepared
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
        raise AssertionError("the notice did not stop the run")

    monkeypatch.setattr(train.data_task, "load_task", preparing)
    workdir = str(tmp_path / "run")
    with pytest.raises(train.Preempted, match="outside a stage's training loop"):
        train.run(run_config("quickstart", "runlocal"), workdir)
    assert sorted(os.listdir(workdir)) == ["lock"]  # no config.json: the run never claimed the workdir
    assert signal.getsignal(signal.SIGTERM) is not train._on_sigterm  # the handler is the caller's again


def test_a_notice_whose_exception_was_swallowed_still_stops_the_stage_before_its_first_step(tmp_path,
                                                                                           monkeypatch):
    """A handler that runs inside a garbage-collector callback has its exception ignored by Python;
    the notice it recorded must still stop the run, before any step is trained."""
    from dpo_jax import train

    load_task = train.data_task.load_task

    def preparing(config):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except train.Preempted:
            pass  # what the gc callback does with it
        return load_task(config)

    monkeypatch.setattr(train.data_task, "load_task", preparing)
    workdir = str(tmp_path / "run")
    with pytest.raises(train.Preempted, match="sft: preempted before its first step"):
        train.run(run_config("quickstart", "runlocal"), workdir)
    assert not os.listdir(os.path.join(workdir, "checkpoints", "sft"))
