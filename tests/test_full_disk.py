"""A full disk ends a run with one line, `Error: <path>: <the OS's reason>`, as the last thing it prints, and
loses nothing already saved.

The disk fills up by limiting the size of a file the run may write (RLIMIT_FSIZE: a write past it fails with
EFBIG, "File too large", as a full disk's fail with ENOSPC): 1 KiB stops the first write of config.json,
16 KiB the first checkpoint (each has larger files; under 64 KiB a checkpoint's files sometimes all fit).
"""

import errno
import hashlib
import os
import resource
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

RUN = ["-m", "dpo_jax.main", "--config=configs/quickstart.py:runlocal", "--config.checkpoint.every_steps=1",
       "--config.checkpoint.max_to_keep=3"]
FILE_TOO_LARGE = os.strerror(errno.EFBIG)


def _run(workdir, *flags, max_file_bytes=None):
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run([sys.executable, *RUN, f"--workdir={workdir}", *flags], cwd=REPO, capture_output=True,
                          text=True, timeout=600, preexec_fn=limit_file_size if max_file_bytes else None)


def _error_line(result):
    """The last non-empty line of the run's stderr, which must be its only `Error:` line: nothing (no
    traceback of a thread or of asyncio's shutdown) comes after it."""
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: "), result.stderr[-3000:]
    assert [line for line in lines if line.startswith("Error: ")] == lines[-1:], result.stderr[-3000:]
    return lines[-1]


def _digests(directory):
    """sha256 of every file below `directory`, by relative path."""
    digests = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digests[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return digests


def _temporary_files(workdir):
    return [os.path.join(root, name) for root, _, files in os.walk(workdir) for name in files if name.endswith(".tmp")]


@pytest.fixture(scope="module")
def halted(tmp_path_factory):
    """A workdir halted after two SFT steps, with checkpoints of steps 1 and 2."""
    workdir = str(tmp_path_factory.mktemp("halted") / "run")
    result = _run(workdir, "--halt_after_steps=2")
    assert result.returncode == 3, result.stderr[-3000:]
    return workdir


def test_a_full_disk_on_a_fresh_workdir_is_one_error_line_and_leaves_no_temporary_file(tmp_path):
    workdir = str(tmp_path / "run")
    result = _run(workdir, max_file_bytes=1024)
    assert _error_line(result) == f"Error: {os.path.join(workdir, 'config.json')}: {FILE_TOO_LARGE}"
    assert "Traceback" not in result.stderr
    assert not os.path.exists(os.path.join(workdir, "config.json")) and not _temporary_files(workdir)


def test_a_full_disk_when_resuming_keeps_config_json(halted, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(halted, workdir)
    before = _digests(workdir)
    result = _run(workdir, max_file_bytes=1024)  # config.json is rewritten first, and does not fit
    assert _error_line(result) == f"Error: {os.path.join(workdir, 'config.json')}: {FILE_TOO_LARGE}"
    assert _digests(workdir) == before and not _temporary_files(workdir)


def test_a_full_disk_while_saving_a_checkpoint_is_the_last_line_and_keeps_the_previous_checkpoint(halted, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(halted, workdir)
    checkpoints = os.path.join(workdir, "checkpoints", "sft")
    config, step_2 = _digests(workdir)["config.json"], _digests(os.path.join(checkpoints, "2"))
    result = _run(workdir, max_file_bytes=16 * 1024)
    line = _error_line(result)
    assert line.startswith(f"Error: Could not write a checkpoint to {checkpoints} ")
    assert FILE_TOO_LARGE in line and line.endswith("the checkpoint of step 2 is intact.")
    assert _digests(os.path.join(checkpoints, "2")) == step_2 and _digests(workdir)["config.json"] == config
    assert not _temporary_files(workdir)
