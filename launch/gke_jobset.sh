#!/usr/bin/env bash
# dpo_jax on TPU in GKE: renders a JobSet (one Job per slice, one pod per TPU VM host) and applies it
# with `kubectl apply -f -`. The image is the one launch/Dockerfile builds (dpo_jax installed with
# `.[tpu]`, entrypoint `dpo-jax`, the repository's configs/ in its working directory), built and pushed first:
#   docker build -f launch/Dockerfile --build-arg ACCELERATOR=tpu -t REGION-docker.pkg.dev/PROJECT/REPO/dpo-jax:tpu .
#   docker push REGION-docker.pkg.dev/PROJECT/REPO/dpo-jax:tpu
#   bash launch/gke_jobset.sh --image=REGION-docker.pkg.dev/PROJECT/REPO/dpo-jax:tpu --tpu=tpu-v5-lite-podslice \
#       --topology=4x4 --hosts=4 --slices=1 -- --config=configs/hh_pythia28b.py --workdir=gs://bucket/runs/hh
# Options (before `--`; everything after `--` becomes the container's args, exactly):
#   --image=IMAGE --tpu=ACCELERATOR --topology=TOPOLOGY   required
#   --hosts=N (TPU VM hosts per slice, default 1)  --slices=N (default 1)  --chips-per-host=N (default 4)
#   --name=NAME (the JobSet's name, default dpo-jax)
#   --dry-run   print the manifest (JSON, which is YAML) on stdout and apply nothing; the command that
#               would apply it goes to stderr, so `... --dry-run -- ... > jobset.json` saves the manifest
# The manifest is written by launch/jobset_manifest.py (standard library only: any python3; $PYTHON
# chooses it).
set -euo pipefail
image=""; tpu=""; topology=""; hosts=1; slices=1; chips=4; name="dpo-jax"; dry_run=0
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    --image=*) image="${1#*=}" ;;
    --tpu=*) tpu="${1#*=}" ;;
    --topology=*) topology="${1#*=}" ;;
    --hosts=*) hosts="${1#*=}" ;;
    --slices=*) slices="${1#*=}" ;;
    --chips-per-host=*) chips="${1#*=}" ;;
    --name=*) name="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gke_jobset.sh: unknown option $1 (dpo_jax.main's flags go after --)" >&2; exit 2 ;;
  esac
  shift
done
[ "${1:-}" = "--" ] && shift
[ -n "$image" ] && [ -n "$tpu" ] && [ -n "$topology" ] \
  || { echo "gke_jobset.sh: --image, --tpu and --topology are required" >&2; exit 2; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
manifest=$("${PYTHON:-python3}" "$here/jobset_manifest.py" --name="$name" --image="$image" --tpu="$tpu" \
  --topology="$topology" --hosts="$hosts" --slices="$slices" --chips-per-host="$chips" -- "$@")
if [ "$dry_run" = 1 ]; then
  printf '%s\n' "$manifest"
  echo "# dry run: nothing applied; the manifest above goes to: kubectl apply -f -" >&2
else
  printf '%s\n' "$manifest" | kubectl apply -f -
fi
