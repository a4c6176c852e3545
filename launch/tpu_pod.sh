#!/usr/bin/env bash
# Runs dpo_jax on a Cloud TPU VM or pod slice: creates the TPU (or reuses the one of that name), ships
# HEAD of the git repository this script lives in (`git archive`: committed files only) to every
# worker, unpacks it to ~/dpo_jax/src (replacing the previous copy), installs it with `.[tpu]` into
# ~/dpo_jax/.venv (created once), starts the same command on every worker (JAX's multi-controller
# runtime finds its peers by itself on a pod), appending to ~/dpo_jax/run.log, and tails worker 0's log.
# Rerunning the same command reuses the TPU, replaces the code and resumes from the workdir.
#
#   bash launch/tpu_pod.sh --name=dpo-v5e --zone=us-west4-a --type=v5litepod-16 \
#       -- --config=configs/hh_pythia28b.py --workdir=gs://my-bucket/runs/hh
#
# Options (all before `--`; everything after `--` goes to dpo_jax.main unchanged):
#   --name=NAME --zone=ZONE --type=ACCELERATOR_TYPE   required
#   --version=RUNTIME      TPU software version (default $TPU_RUNTIME_VERSION or v2-alpha-tpuv5-lite)
#   --project=PROJECT      gcloud project (default $PROJECT, else gcloud's configured one)
#   --slices=N             a queued resource of N slices (the mesh's `dcn` axis spans them); the
#                          script waits until it is ACTIVE before copying or starting anything
#   --wait-timeout=SECONDS how long to wait for ACTIVE (default 7200); --poll-interval=SECONDS (30)
#   --python=COMMAND       the workers' interpreter for the venv, Python 3.11 or newer (default python3)
#   --dry-run              print the commands, one per line, and run nothing: the output is a bash
#                          script (`bash launch/tpu_pod.sh ... --dry-run -- ... > run.sh; bash run.sh`)
# The workdir should be a bucket (--workdir=gs://...): every worker must see the same checkpoints,
# and ~/dpo_jax/src is replaced on every run.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

# shellcheck source=launch/quote.sh
source "$(dirname "${BASH_SOURCE[0]}")/quote.sh"
# The same for a POSIX shell on the workers: single quotes only (a newline inside them is literal).
sh_quote() {
  local word=$1 rest out=""
  case "$word" in ''|*[!A-Za-z0-9_./:=,@%+-]*) ;; *) printf '%s' "$word"; return ;; esac
  rest=$word
  while [[ "$rest" == *"'"* ]]; do out+="${rest%%"'"*}'\\''"; rest=${rest#*"'"}; done
  printf "'%s'" "$out$rest"
}
say() { local line="" word; for word in "$@"; do line+="${line:+ }$(quote "$word")"; done; printf '%s\n' "$line"; }
run() { if [ "$dry_run" = 1 ]; then say "$@"; else echo "+ $(say "$@")" >&2; "$@"; fi; }
positive() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, not '$2'"; }
natural() { [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a whole number of seconds, not '$2'"; }

name=""; zone=""; type=""; version="${TPU_RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"; project="${PROJECT:-}"
slices=1; dry_run=0; wait_timeout=7200; poll_interval=30; remote_python=python3
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --type=*) type="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --slices=*) slices="${1#*=}" ;;
    --wait-timeout=*) wait_timeout="${1#*=}" ;;
    --poll-interval=*) poll_interval="${1#*=}" ;;
    --python=*) remote_python="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (dpo_jax.main's flags go after --; --help lists the options)" ;;
  esac
  shift
