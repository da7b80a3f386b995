#!/usr/bin/env bash
# sbatch script: one process per node (GPUS_PER_TASK=all) or one per GPU. jax.distributed reads
# the SLURM environment, so every task runs the same `python train.py ...`.
# Usage: sbatch --nodes=N [--gpus-per-node=G --ntasks-per-node=G] scripts/launch_slurm.sh --config configs/NAME.py [overrides...]
#        bash scripts/launch_slurm.sh --dry-run --config ...   # print the srun command, run nothing
#SBATCH --job-name=gpt-jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=slurm-%j.out
#SBATCH --signal=B:TERM@120
set -euo pipefail
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
if [ $# -lt 2 ]; then
  echo "usage: sbatch [sbatch options] $0 [--dry-run] --config configs/NAME.py [overrides...]" >&2
  exit 2
fi
cmd=(srun --kill-on-bad-exit=1 python train.py "$@")
if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
source "${VENV:-.venv}/bin/activate"
# With one task per GPU, jax.distributed gives each task the GPU of its SLURM_LOCALID; with one
# task per node, train.py hands it all SLURM_GPUS_ON_NODE GPUs.
# --signal=B:TERM@120 warns the batch shell two minutes before the limit; forward it to every
# task so all processes finish the step and save one checkpoint together.
"${cmd[@]}" &
pid=$!
trap 'kill -TERM "$pid"' TERM
wait "$pid" || wait "$pid"
