#!/usr/bin/env bash
# Runs a command as N cooperating JAX processes on this machine: the multi-host code path
# (jax.distributed, per-process data shares, every process writing its checkpoint shards) without a cluster.
#   bash launch/local_multiprocess.sh 2 -- python -m dpo_jax.main --config=configs/quickstart.py:runlocal --workdir=/tmp/mp
# Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (read by dpo_jax.main).
# Set XLA_FLAGS=--xla_force_host_platform_device_count=K for K CPU devices per process.
# --dry-run prints the commands instead of running them. Process i's output is prefixed with [i].
set -euo pipefail
usage="usage: $0 NUM_PROCESSES [--dry-run] [--port PORT] -- command ..."
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
num_processes="$1"; shift
[[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || { echo "NUM_PROCESSES must be a positive integer: $usage" >&2; exit 2; }
dry_run=0; port="${PORT:-$((20000 + RANDOM % 20000))}"
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --port) port="$2"; shift 2 ;;
    *) echo "unknown option $1: $usage" >&2; exit 2 ;;
  esac
done
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "no command: $usage" >&2; exit 2; }

pids=()
for ((i = 0; i < num_processes; i++)); do
  env_vars="JAX_COORDINATOR_ADDRESS=localhost:$port JAX_NUM_PROCESSES=$num_processes JAX_PROCESS_ID=$i"
  if [ "$dry_run" = 1 ]; then
    echo "$env_vars $*"
    continue
  fi
  # shellcheck disable=SC2086
  (env $env_vars "$@" 2>&1 | sed -u "s/^/[$i] /") &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
