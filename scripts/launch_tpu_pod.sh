#!/usr/bin/env bash
# Run the same training command on every worker of a Cloud TPU VM pod slice. jax.distributed
# detects the pod by itself, so each worker runs plain `python train.py ...`.
# Usage: scripts/launch_tpu_pod.sh [--dry-run] TPU_NAME ZONE [--project P] -- --config configs/NAME.py [overrides...]
# Env: REPO_DIR (checkout on the workers, default ~/gpt-jax), SETUP=0 to skip installing requirements.
set -euo pipefail
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
if [ $# -lt 3 ]; then
  echo "usage: $0 [--dry-run] TPU_NAME ZONE [--project P] -- --config configs/NAME.py [overrides...]" >&2
  exit 2
fi
tpu=$1 zone=$2
shift 2
gcloud_extra=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do gcloud_extra+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
repo_dir=${REPO_DIR:-'~/gpt-jax'}
setup="python3 -m pip install -q -r requirements.txt 'jax[tpu]==$(sed -n 's/^jax==//p' "$(dirname "$0")/../requirements.txt")'"
[ "${SETUP:-1}" = "0" ] && setup=true
remote="cd $repo_dir && $setup && python3 train.py $(printf '%q ' "$@")"
cmd=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${gcloud_extra[@]}" --worker=all --command "$remote")
if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
else
  "${cmd[@]}"
fi
