"""The workdir lock: one run at a time, the holder named, a dead holder's lock taken over; on a local
disk and in a bucket (the GCS emulator)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO
from gcs_emulator import BUCKET

from dpo_jax import lock


def test_a_second_holder_is_refused_naming_the_first_and_a_released_lock_is_free(tmp_path):
    with lock.hold(str(tmp_path)):
        holder = json.loads((tmp_path / lock.LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(lock.WorkdirLocked, match=rf"in use by another run \(host .*, pid {os.getpid()}, started"):
            with lock.hold(str(tmp_path)):
                pass
    with lock.hold(str(tmp_path)):  # released at the end of the block
        pass
    assert (tmp_path / lock.LOCK_NAME).read_text() == ""  # the file stays, empty: nobody holds it


def test_the_lock_of_a_killed_holder_is_free(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from dpo_jax import lock
        with lock.hold({str(tmp_path)!r}):
            print("held", flush=True)
            time.sleep(600)
        """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lock.WorkdirLocked, match=f"pid {holder.pid}"):
            with lock.hold(str(tmp_path)):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with lock.hold(str(tmp_path)):  # the kernel released it with the process
        assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["pid"] == os.getpid()


def test_the_lock_in_a_bucket(emulator):
    # gcsfs reads the emulator's address at import: a fresh process.
    code = textwrap.dedent(f"""
        import json, time
        import fsspec
        from dpo_jax import lock
        workdir = "gs://{BUCKET}/locked-run"
        fs, key = fsspec.core.url_to_fs(workdir + "/lock")
        with lock.hold(workdir):
            assert json.loads(fs.cat_file(key))["pid"] > 0
            try:
                with lock.hold(workdir):
                    raise SystemExit("a second holder got the lock")
            except lock.WorkdirLocked as error:
                assert "in use by another run" in str(error), error
        assert not fs.exists(key), "the holder deletes the lock at its end"
        # A holder that died: its heartbeat stopped long ago.
        stale = {{"host": "gone", "pid": 1, "started": 0, "heartbeat": time.time() - 2 * lock.STALE_AFTER_SECONDS,
                  "token": "dead"}}
        fs.pipe_file(key, json.dumps(stale).encode())
        with lock.hold(workdir):
            assert json.loads(fs.cat_file(key))["token"] != "dead"
        # One that ran here and exited (a SIGKILL leaves its lock behind): taken over at once.
        import subprocess, sys
        exited = subprocess.Popen([sys.executable, "-c", "pass"])
        exited.wait()
        fs.pipe_file(key, json.dumps({{**stale, "heartbeat": time.time(), "pid": exited.pid,
                                       "pid_namespace": lock._pid_namespace()}}).encode())
        with lock.hold(workdir):
            assert json.loads(fs.cat_file(key))["pid"] != exited.pid
        # A live one: refused, saying when its lock expires if it is gone.
        fs.pipe_file(key, json.dumps({{**stale, "heartbeat": time.time()}}).encode())
        try:
            with lock.hold(workdir):
                raise SystemExit("took a live holder's lock")
        except lock.WorkdirLocked as error:
            assert "host gone, pid 1" in str(error) and "its lock expires at" in str(error), error
        print("ok")
        """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **emulator.env},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def _holder_pid(path):
    """The pid in a lock file once its holder has written it whole, else None."""
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file).get("pid")
    except (OSError, ValueError):
        return None


@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_stops_naming_the_first_which_is_unharmed(tmp_path):
    workdir = str(tmp_path / "run")
    run = [sys.executable, "-m", "dpo_jax.main", "--config=configs/quickstart.py:runlocal", f"--workdir={workdir}"]
    first = subprocess.Popen(run, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = os.path.join(workdir, lock.LOCK_NAME)
    deadline = time.monotonic() + 300
    while _holder_pid(path) != first.pid:
        assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.05)
    # The first run is paused while the second one tries, so that it still holds the lock however fast it
    # would otherwise finish; it then resumes and must end as if nothing had happened.
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode != 0
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: Workdir {workdir} is in use by another run") and f"pid {first.pid}" in last
    assert "Traceback" not in second.stderr
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["dpo"]["steps"] == 6 and "dpo:" in out
