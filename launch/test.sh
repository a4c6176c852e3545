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
# Many tests start subprocesses that compile the same programs again; a persistent compilation cache lets the
# later ones load them. It is fresh for each run (unless JAX_COMPILATION_CACHE_DIR is set) and keyed by the
# program and the JAX version, so an entry can never stand in for changed code.
cache="$(mktemp -d)"
trap 'rm -rf "$cache"' EXIT
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0.2}"
workers="${TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}"
python -m pytest -n "$workers" --dist loadfile "$@"
