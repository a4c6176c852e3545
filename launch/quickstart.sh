#!/usr/bin/env bash
# The main job on the embedded default: SFT then DPO on the built-in synthetic preference task.
# CPU, no downloads, a few minutes. Extra arguments go to dpo_jax.main (e.g. --config.dpo.beta=0.05).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/venv.sh
workdir="${WORKDIR:-/tmp/dpo_jax_quickstart}"
echo "workdir: $workdir (rerun to resume; delete it to start over)"
python -m dpo_jax.main --config=configs/quickstart.py --workdir="$workdir" "$@"
