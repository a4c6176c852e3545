"""Shared test setup: the repository root on sys.path (for `configs`), and small helpers."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


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
    from configs import quickstart
    return quickstart.get_config("runlocal")
