"""Shared test setup: the run configs of `configs/` loaded by path, and small helpers."""

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


def config_path(name):
    """The path of run config `configs/<name>.py`."""
    return os.path.join(REPO, "configs", f"{name}.py")


def run_config(name, arg=None):
    """`get_config(arg)` of `configs/<name>.py`, loaded by its path (`dpo_jax.configs.load_config`)."""
    from dpo_jax.configs import load_config  # pylint: disable=import-outside-toplevel
    return load_config(config_path(name) + (f":{arg}" if arg else ""))


# The first line of a crash report: absl's FATAL log line (a failed CHECK in XLA), faulthandler's, an
# uncaught C++ exception's.
_CRASH_REPORTS = re.compile(r"^(F\d{4} \d\d:\d\d:\d\d|Fatal Python error|terminate called)", re.MULTILINE)


def _excerpt(text, head=3000, tail=4000, crash=2000):
    """`text`, or its first `head` and last `tail` characters and `crash` characters from the first line of
    each crash report in between, marking what was cut: the reason of an abort comes before the thread
    stacks that end stderr."""
    if len(text) <= head + tail:
        return text
    keep = [(0, head), (len(text) - tail, len(text))]
    first = {}
    for match in _CRASH_REPORTS.finditer(text, head, len(text) - tail):
        first.setdefault(match.group(1)[:5], match.start())
    keep += [(start, start + crash) for start in first.values()]
    parts, end = [], 0
    for start, stop in sorted(keep):
        if start > end:
            parts.append(f"\n[... {start - end} characters cut ...]\n")
        parts.append(text[max(start, end):stop])
        end = max(end, stop)
    return "".join(parts)


def host_devices(count):
    """The environment of a subprocess with `count` CPU devices.

    XLA:CPU aborts a process whose devices do not all reach a collective within
    `--xla_cpu_collective_call_terminate_timeout_seconds` (40 s), with `Fatal Python error: Aborted`
    in its `ThunkExecutor`. A multi-device test aborted that way once, on a loaded machine, and its
    message matches that timeout's; load alone did not reproduce it in 40 minutes of trying, so this
    is the likeliest cause, not a confirmed one. Here devices are threads sharing two cores: a
    generous timeout keeps load from aborting a test, while a real deadlock still ends in one.
    """
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={count} "
                         "--xla_cpu_collective_call_terminate_timeout_seconds=600"}


def run_python(args, *, env=None, check=True, timeout=600):
    """Runs `python args...` from the repo root in a fresh process; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"python {' '.join(args)} failed ({result.returncode}):\n{_excerpt(result.stderr)}")
    return result


@pytest.fixture
def tiny_config():
    return run_config("quickstart", "runlocal")


def workdir_records(workdir, drop=("tokens_per_sec",)):
    """The records of a run's metrics.jsonl, without the `drop` keys (measurements that vary between runs)."""
    from dpo_jax.metrics import read_jsonl  # pylint: disable=import-outside-toplevel
    return [{k: v for k, v in r.items() if k not in drop} for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


def workdir_summary(workdir):
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def emulator():
    """A GCS emulator on localhost for the session (`gcs_emulator.Emulator`); its `env` points clients at it."""
    from gcs_emulator import Emulator  # pylint: disable=import-outside-toplevel

    try:
        server = Emulator()
    except RuntimeError as error:
        pytest.skip(f"no GCS emulator: {error}")
    yield server
    server.stop()
