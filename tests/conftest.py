"""Shared test setup: the run configs of `configs/` loaded by path, and small helpers."""

import json
import os
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


def run_python(args, *, env=None, check=True, timeout=600):
    """Runs `python args...` from the repo root in a fresh process; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"python {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
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
