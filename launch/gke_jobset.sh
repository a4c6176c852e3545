#!/usr/bin/env bash
# dpo_jax on TPU in GKE: renders a JobSet (one Job per slice, one pod per TPU VM host) and applies it
# with kubectl. The image must contain this checkout installed with `.[tpu]`.
#   bash launch/gke_jobset.sh --image=gcr.io/me/dpo_jax --tpu=tpu-v5-lite-podslice --topology=4x4 \
#       --hosts=4 --slices=1 -- --config=configs/hh_pythia28b.py --workdir=gs://bucket/runs/hh
#   --dry-run prints the manifest instead of applying it.
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
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ "${1:-}" = "--" ] && shift
[ -n "$image" ] && [ -n "$tpu" ] && [ -n "$topology" ] || { echo "--image, --tpu and --topology are required" >&2; exit 2; }
args=""; for arg in "$@"; do args+="              - \"$arg\""$'\n'; done
manifest=$(cat <<YAML
apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: $name
  annotations:
    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool
spec:
  failurePolicy:
    maxRestarts: 3
  replicatedJobs:
  - name: slice
    replicas: $slices
    template:
      spec:
        parallelism: $hosts
        completions: $hosts
        backoffLimit: 0
        template:
          spec:
            restartPolicy: Never
            nodeSelector:
              cloud.google.com/gke-tpu-accelerator: $tpu
              cloud.google.com/gke-tpu-topology: $topology
            containers:
            - name: dpo-jax
              image: $image
              command: ["python", "-m", "dpo_jax.main"]
              args:
$args              resources:
                limits:
                  google.com/tpu: $chips
YAML
)
if [ "$dry_run" = 1 ]; then echo "$manifest"; else echo "$manifest" | kubectl apply -f -; fi
