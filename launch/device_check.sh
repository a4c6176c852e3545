#!/usr/bin/env bash
# The device check, the first thing to run on a machine with an accelerator (and CPU too, slowly): on the
# backend JAX finds, the fused attention kernels against the dense path (values and gradients, float32
# and bfloat16), a short SFT -> DPO run (Anthropic HH from ../shared/data/hh-rlhf, else the synthetic
# task) and the DPO step benchmark; the last line printed is one JSON summary, the exit code 1 if a
# kernel is out of tolerance, the run's loss is not finite or a part failed. docs/launch.md#the-device-check
#   EXTRAS=tpu bash launch/device_check.sh                   # a TPU VM (EXTRAS=cuda on a GPU machine)
#   bash launch/device_check.sh --device_check_size=tiny     # every part in seconds (CI, on CPU)
# Arguments go to `python -m dpo_jax.bench --mode=device_check`: --device_check_size=standard|tiny,
# --device_check_data=DIR|synthetic, --device_check_workdir=DIR (default: a temporary directory).
# Environment: DPO_JAX_PYTHON=/path/to/python uses that interpreter (dpo_jax already installed in it) and
# skips .venv and pip; otherwise launch/venv.sh creates .venv and installs the package with $EXTRAS.
set -euo pipefail
case "${1:-}" in
  -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
cd "$(dirname "$0")/.."
if [ -n "${DPO_JAX_PYTHON:-}" ]; then
  python=$DPO_JAX_PYTHON
else
  source launch/venv.sh
  python=python
fi
exec "$python" -m dpo_jax.bench --mode=device_check "$@"
