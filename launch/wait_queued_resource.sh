#!/usr/bin/env bash
# Waits until a Cloud TPU queued resource is ACTIVE (its slices exist and can be reached); used by
# tpu_pod.sh --slices=N before it copies or starts anything. Exits 0 once ACTIVE; exits 1 with an error
# if the queued resource is FAILED, SUSPENDING, SUSPENDED or DELETING, or is not ACTIVE within the timeout.
#   bash launch/wait_queued_resource.sh --name=NAME --zone=ZONE [--project=PROJECT] [--timeout=SECONDS]
#       [--interval=SECONDS]      (defaults: 7200 s, polled every 30 s)
# It polls `gcloud compute tpus queued-resources describe NAME --zone=ZONE --format='value(state.state)'`.
set -euo pipefail
die() { echo "wait_queued_resource.sh: $*" >&2; exit "${2:-2}"; }
name=""; zone=""; project=""; timeout=7200; interval=30
for arg in "$@"; do
  case "$arg" in
    --name=*) name="${arg#*=}" ;;
    --zone=*) zone="${arg#*=}" ;;
    --project=*) project="${arg#*=}" ;;
    --timeout=*) timeout="${arg#*=}" ;;
    --interval=*) interval="${arg#*=}" ;;
    -h|--help) sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $arg" ;;
  esac
done
[ -n "$name" ] && [ -n "$zone" ] || die "--name and --zone are required"
[[ "$timeout" =~ ^[0-9]+$ && "$interval" =~ ^[0-9]+$ ]] || die "--timeout and --interval are whole seconds"
describe=(gcloud compute tpus queued-resources describe "$name" --zone="$zone")
[ -n "$project" ] && describe+=(--project="$project")
delete="gcloud compute tpus queued-resources delete $name --zone=$zone${project:+ --project=$project} --force"

start=$SECONDS; last=""
while true; do
  # gcloud's own errors (a network hiccup, an expired token) go to stderr; the wait goes on.
  state=$("${describe[@]}" --format='value(state.state)') || state="(describe failed)"
  if [ "$state" != "$last" ]; then
    echo "wait_queued_resource.sh: $name is $state after $((SECONDS - start)) s" >&2; last=$state
  fi
  case "$state" in
    ACTIVE) exit 0 ;;
    FAILED|SUSPENDING|SUSPENDED|DELETING)
      die "queued resource $name is $state; see \`${describe[*]}\`, delete it with \`$delete\`, then rerun" 1 ;;
  esac
  [ $((SECONDS - start)) -lt "$timeout" ] \
    || die "queued resource $name is still $state after ${timeout} s (timeout); rerun to wait again" 1
  sleep "$interval"
done
