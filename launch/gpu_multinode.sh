#!/usr/bin/env bash
# Multi-node GPU run under SLURM: one process per node driving all of its GPUs.
#
#   sbatch --nodes=2 --gpus-per-node=8 launch/gpu_multinode.sh configs/lstm_attention.py \
#       /shared/workdir [--config.key=value ...]
#   launch/gpu_multinode.sh --dry-run CONFIG WORKDIR ...   # print the command instead
#
# jax.distributed.initialize() reads the coordinator, process count and id from SLURM's
# environment. Set TFDS_DATA_DIR (or --config.data.data_dir) to a file system every node sees;
# the workdir must be on one too (checkpoints are written by every process, metadata by 0).
# Install first on a shared file system: pip install -e . "jax[cuda13]" (or cuda12).
# A job preempted by SIGTERM saves a checkpoint and exits with status 75: requeue on it
# (e.g. `#SBATCH --requeue` and `scontrol requeue` from an epilog), it resumes where it stopped.
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=TERM@120
set -euo pipefail
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
  dry_run=1
  shift
fi
if [ $# -lt 2 ]; then
  echo "usage: sbatch [--nodes=N] launch/gpu_multinode.sh [--dry-run] CONFIG WORKDIR" \
       "[--config.key=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
# Leave GPU memory to JAX; TensorFlow only runs the input pipeline (and is told so in main).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-true}
cmd=(srun python -m cxr_jax.main --distributed --config="$config" --workdir="$workdir" "$@")
if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
else
  "${cmd[@]}"
fi
