#!/usr/bin/env bash
# Runs a command as N cooperating JAX processes on this machine: the multi-host code path
# (jax.distributed, per-process data shares, every process writing its checkpoint shards) without a cluster.
#   bash launch/local_multiprocess.sh 2 -- python -m dpo_jax.main --config=configs/quickstart.py:runlocal --workdir=/tmp/mp
# Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (read by dpo_jax.main).
# Set XLA_FLAGS=--xla_force_host_platform_device_count=K for K CPU devices per process.
# Options, in any order before `--` (the command follows `--`): NUM_PROCESSES, --port PORT (or
# --port=PORT; default $PORT or a random one), --dry-run (print the N commands, one per line, ready
# to paste into bash, and run nothing). Process i's output is prefixed with [i].
set -euo pipefail
usage="usage: $0 NUM_PROCESSES [--dry-run] [--port PORT] -- command ..."

# shellcheck source=launch/quote.sh
source "$(dirname "${BASH_SOURCE[0]}")/quote.sh"

num_processes=""; dry_run=0; port="${PORT:-$((20000 + RANDOM % 20000))}"
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --port=*) port="${1#*=}" ;;
    --port) [ $# -ge 2 ] || { echo "--port needs a value: $usage" >&2; exit 2; }; port="$2"; shift ;;
    -h|--help) echo "$usage"; exit 0 ;;
    -*) echo "unknown option $1: $usage" >&2; exit 2 ;;
    *)
      [ -z "$num_processes" ] || { echo "unexpected argument $1: $usage" >&2; exit 2; }
      num_processes="$1" ;;
  esac
  shift
done
[ "${1:-}" = "--" ] && shift
[[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || { echo "NUM_PROCESSES must be a positive integer: $usage" >&2; exit 2; }
[[ "$port" =~ ^[1-9][0-9]*$ ]] && [ "$port" -le 65535 ] || { echo "PORT must be a port number: $usage" >&2; exit 2; }
[ $# -gt 0 ] || { echo "no command: $usage" >&2; exit 2; }

pids=()
for ((i = 0; i < num_processes; i++)); do
  env_vars=("JAX_COORDINATOR_ADDRESS=localhost:$port" "JAX_NUM_PROCESSES=$num_processes" "JAX_PROCESS_ID=$i")
  if [ "$dry_run" = 1 ]; then
    line="${env_vars[*]}"; for word in "$@"; do line+=" $(quote "$word")"; done
    printf '%s\n' "$line"
    continue
  fi
  (env "${env_vars[@]}" "$@" 2>&1 | sed -u "s/^/[$i] /") &
  pids+=($!)
done
status=0
for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid" || status=$?; done
exit "$status"