done
[ "${1:-}" = "--" ] && shift
[ -n "$name" ] && [ -n "$zone" ] && [ -n "$type" ] || die "--name, --zone and --type are required"
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name must be lower-case letters, digits and '-', not '$name'"
[ $# -gt 0 ] || die "give the dpo_jax.main flags after --"
positive --slices "$slices"; natural --wait-timeout "$wait_timeout"; natural --poll-interval "$poll_interval"
[ -n "$remote_python" ] || die "--python must name an interpreter"

# What ships: HEAD of the repository holding this script, as a tar.gz named after the TPU and the commit.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(git -C "$here" rev-parse --show-toplevel 2>/dev/null) \
  || die "$here is not inside a git repository: this script ships the repository's HEAD with git archive"
commit=$(git -C "$repo" rev-parse --verify --quiet 'HEAD^{commit}') || die "$repo has no commit to ship"
if [ -n "$(git -C "$repo" --no-optional-locks status --porcelain --untracked-files=no)" ]; then
  echo "tpu_pod.sh: note: uncommitted changes in $repo are not shipped (HEAD is ${commit:0:12})" >&2
fi
tmp="${TMPDIR:-/tmp}"; archive="${tmp%/}/dpo_jax-$name-${commit:0:12}.tar.gz"

for arg in "$@"; do
  case "$arg" in
    --workdir=gs://*) ;;
    --workdir=/*) echo "tpu_pod.sh: note: ${arg#*=} is each worker's own disk; use a bucket (gs://...)" >&2 ;;
    --workdir=*) echo "tpu_pod.sh: note: a relative workdir lands in ~/dpo_jax/src, which a rerun replaces;" \
                      "use a bucket (gs://...)" >&2 ;;
  esac
done

loc=(--zone="$zone"); [ -n "$project" ] && loc+=(--project="$project")
tpu=(gcloud compute tpus tpu-vm)
if [ "$slices" -gt 1 ]; then
  what="queued resource"
  describe=(gcloud compute tpus queued-resources describe "$name" "${loc[@]}")
  create=(gcloud compute tpus queued-resources create "$name" "${loc[@]}" --accelerator-type="$type"
          --runtime-version="$version" --node-count="$slices" --node-prefix="$name")
  nodes=(); for ((i = 0; i < slices; i++)); do nodes+=("$name-$i"); done
else
  what="TPU"
  describe=("${tpu[@]}" describe "$name" "${loc[@]}")
  create=("${tpu[@]}" create "$name" "${loc[@]}" --accelerator-type="$type" --version="$version")
  nodes=("$name")
fi

main_args=""; for arg in "$@"; do main_args+=" $(sh_quote "$arg")"; done
install="set -e; mkdir -p ~/dpo_jax; cd ~/dpo_jax; rm -rf src.new; mkdir src.new"
install+="; tar -xzf ~/dpo_jax.tar.gz -C src.new; rm -f ~/dpo_jax.tar.gz; rm -rf src; mv src.new src"
install+="; test -x .venv/bin/python || { $(sh_quote "$remote_python") -m venv .venv"
install+=" && .venv/bin/python -m pip install -q --upgrade pip; }"
install+="; .venv/bin/python -m pip install -q -e \"./src[tpu]\""
start="cd ~/dpo_jax/src && echo \"=== \$(date -u) dpo_jax ${commit:0:12}\" >> ../run.log"
start+=" && nohup ../.venv/bin/python -m dpo_jax.main$main_args < /dev/null >> ../run.log 2>&1 &"

# 1. The TPU (or queued resource): reused if it exists.
if [ "$dry_run" = 1 ]; then
  printf '%s >/dev/null 2>&1 || %s\n' "$(say "${describe[@]}")" "$(say "${create[@]}")"
elif "${describe[@]}" >/dev/null 2>&1; then
  echo "tpu_pod.sh: reusing the $what $name" >&2
else
  run "${create[@]}"
fi
# 2. A queued resource's slices exist only once it is ACTIVE: nothing is copied or started before.
if [ "$slices" -gt 1 ]; then
  run bash "$here/wait_queued_resource.sh" --name="$name" "${loc[@]}" --timeout="$wait_timeout" \
      --interval="$poll_interval"
fi
# 3. Ship the code, unpack and install it on every worker, then start the run on every worker.
run git -C "$repo" archive --format=tar.gz -o "$archive" "$commit"
[ "$dry_run" = 1 ] || trap 'rm -f "$archive"' EXIT
for node in "${nodes[@]}"; do
  run "${tpu[@]}" scp "$archive" "$node:~/dpo_jax.tar.gz" "${loc[@]}" --worker=all
done
run rm -f "$archive"
for node in "${nodes[@]}"; do
  run "${tpu[@]}" ssh "$node" "${loc[@]}" --worker=all --command="$install"
done
for node in "${nodes[@]}"; do
  run "${tpu[@]}" ssh "$node" "${loc[@]}" --worker=all --command="$start"
done
run "${tpu[@]}" ssh "${nodes[0]}" "${loc[@]}" --worker=0 --command="tail -f ~/dpo_jax/run.log"
