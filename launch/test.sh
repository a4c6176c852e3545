#!/usr/bin/env bash
# Runs the linter, then the test suite. Installs the package with its test, parity, repro and bench extras into
# .venv first. Extra arguments go to pytest (e.g. -k losses, -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="test,parity,repro,bench" source launch/venv.sh
ruff check .
python -m pytest "$@"
