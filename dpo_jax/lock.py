"""The workdir lock: one run at a time in a workdir.

Two runs in one workdir would write the same checkpoints and metrics, so a run holds
`<workdir>/lock` from before it reads the workdir until it ends. The lock records the holder's
host, pid, start time and command, which a second run's error names.

- On a local or network filesystem the lock is an `flock` on the file: the kernel releases it when
  the holder exits, however it exits (SIGKILL included), so a lock whose holder is gone is never
  in the way. The file stays (removing it would let two runs lock two different files).
- On object storage (gs://) there is no flock. The lock is an object created only if absent (a
  generation-match precondition), which the holder rewrites every `HEARTBEAT_SECONDS`. A lock is
  stale (its holder is gone) when its heartbeat is older than `STALE_AFTER_SECONDS`, or at once
  when its holder ran on this machine (same host and pid namespace) and has exited. A stale lock is
  taken over: deleted, created anew, and read back a moment later to confirm that this run holds
  it. The holder deletes the object when it ends.
- In a multi-process run process 0 holds the lock for the run; every process learns whether it got it.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid

import fsspec
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from dpo_jax import storage

LOCK_NAME = "lock"
HEARTBEAT_SECONDS = 60.0
STALE_AFTER_SECONDS = 300.0
_TAKEOVER_CONFIRM_SECONDS = 1.0


class WorkdirLocked(ValueError):
    """Another run holds the workdir."""


def _pid_namespace():
    """The machine and pid namespace a pid is meaningful in: this host, and this container on it."""
    try:
        return f"{socket.gethostname()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return socket.gethostname()


def _holder():
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": _pid_namespace(), "started": now,
            "heartbeat": now, "command": " ".join(sys.argv), "token": uuid.uuid4().hex}


def _gone(holder):
    """True if the holder ran where this process runs (same host and pid namespace) and has exited."""
    if not holder or holder.get("pid_namespace") != _pid_namespace() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def _describe(holder):
    started = holder.get("started")
    when = datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds") if started else "?"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {when}"


def _in_use_error(workdir, path, holder, expires=None):
    gone = (f" If that run is gone, its lock expires at "
            f"{datetime.datetime.fromtimestamp(expires).isoformat(timespec='seconds')}, or delete {path}."
            if expires else "")
    return WorkdirLocked(f"Workdir {workdir} is in use by another run ({_describe(holder)}; lock {path}). "
                         f"Wait for it to end, or use another --workdir.{gone}")


class _FileLock:
    """An flock on a local (or network) file."""

    def __init__(self, workdir, path):
        self.workdir, self.path, self.file = workdir, path, None

    def acquire(self):
        file = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            text = file.read()
            file.close()
            try:
                holder = json.loads(text)
            except json.JSONDecodeError:
                holder = {}
            raise _in_use_error(self.workdir, self.path, holder) from None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                file.close()
                raise
            logging.warning("The filesystem of %s does not support file locks (%s); the run goes on without "
                            "the workdir lock", self.path, error)
        file.seek(0)
        file.truncate()
        json.dump(_holder(), file)
        file.flush()
        self.file = file

    def release(self):
        if self.file is not None:
            self.file.seek(0)
            self.file.truncate()
            self.file.close()  # closing releases the flock
            self.file = None


class _ObjectLock:
    """A create-if-absent object with a heartbeat, for object storage."""

    def __init__(self, workdir, path):
        self.workdir, self.path = workdir, path
        self.fs, self.key = fsspec.core.url_to_fs(path)
        self.holder, self.stopped, self.thread = None, threading.Event(), None

    def _read(self):
        try:
            return json.loads(self.fs.cat_file(self.key))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}  # unreadable: treated as stale once old enough (by its modification time)

    def _create(self, holder):
        """Creates the lock object if absent; False if it exists."""
        data = json.dumps(holder).encode()
        try:
            self.fs.pipe_file(self.key, data, mode="create")
        except FileExistsError:
            return False
        except TypeError:  # a filesystem without conditional writes: check, then write
            if self.fs.exists(self.key):
                return False
            self.fs.pipe_file(self.key, data)
        return True

    def _age(self, holder):
        heartbeat = holder.get("heartbeat") if holder else None
        if heartbeat is None:
            with contextlib.suppress(FileNotFoundError):
                heartbeat = self.fs.modified(self.key).timestamp()
        return time.time() - heartbeat if heartbeat is not None else 0.0

    def acquire(self):
        holder = _holder()
        if not self._create(holder):
            current = self._read()
            age = self._age(current)
            if current is not None and age < STALE_AFTER_SECONDS and not _gone(current):
                raise _in_use_error(self.workdir, self.path, current, time.time() - age + STALE_AFTER_SECONDS)
            logging.warning("Workdir lock %s is stale (%s, %s): taking it over", self.path, _describe(current or {}),
                            "exited" if _gone(current) else f"no heartbeat for {age:.0f} s")
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.key)
            if not self._create(holder):
                raise _in_use_error(self.workdir, self.path, self._read() or {})
            time.sleep(_TAKEOVER_CONFIRM_SECONDS)  # another run taking it over at the same time wins or loses here
            current = self._read()
            if not current or current.get("token") != holder["token"]:
                raise _in_use_error(self.workdir, self.path, current or {})
        self.holder = holder
        self.thread = threading.Thread(target=self._heartbeat, name="workdir-lock-heartbeat", daemon=True)
        self.thread.start()

    def _heartbeat(self):
        while not self.stopped.wait(HEARTBEAT_SECONDS):
            try:
                current = self._read()
                if not current or current.get("token") != self.holder["token"]:
                    logging.error("Workdir lock %s is no longer this run's (%s)", self.path, _describe(current or {}))
                    return
                self.holder["heartbeat"] = time.time()
                self.fs.pipe_file(self.key, json.dumps(self.holder).encode())
            except Exception as error:  # noqa: BLE001 - a missed heartbeat is retried at the next one
                logging.warning("Could not refresh the workdir lock %s: %s", self.path, error)

    def release(self):
        if self.holder is None:
            return
        self.stopped.set()
        self.thread.join()
        current = self._read()
        if current and current.get("token") == self.holder["token"]:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.key)
        self.holder = None


@contextlib.contextmanager
def hold(workdir):
    """Holds the lock of `workdir` (which exists) for the duration of the block; raises `WorkdirLocked`
    naming the holder if another run has it."""
    path = storage.join(workdir, LOCK_NAME)
    lock = (_ObjectLock if storage.is_remote(workdir) else _FileLock)(workdir, path)
    error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except Exception as failure:  # noqa: BLE001 - raised below, once every process knows
            error = failure
    if jax.process_count() > 1:  # every process stops if process 0 did not get the lock
        got = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not got and error is None:
            error = WorkdirLocked(f"Process 0 could not lock workdir {workdir} (its log says why)")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if jax.process_index() == 0:
            lock.release()
