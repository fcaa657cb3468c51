#!/usr/bin/env bash
# Multi-node GPU run under SLURM: one process per node driving all of its GPUs.
#
#   sbatch --nodes=2 --gpus-per-node=8 launch/gpu_multinode.sh configs/lstm_attention.py /shared/workdir
#
# jax.distributed.initialize() reads the coordinator, process count and id from SLURM's
# environment. Set TFDS_DATA_DIR (or --config.data.data_dir) to a file system every node sees.
# Install first on a shared file system: pip install -e . "jax[cuda13]" (or cuda12).
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: sbatch [--nodes=N] launch/gpu_multinode.sh CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
# Leave GPU memory to JAX; TensorFlow only runs the input pipeline (and is told so in main).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-true}
srun python -m cxr_jax.main --distributed --config="$config" --workdir="$workdir" "$@"
