#!/usr/bin/env bash
# Runs the linter, then the test suite. Installs the package with its test, parity, repro and bench extras into
# .venv first. Extra arguments go to pytest (e.g. -k losses, -m "not slow", -n 0 for one process).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="test,parity,repro,bench" source launch/venv.sh
ruff check .
# Test files run in parallel worker processes (pytest-xdist), a file per worker so that its module fixtures
# are built once. Most of a test's time is XLA compilation, which uses one core, so workers pay even on
# 2 cores. At most 4 by default: every worker holds its own JAX runtime and starts 8-device subprocesses.
workers="${TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}"
python -m pytest -n "$workers" --dist loadfile "$@"
