#!/usr/bin/env bash
# Runs dpo_jax on a Cloud TPU VM or pod slice: creates (or reuses) the TPU, copies this checkout to
# every worker, installs `.[tpu]` on all workers, starts the same command on all of them (JAX's
# multi-controller runtime finds its peers by itself on a pod), and tails worker 0's log.
#
#   bash launch/tpu_pod.sh --name=dpo-v5e --zone=us-west4-a --type=v5litepod-16 \
#       -- --config=configs/hh_pythia28b.py --workdir=gs://my-bucket/runs/hh
#   Multi-slice: add --slices=2 (a queued resource of 2 slices; the mesh's `dcn` axis spans them).
#   --dry-run prints every command instead of running it.
set -euo pipefail
name=""; zone=""; type=""; version="${TPU_RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"; project="${PROJECT:-}"
slices=1; dry_run=0
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --type=*) type="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --slices=*) slices="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ "${1:-}" = "--" ] && shift
[ -n "$name" ] && [ -n "$zone" ] && [ -n "$type" ] || { echo "--name, --zone and --type are required" >&2; exit 2; }
[ $# -gt 0 ] || { echo "give the dpo_jax.main flags after --" >&2; exit 2; }

run() { if [ "$dry_run" = 1 ]; then echo "+ $*"; else "$@"; fi; }
project_flag=(); [ -n "$project" ] && project_flag=(--project="$project")
tpu=(gcloud compute tpus tpu-vm "${project_flag[@]}")
main_args=$(printf ' %q' "$@")

if [ "$slices" -gt 1 ]; then
  run gcloud compute tpus queued-resources create "$name" "${project_flag[@]}" --zone="$zone" \
      --accelerator-type="$type" --runtime-version="$version" --node-count="$slices" --node-prefix="$name"
  nodes=(); for ((i = 0; i < slices; i++)); do nodes+=("$name-$i"); done
else
  if [ "$dry_run" = 1 ] || ! "${tpu[@]}" describe "$name" --zone="$zone" >/dev/null 2>&1; then
    run "${tpu[@]}" create "$name" --zone="$zone" --accelerator-type="$type" --version="$version"
  fi
  nodes=("$name")
fi
for node in "${nodes[@]}"; do
  run "${tpu[@]}" scp --recurse --zone="$zone" --worker=all "$(pwd)" "$node":~/dpo_jax
  run "${tpu[@]}" ssh "$node" --zone="$zone" --worker=all \
      --command="cd ~/dpo_jax && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
  run "${tpu[@]}" ssh "$node" --zone="$zone" --worker=all \
      --command="cd ~/dpo_jax && nohup .venv/bin/python -m dpo_jax.main$main_args > run.log 2>&1 &"
done
run "${tpu[@]}" ssh "${nodes[0]}" --zone="$zone" --worker=0 --command="tail -f ~/dpo_jax/run.log"
